"""Reading a FLUX.1 ControlNet in diffusers' layout (InstantX's, Shakker-Labs' Union files).

Such a file holds a short FLUX transformer (``transformer_blocks.*``,
``single_transformer_blocks.*``, ``x_embedder``, ``context_embedder``, ``time_text_embed``),
the hint's input layer ``controlnet_x_embedder``, one zero-initialised linear per block
(``controlnet_blocks.*``, ``controlnet_single_blocks.*``) and, for union models, the
control-type embedding ``controlnet_mode_embedder``. The ``FluxControlNetModel`` config is
read from the shapes, as FLUX transformers' are (nodes.checkpoint.flux_keys): the head
width from the query norm, the rotary axes in the released (16, 56, 56) proportions.
AliMama's inpainting ControlNet (FLUX.1-dev-Controlnet-Inpainting-Alpha/Beta) has a hint embedder
four inputs wider: the mask's channel, packed with the masked image's latent (see :func:`load`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import CheckpointError
from nodes.control.inpaint import FLUX_EXTRA, MASK_CHANNELS

#: Latent channels per hint token: FLUX packs 2x2 patches.
PATCH = 4

#: Only a FLUX ControlNet has both (SD3's ControlNets have pos_embed_input instead).
MARKERS = ("controlnet_x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight")


def is_flux_controlnet(shapes: Any) -> bool:
    return all(k in shapes for k in MARKERS)


def is_flux_folder(folder: Path) -> bool:
    """A diffusers folder whose config.json names FluxControlNetModel (InstantX's releases as published)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == "FluxControlNetModel"
    except (OSError, ValueError, AttributeError):
        return False


def _count(shapes: Any, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def controlnet_config(shapes: dict[str, tuple], name: str) -> dict[str, Any]:
    """``FluxControlNetModel`` arguments from a diffusers-layout file's shapes."""
    try:
        hidden, in_channels = shapes["x_embedder.weight"]
        head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        config: dict[str, Any] = dict(
            patch_size=1, in_channels=in_channels, num_layers=_count(shapes, "transformer_blocks."),
            num_single_layers=_count(shapes, "single_transformer_blocks."), attention_head_dim=head,
            num_attention_heads=hidden // head, joint_attention_dim=shapes["context_embedder.weight"][1],
            pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
            axes_dims_rope=(head // 8, head * 7 // 16, head * 7 // 16))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a complete FLUX ControlNet ({exc} is missing)") from None
    if any(k.startswith("input_hint_block.") for k in shapes):
        raise CheckpointError(f"{name}: a FLUX ControlNet with its own hint encoder (input_hint_block) is not "
                              "supported; InstantX-style ControlNets, which read VAE latents, are")
    hint = shapes["controlnet_x_embedder.weight"][1]
    if hint not in (in_channels, in_channels + PATCH * MASK_CHANNELS):
        raise CheckpointError(f"{name}: its hint input takes {hint} channels, not the latent's {in_channels} or "
                              f"that plus a mask ({in_channels + PATCH * MASK_CHANNELS}, AliMama's inpainting "
                              "ControlNet)")
    if "controlnet_mode_embedder.weight" in shapes:
        config["num_mode"] = shapes["controlnet_mode_embedder.weight"][0]
    return config


def is_inpainting(state: Any) -> bool:
    """Whether a FLUX ControlNet's hint embedder is wider than its latent embedder (the mask's channels)."""
    return tuple(state["controlnet_x_embedder.weight"].shape)[1] != tuple(state["x_embedder.weight"].shape)[1]


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the FluxControlNetModel, what it is for the loader's message).

    diffusers' FluxControlNetModel sizes its hint embedder as its latent embedder; AliMama's
    inpainting ControlNet has 4 more inputs (the mask's channel in 2x2 patches). Its forward
    only applies the embedder to the hint tokens, so a wider one is put in its place and the
    extra channel is noted in the config (``inpaint.FLUX_EXTRA``) for the apply node and the run."""
    import torch
    from diffusers import FluxControlNetModel

    from nodes.checkpoint.load import _assign, _empty

    config = controlnet_config({k: tuple(v.shape) for k, v in state.items()}, name)
    network = _empty(FluxControlNetModel, config)
    kind = f"union of {config['num_mode']} types" if "num_mode" in config else "single type"
    if is_inpainting(state):
        width, hint = state["controlnet_x_embedder.weight"].shape
        network.controlnet_x_embedder = torch.nn.Linear(hint, width, device="meta")
        network.register_to_config(**{FLUX_EXTRA: MASK_CHANNELS})
        kind = "AliMama inpainting (hint + mask)"
    network = _assign(network, state, "FLUX ControlNet", dtype)
    return network, {"format": f"diffusers single file, {config['num_layers']} double + "
                               f"{config['num_single_layers']} single blocks, {kind}"}
