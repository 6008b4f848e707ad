"""LoraSave ("Extract and Save Lora"), ComfyUI's node: a LoRA file from a model difference.

The usual graph: ModelMergeSubtract(finetuned, base, 1) gives the difference as a MODEL (and
CLIPMergeSubtract for the text encoders); this node reads its weights while it is in use and
writes, for each weight, the best rank-``rank`` factors of the difference (its truncated SVD,
the singular values on the up side, values clamped at the 0.99 quantile as ComfyUI does so a few
outliers cannot blow a factor up), or with ``full_diff`` the whole difference. With
``bias_diff`` biases and 1-D weights (norms) are written as whole differences too. Tensors are
saved in half precision, as ComfyUI saves them.

Key names are ComfyUI's, so the file loads in ComfyUI and in Kiln's LoraLoader: a UNet's modules
under ``diffusion_model.`` in the original layout, text encoders under
``text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.``. A FLUX transformer's go under
``transformer.`` with diffusers' names (the PEFT layout both read), since the original layout
fuses q, k and v into one tensor that per-weight factors cannot address.
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Result, define_node
from nodes import image as image_nodes
from nodes.handles import ClipHandle, ModelHandle
from nodes.families.encoder_names import clip_file_name
from nodes.model_saving import read_module, save_tensors

LORA_TYPES = ("standard", "full_diff")
CLAMP_QUANTILE = 0.99


def low_rank(diff: "Any", rank: int) -> tuple["Any", "Any"]:
    """(up, down) with up @ down the best rank-``rank`` approximation of ``diff`` (a linear or
    convolution weight; a convolution's kernel stays on the down side), clamped as ComfyUI does."""
    import torch

    out_dim, in_dim = diff.shape[0], diff.shape[1]
    rank = min(rank, out_dim, diff[0].numel())
    u, s, vh = torch.linalg.svd(diff.reshape(out_dim, -1).float(), full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    values = torch.cat([up.flatten(), down.flatten()])
    limit = float(torch.quantile(values, CLAMP_QUANTILE)) if values.numel() <= 2 ** 24 else float(values.abs().max())
    up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if diff.ndim == 4:
        return up.reshape(out_dim, rank, 1, 1), down.reshape(rank, in_dim, *diff.shape[2:])
    return up, down


def _factors(state: dict[str, Any], names: dict[str, str], prefix: str, rank: int, full: bool,
             bias_diff: bool) -> dict[str, Any]:
    """The LoRA tensors for one network's difference ``state`` (``names``: its module names in the file)."""
    out: dict[str, Any] = {}
    for name, diff in state.items():
        if not diff.is_floating_point():
            continue
        module, _, kind = names.get(name, name).rpartition(".")
        key = f"{prefix}{module}"
        if kind == "bias":
            if bias_diff:
                out[f"{key}.diff_b"] = diff.half().contiguous()
        elif kind == "weight" and (full or diff.ndim < 2):
            if full or bias_diff:
                out[f"{key}.diff"] = diff.half().contiguous()
        elif kind == "weight" and bool(diff.abs().max() > 0):
            up, down = low_rank(diff, rank)
            out[f"{key}.lora_up.weight"] = up.half().contiguous()
            out[f"{key}.lora_down.weight"] = down.half().contiguous()
    return out


@define_node(
    "LoraSave",
    category="_for_testing",
    display_name="Extract and Save Lora",
    output_node=True,
    inputs=[Input("filename_prefix", T.STRING, default="loras/Kiln_extracted_lora",
                  comfy_default="loras/ComfyUI_extracted_lora"),
            Input("rank", T.INT, default=8, min=1, max=4096),
            Input("lora_type", T.COMBO, default="standard", choices=list(LORA_TYPES)),
            Input("bias_diff", T.BOOLEAN, default=True),
            Input("model_diff", T.MODEL, optional=True, tooltip="The ModelMergeSubtract output to make a LoRA of."),
            Input("text_encoder_diff", T.CLIP, optional=True,
                  tooltip="The CLIPMergeSubtract output to make a LoRA of.")],
    validate=image_nodes.save_validate,
)
def lora_save(ctx, filename_prefix: str, rank: int, lora_type: str, bias_diff: bool, model_diff=None,
              text_encoder_diff=None):
    """Save the LoRA of a model difference (and of a text-encoder difference) to the output folder;
    move it into models/loras/ to load it."""
    if lora_type not in LORA_TYPES:
        raise NodeError(f"lora_type must be one of {', '.join(LORA_TYPES)}, got {lora_type!r}", "lora_type")
    if model_diff is None and text_encoder_diff is None:
        raise NodeError("nothing to extract: connect a model difference (ModelMergeSubtract) or a text-encoder "
                        "difference (CLIPMergeSubtract)", "model_diff")
    from nodes.runtime.deferred import pending

    full, rank = lora_type == "full_diff", int(rank)
    state: dict[str, Any] = {}
    if model_diff is not None:
        if not isinstance(model_diff, ModelHandle):
            raise NodeError(f"expected a MODEL, got {type(model_diff).__name__}", "model_diff")
        part = read_module(model_diff.unet, "model_diff")
        flux = model_diff.family.name.startswith("flux")
        names = {} if flux else model_diff.family.original_names(model_diff.peek())
        state.update(_factors(part.state_dict(), names, "transformer." if flux else "diffusion_model.", rank, full,
                              bool(bias_diff)))
    if text_encoder_diff is not None:
        clip = text_encoder_diff
        if not isinstance(clip, ClipHandle):
            raise NodeError(f"expected a CLIP, got {type(clip).__name__}", "text_encoder_diff")
        for spec in clip.family.text_encoders:
            # parts built on first use (a Qwen-VL's vision tower) are read when the difference patches them
            part = read_module(lambda module=spec.module: clip.encoder(module), "text_encoder_diff")
            prefix = f"text_encoders.{clip_file_name(clip.family, spec)}.transformer."
            state.update(_factors(part.state_dict(), {}, prefix, rank, full, bool(bias_diff)))
            left = pending(clip.peek(spec.module))
            if left:
                ctx.message(f"{spec.module}: {', '.join(left)} (built only when a job needs it) is left out of the "
                            "LoRA: the difference does not patch it")
    if not state:
        raise NodeError("the difference is zero everywhere: there is no LoRA to write", "model_diff")
    return Result(ui={"loras": [save_tensors(ctx, state, filename_prefix)]})
