"""Qwen-Image 2.1 weights: ComfyUI's file layouts <-> diffusers' QwenImage21Transformer2DModel and
AutoencoderKLQwenImage21.

**Transformer.** ComfyUI's model (``comfy/ldm/qwen_image21``) keeps diffusers' names for every
weight but one: its feed-forward holds the SwiGLU gate and up projections as one matrix,
``transformer_blocks.N.img_mlp.gate_up.weight`` = [gate_layer; proj] stacked by rows (the gate
first). Comfy-Org's ``qwen_image_2.1_*.safetensors`` store it so; a file with the two halves apart
(diffusers' names) is read as it is. Splitting by rows also splits an int8/fp8 file's row scales
(nodes.checkpoint.scaled_fp8.follow). Nothing else differs, so values move unchanged.

**VAE.** Comfy-Org's ``qwen_image_2.1_vae_bf16.safetensors`` keeps the original Wan-style names
(``encoder.downsamples.L.downsamples.J.residual.*``, ``decoder.upsamples.L.upsamples.J.*``,
``middle.0/1/2``, ``head.0/2``, ``conv1``/``conv2``), each level's resampler the last entry of its
level, and its causal convolutions as one-frame 3-D kernels [out, in, 1, kh, kw]; diffusers' image
VAE holds the same numbers as 2-D kernels. :func:`vae_to_diffusers` renames and squeezes the frame
axis (a deeper kernel is refused: another model's VAE); :func:`vae_to_original` is its inverse, for
the tests' files.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.checkpoint.flux_keys import (  # noqa: F401 (the key modules' interface)
    UNET_PREFIX, count_matches, has_keys, strip)

#: Only Qwen-Image 2.1's transformer has the zero-centred text norm inside ``txt_in`` (Qwen-Image 1's is
#: ``txt_norm``) and one modulation for all blocks.
MARKER = "txt_in.text_norm.weight"
SHARED_MODULATION = "modulation.1.weight"
FUSED = "img_mlp.gate_up.weight"
#: The VAE's detection keys, ComfyUI's (nested levels) and diffusers' (resnets inside down blocks).
VAE_ORIGINAL_MARKER = "encoder.downsamples.0.downsamples.0.residual.0.gamma"
VAE_DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.norm1.gamma"


class KeyMismatch(ValueError):
    """Keys that do not fit the Qwen-Image 2.1 layout (names them)."""


def is_transformer(keys: Any) -> bool:
    """A Qwen-Image 2.1 transformer, either layout, with or without ``model.diffusion_model.``."""
    return has_keys(keys, MARKER, SHARED_MODULATION)


def is_diffusers(keys: Any) -> bool:
    """Always False: both layouts share names, so :func:`original_to_diffusers` reads either."""
    return False


def original_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's tensors (no prefix) under diffusers' names: each fused ``gate_up`` split by rows into
    ``gate_layer`` (first half) and ``proj``. Works on meta tensors and row scales alike."""
    out = {}
    for key, value in state.items():
        if key.endswith("." + FUSED):
            if value.shape[0] % 2:
                raise KeyMismatch(f"{key} has {value.shape[0]} rows, not [gate; up] halves")
            base = key[: -len(FUSED)]
            gate, up = value.chunk(2, dim=0)
            out[base + "img_mlp.gate_layer.weight"], out[base + "img_mlp.proj.weight"] = gate, up
        else:
            out[key] = value
    return out


