"""Reading a FLUX.1 ControlNet in diffusers' layout (InstantX's, Shakker-Labs' Union files).

Such a file holds a short FLUX transformer (``transformer_blocks.*``,
``single_transformer_blocks.*``, ``x_embedder``, ``context_embedder``, ``time_text_embed``),
the hint's input layer ``controlnet_x_embedder``, one zero-initialised linear per block
(``controlnet_blocks.*``, ``controlnet_single_blocks.*``) and, for union models, the
control-type embedding ``controlnet_mode_embedder``. The ``FluxControlNetModel`` config is
read from the shapes, as FLUX transformers' are (nodes.checkpoint.flux_keys): the head
width from the query norm, the rotary axes in the released (16, 56, 56) proportions.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import CheckpointError

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
    if shapes["controlnet_x_embedder.weight"][1] != in_channels:
        raise CheckpointError(f"{name}: its hint input takes {shapes['controlnet_x_embedder.weight'][1]} channels, "
                              f"not the latent's {in_channels} (inpainting ControlNets with a mask channel are "
                              "not supported)")
    if "controlnet_mode_embedder.weight" in shapes:
        config["num_mode"] = shapes["controlnet_mode_embedder.weight"][0]
    return config


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the FluxControlNetModel, what it is for the loader's message)."""
    from diffusers import FluxControlNetModel

    from nodes.checkpoint.load import _assign, _empty

    config = controlnet_config({k: tuple(v.shape) for k, v in state.items()}, name)
    network = _assign(_empty(FluxControlNetModel, config), state, "FLUX ControlNet", dtype)
    kind = f"union of {config['num_mode']} types" if "num_mode" in config else "single type"
    return network, {"format": f"diffusers single file, {config['num_layers']} double + "
                               f"{config['num_single_layers']} single blocks, {kind}"}
