"""Ovis-Image transformer weights: ComfyUI's key layout <-> diffusers' OvisImageTransformer2DModel.

Comfy-Org's ``ovis_image_bf16.safetensors`` names the transformer as ComfyUI's FLUX model does (its
Ovis variant: ``txt_norm``, a gated "yak" MLP, no ``vector_in`` or ``guidance_in``), so the table is
FLUX's (nodes.checkpoint.flux_keys) with four differences:

* ``time_in.in_layer`` / ``out_layer`` are diffusers' top-level ``timestep_embedder.linear_1`` / ``_2``
  (there is no text or guidance embedder beside it);
* ``txt_norm.weight`` (an RMSNorm over the text states) is ``context_embedder_norm.weight``;
* a double block's MLPs are ``img_mlp.gate_proj`` / ``up_proj`` / ``down_proj`` (with biases): diffusers'
  SwiGLU ``ff.net.0.proj`` stacks them as (up, gate) (it multiplies the first half by the SiLU of the
  second), ``ff.net.2`` is ``down_proj``; the text stream's ``txt_mlp`` likewise for ``ff_context``;
* a single block's ``linear1`` stacks q, k, v and the MLP input as FLUX's does, the MLP part being
  (up, gate) in both layouts, so it splits as FLUX's.

The gated MLP is the one place where two file tensors make one module tensor (diffusers fuses what
ComfyUI keeps apart): a build straight into disk blocks (nodes.checkpoint.paged_files) joins their rows
per block, and a LoRA on either projection patches its half of the rows (:func:`lora_modules`).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import flux_keys
from nodes.checkpoint.flux_keys import KeyMismatch, UNET_PREFIX, has_keys, strip  # noqa: F401 (key-module interface)
from nodes.checkpoint.flux_keys import Into

#: ComfyUI's detection key for Ovis (its gated MLP) in the original layout; diffusers' unique one.
ORIGINAL_MARKER = "double_blocks.0.img_mlp.gate_proj.weight"
DIFFUSERS_MARKER = "context_embedder_norm.weight"
_TIME = ("time_text_embed.timestep_embedder.", "timestep_embedder.")
_NOT_IN_OVIS = ("vector_in.", "guidance_in.")
_MLPS = (("img_mlp", "ff.net"), ("txt_mlp", "ff_context.net"))


def is_original(keys: Any) -> bool:
    return has_keys(keys, ORIGINAL_MARKER, "txt_norm.weight")


def is_diffusers(keys: Any) -> bool:
    return has_keys(keys, DIFFUSERS_MARKER, "timestep_embedder.linear_1.weight")


def _pairs(bfl_keys: Any, diff_keys: Any) -> list[tuple[list[str], list[str], str]]:
    """FLUX's table (flux_keys._pairs) made Ovis's: no vector or guidance embedder, the time embedder at
    the top level, ``txt_norm``; the MLPs there under FLUX's names (``img_mlp.0`` the stacked (up, gate),
    ``img_mlp.2`` the down projection), which :func:`original_to_diffusers` writes first."""
    out = [(["txt_norm.weight"], ["context_embedder_norm.weight"], "rename")]
    for original, diff, how in flux_keys._pairs(bfl_keys, diff_keys):
        if original[0].startswith(_NOT_IN_OVIS):
            continue
        out.append((original, [d.replace(*_TIME) if d.startswith(_TIME[0]) else d for d in diff], how))
    return out


def _plan(keys: Any) -> list[tuple[str, list[str], str]]:
    return flux_keys.plan_from(_pairs, keys)


def _block_mlps(state: dict[str, Any], forward: bool) -> dict[str, Any]:
    """``state`` with each double block's gated MLPs in FLUX's names (``forward``: ComfyUI's gate/up/down
    -> ``*_mlp.0`` = (up, gate) stacked, ``*_mlp.2`` = down) or back. Meta tensors and row scales alike."""
    import torch

    out = dict(state)
    for key in list(state):
        for mlp, _ in _MLPS:
            head = key.split(f".{mlp}.", 1)
            if len(head) != 2 or not key.startswith("double_blocks."):
                continue
            base, rest = f"{head[0]}.{mlp}", head[1]
            if forward and rest.startswith("up_proj."):
                suffix = rest[len("up_proj."):]
                gate, up = out.pop(f"{base}.gate_proj.{suffix}"), out.pop(key)
                if (up.dtype, up.device) != (gate.dtype, gate.device):  # e.g. only one of them quantised
                    raise KeyMismatch(f"{base}.gate_proj and up_proj are stored differently ({gate.dtype}, "
                                      f"{up.dtype}, or one scaled and one not), and one layer holds both here")
                out[f"{base}.0.{suffix}"] = torch.cat([up, gate], dim=0)
            elif forward and rest.startswith("down_proj."):
                out[f"{base}.2.{rest[len('down_proj.'):]}"] = out.pop(key)
            elif not forward and rest.startswith("0."):
                up, gate = out.pop(key).chunk(2, dim=0)
                out[f"{base}.up_proj.{rest[2:]}"], out[f"{base}.gate_proj.{rest[2:]}"] = up, gate
            elif not forward and rest.startswith("2."):
                out[f"{base}.down_proj.{rest[2:]}"] = out.pop(key)
    return out


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI-layout tensors (``model.diffusion_model.`` taken off first) under diffusers' names.
    Raises :class:`KeyMismatch` naming keys missing or left over (a gate without its up projection too)."""
    state = strip(state)
    try:
        flux_named = _block_mlps(state, True)
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc} beside its up_proj") from None
    return flux_keys.to_diffusers(flux_named, _plan)


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names -> ComfyUI's layout (the inverse of :func:`original_to_diffusers`)."""
    return _block_mlps(flux_keys.to_original(state, _pairs), False)


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """OvisImageTransformer2DModel arguments from ComfyUI-layout shapes. The rotary axes are not in the
    weights: the release splits its 128-wide heads as FLUX does, (16, 56, 56); other widths keep those
    proportions."""
    s = strip(dict(shapes))
    try:
        hidden, in_channels = s["img_in.weight"]
        head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return dict(patch_size=1, in_channels=in_channels, out_channels=s["final_layer.linear.weight"][0],
                    num_layers=len(flux_keys._blocks(s, "double_blocks.")),
                    num_single_layers=len(flux_keys._blocks(s, "single_blocks.")), attention_head_dim=head,
                    num_attention_heads=hidden // head, joint_attention_dim=s["txt_in.weight"][1],
                    axes_dims_rope=(head // 8, head * 7 // 16, head * 7 // 16))
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> the ComfyUI name of the tensor it is or is part of (a stacked MLP input: its
    up projection's; the gate is the same module's other half)."""
    names = flux_keys.original_names(diffusers_names, _pairs)
    for d, o in names.items():
        for mlp, _ in _MLPS:
            if f".{mlp}.0." in o:
                names[d] = o.replace(f".{mlp}.0.", f".{mlp}.up_proj.")
            elif f".{mlp}.2." in o:
                names[d] = o.replace(f".{mlp}.2.", f".{mlp}.down_proj.")
    return names


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ComfyUI's module name -> the diffusers weight(s) it is or covers, for LoRAs in ComfyUI's layout
    (``diffusion_model.``, kohya's ``lora_unet_``): FLUX's table (nodes.checkpoint.flux_keys.lora_modules:
    q/k/v and a single block's linear1 split by rows) with a double block's MLPs in Ovis's names: ``down_proj``
    is ``ff.net.2``, and ``up_proj`` / ``gate_proj`` are the first / second half of the rows of diffusers'
    fused ``ff.net.0.proj`` (:class:`Into`), the text stream's likewise; ``txt_norm`` (a whole difference on
    it) is ``context_embedder_norm``. ``shapes``: the diffusers model's."""
    out = {name: parts for name, parts in flux_keys.lora_modules(shapes, _pairs).items()
           if not any(f".{mlp}.{n}" in name for mlp, _ in _MLPS for n in "02")}
    if "context_embedder_norm.weight" in shapes:  # a whole difference for the text norm (FLUX has none)
        out["txt_norm"] = out["txt_norm.weight"] = "context_embedder_norm.weight"
    for i in flux_keys._blocks(shapes, "transformer_blocks."):
        for mlp, diff in _MLPS:
            fused, down = f"transformer_blocks.{i}.{diff}.0.proj.weight", f"transformer_blocks.{i}.{diff}.2.weight"
            if fused not in shapes:
                continue
            half, base = shapes[fused][0] // 2, f"double_blocks.{i}.{mlp}."
            out[base + "up_proj"], out[base + "gate_proj"] = Into(fused, 0, half), Into(fused, half, 2 * half)
            out[base + "down_proj"] = down
    return out