def diffusers_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' names -> ComfyUI's (each block's gate and up stacked into ``gate_up``)."""
    import torch

    out = {}
    for key, value in state.items():
        if key.endswith(".img_mlp.proj.weight"):
            continue
        if key.endswith(".img_mlp.gate_layer.weight"):
            base = key[: -len("img_mlp.gate_layer.weight")]
            out[base + FUSED] = torch.cat([value, state[base + "img_mlp.proj.weight"]], dim=0)
        else:
            out[key] = value
    return out


def lora_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[str, tuple[tuple[int, int], ...]], ...]]:
    """ComfyUI's fused module name -> the diffusers weights it covers with their rows: a LoRA on
    ``transformer_blocks.N.img_mlp.gate_up`` (ComfyUI's, AI-Toolkit's) has one ``down`` and an ``up``
    whose first half of rows is the gate's, the second the up projection's. Every other module has
    diffusers' name already (``shapes``: the model's parameter shapes)."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".img_mlp.gate_layer.weight"):
            base, rows = name[: -len("gate_layer.weight")], shape[0]
            out[base + "gate_up"] = ((name, ((0, rows),)), (base + "proj.weight", ((rows, 2 * rows),)))
    return out


def original_names(diffusers_names: Any) -> dict[str, str]:
    """diffusers name -> ComfyUI's name of the same tensor (both halves of the MLP take ``gate_up``'s)."""
    return {name: re.sub(r"\.img_mlp\.(gate_layer|proj)\.weight$", "." + FUSED, name) for name in diffusers_names}


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """QwenImage21Transformer2DModel arguments from either layout's shapes. The rotary axes are not in
    the weights: the release splits its 128-wide heads as (16, 56, 56); other widths keep the proportions."""
    s = strip(dict(shapes))
    try:
        inner, in_channels = s["img_in.weight"]
        head = s["transformer_blocks.0.attn.norm_q.weight"][0]
        mlp = s["transformer_blocks.0.img_mlp.out.weight"][1]
        config = dict(in_channels=in_channels, out_channels=s["proj_out.weight"][0],
                      num_layers=count_matches(s, r"^transformer_blocks\.(\d+)\."), attention_head_dim=head,
                      num_attention_heads=inner // head, context_in_dim=s[MARKER][0], mlp_ratio=mlp // inner)
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    first = max(2, head // 8 // 2 * 2)
    rest = (head - first) // 4 * 2
    return config | dict(axes_dims_rope=(head - 2 * rest, rest, rest), eps=1e-6, causal_condition=True)


# -- the VAE ---------------------------------------------------------------------------------------

_RES = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."), ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."))
_TOP = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."), ("encoder.conv1.", "encoder.conv_in."),
        ("decoder.conv1.", "decoder.conv_in."), ("encoder.head.0.", "encoder.norm_out."),
        ("encoder.head.2.", "encoder.conv_out."), ("decoder.head.0.", "decoder.norm_out."),
        ("decoder.head.2.", "decoder.conv_out."))
_MIDDLE = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}
_RESAMPLERS = ("resample.", "time_conv.")


def is_vae(shapes: Any) -> bool:
    """Either layout's marker; in ComfyUI's, also a one-frame output kernel (ComfyUI's own test: Wan 2.2's
    VAE has the same names and three-frame kernels). ``shapes``: key -> shape."""
    if VAE_DIFFUSERS_MARKER in shapes:
        return True
    head = tuple(shapes.get("decoder.head.2.weight", ())) if VAE_ORIGINAL_MARKER in shapes else ()
    return len(head) == 5 and head[2] == 1


def _res_to_diffusers(rest: str) -> str:
    return next((new + rest[len(old):] for old, new in _RES if rest.startswith(old)), rest)


def _res_to_original(rest: str) -> str:
    return next((old + rest[len(new):] for old, new in _RES if rest.startswith(new)), rest)


def _vae_key_to_diffusers(key: str) -> str:
    for old, new in _TOP:
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", key)
    if m:
        inner = _MIDDLE[m.group(2)]
        rest = m.group(3) if inner.startswith("attentions") else _res_to_diffusers(m.group(3))
        return f"{m.group(1)}.mid_block.{inner}{rest}"
    m = re.match(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.*)", key)
    if m:
        side, level, rest = ("encoder", "down_blocks", "downsampler") if m.group(1).startswith("encoder") else \
            ("decoder", "up_blocks", "upsampler"), m.group(2), m.group(4)
        if rest.startswith(_RESAMPLERS):
            return f"{side[0]}.{side[1]}.{level}.{side[2]}.{rest}"
        return f"{side[0]}.{side[1]}.{level}.resnets.{m.group(3)}.{_res_to_diffusers(rest)}"
    raise KeyMismatch(f"unexpected key {key}")


def vae_to_diffusers(state: dict[str, Any], what: str) -> dict[str, Any]:
    """ComfyUI's VAE tensors -> AutoencoderKLQwenImage21's names and 2-D kernels (module docstring);
    a diffusers-layout state passes with its kernels squeezed the same way."""
    original = VAE_ORIGINAL_MARKER in state
    out = {}
    for key, value in state.items():
        name = _vae_key_to_diffusers(key) if original else key
        if value.ndim == 5:
            if value.shape[2] != 1:
                raise KeyMismatch(f"{key} is a {value.shape[2]}-frame kernel; the Qwen-Image 2.1 VAE's are one frame")
            value = value.squeeze(2)
        out[name] = value
    return out


def vae_to_original(state: dict[str, Any], resnets: dict[str, int]) -> dict[str, Any]:
    """AutoencoderKLQwenImage21's names -> ComfyUI's, 2-D causal kernels as one-frame 3-D ones.
    ``resnets``: {"encoder": res blocks per down level, "decoder": per up level} (the resampler's index)."""
    out = {}
    for key, value in state.items():
        name = next((old + key[len(new):] for old, new in _TOP if key.startswith(new)), None)
        if name is None:
            m = re.match(r"(encoder|decoder)\.mid_block\.(resnets\.\d+\.|attentions\.0\.)(.*)", key)
            n = re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.*)",
                         key)
            if m:
                index = next(i for i, inner in _MIDDLE.items() if inner == m.group(2))
                rest = m.group(3) if m.group(2).startswith("attentions") else _res_to_original(m.group(3))
                name = f"{m.group(1)}.middle.{index}.{rest}"
            elif n:
                group = "downsamples" if n.group(1) == "encoder" else "upsamples"
                index = resnets[n.group(1)] if n.group(4) is None else int(n.group(4))
                rest = n.group(5) if n.group(4) is None else _res_to_original(n.group(5))
                name = f"{n.group(1)}.{group}.{n.group(2)}.{group}.{index}.{rest}"
            else:
                raise KeyMismatch(f"unexpected key {key}")
        causal = value.ndim == 4 and "attentions" not in key and "resample.1." not in key
        out[name] = value.unsqueeze(2) if causal else value
    return out


def vae_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """AutoencoderKLQwenImage21 arguments from diffusers-layout shapes (its latent statistics are the
    class's defaults, the release's, which the family's latent format repeats)."""
    try:
        base, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = count_matches(shapes, r"^encoder\.down_blocks\.(\d+)\.")
        widths = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(levels)]
        decoder_base = shapes["decoder.conv_out.weight"][1] // (widths[0] // base)
        config = dict(base_dim=base, decoder_base_dim=decoder_base, z_dim=shapes["post_quant_conv.weight"][0],
                      dim_mult=[w // base for w in widths],
                      num_res_blocks=count_matches(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
                      temperal_downsample=[f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in shapes
                                           for i in range(levels - 1)],
                      attn_scales=[], in_channels=in_channels, out_channels=shapes["decoder.conv_out.weight"][0])
    except KeyError as exc:
        raise KeyMismatch(f"missing {exc}") from None
    return config
