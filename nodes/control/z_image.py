"""Z-Image Fun ControlNet Union (alibaba-pai's ``Z-Image-Turbo-Fun-Controlnet-Union.safetensors``), which
ComfyUI loads with ModelPatchLoader and applies with QwenImageDiffsynthControlnet (nodes/model_patch_nodes.py).

The file holds diffusers' ``ZImageControlNetModel`` under its own names (``control_layers.N``,
``control_all_x_embedder.2-1``, ``control_noise_refiner.N``): a few Z-Image blocks that read the
control image as model-space latent tokens and borrow everything else (time embedder, patch and
caption embedders, noise and context refiners, rotary table, pad tokens) from the transformer it
drives. It runs as ZImageControlNetPipeline runs it, once per network call on the same latents,
time and captions: its first block adds the (zero-initialised) projected hint tokens to the
transformer's refined latent tokens, the blocks attend over [hint tokens, caption] with the
model's positions, and each block's output, projected and times the strength, is added after
one main transformer layer.

Where each block lands is not in the file (diffusers' config says ``control_layers_places``): as
ComfyUI, block i serves main layer ``i * round(L / n)`` for n blocks over L layers (the release:
6 blocks over 30 layers, every 5th from 0; the 2.x releases' 15 blocks every 2nd).

The 2.1 release (``control_noise_refiner`` blocks with their own projections) also steers the
refiner: diffusers adds its refiner hints to the ControlNet's own copy of the refined latent.
Kiln runs diffusers' model as is; ComfyUI's port differs in two ways (its blocks attend over the
image tokens alone, without the caption, and it adds the refiner hints to the transformer's own
refined latent), so the same file gives other images there.
Its hint is 33 channels: the control latent, then zeros (ZImageControlNetPipeline's fill) or, with a
mask, the kept mask and a masked image's latent (ZImageControlNetInpaintPipeline's, :func:`hint_latents`).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from nodes.checkpoint.load import CheckpointError
from nodes.families.base import ConditioningError

if TYPE_CHECKING:
    import torch

#: The key that marks alibaba-pai's layout (the hint's patch embedder).
MARKER = "control_all_x_embedder.2-1.weight"
#: residual keys: one per main layer it feeds, ``PREFIX + str(layer)``
PREFIX = "z_image_control."
#: the modules ZImageControlNetModel borrows from the transformer (diffusers' from_transformer)
BORROWED = ("t_scale", "t_embedder", "all_x_embedder", "cap_embedder", "rope_embedder", "noise_refiner",
            "context_refiner", "x_pad_token", "cap_pad_token")
#: Held while a ControlNet has the transformer's modules lent to it (they are given back after each call).
_LENT = threading.Lock()


def is_fun_controlnet(keys: Any) -> bool:
    return MARKER in set(keys)


def _count(shapes: Any, prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def controlnet_config(shapes: dict[str, tuple], name: str) -> dict[str, Any]:
    """``ZImageControlNetModel`` arguments from the file's shapes (the places are set per model at run time)."""
    try:
        dim, patch_in = shapes[MARKER]
        head = shapes["control_layers.0.attention.norm_q.weight"][0]
        kv = shapes["control_layers.0.attention.to_k.weight"][0]
    except KeyError as exc:
        raise CheckpointError(f"{name}: not a complete Z-Image Fun ControlNet ({exc} is missing)") from None
    layers, refiners = _count(shapes, "control_layers."), _count(shapes, "control_noise_refiner.")
    if kv != dim:
        raise CheckpointError(f"{name}: its blocks have {kv // head} key/value heads and {dim // head} query heads; "
                              "diffusers' ZImageControlNetModel (and Kiln) take equal counts")
    mode = None
    if "control_noise_refiner.0.before_proj.weight" in shapes:
        mode = "control_noise_refiner"  # 2.1: refiner blocks with their own projections
    elif refiners == 0:
        mode = "control_layers"  # 2.0 as diffusers converts it: the control layers also steer the refiner
    return dict(control_layers_places=list(range(layers)),
                control_refiner_layers_places=list(range(refiners or 2)) if mode else None,
                control_in_dim=patch_in // 4, add_control_noise_refiner=mode, all_patch_size=(2,),
                all_f_patch_size=(1,), dim=dim, n_refiner_layers=refiners or 2, n_heads=dim // head,
                n_kv_heads=dim // head, norm_eps=1e-5, qk_norm=True)


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the ZImageControlNetModel, what it is for the loader's message). A 2.0 file's refiner blocks,
    all zeros, are dropped (diffusers' converter does the same; its control layers steer the refiner)."""
    from diffusers import ZImageControlNetModel

    from nodes.checkpoint.load import _assign, _empty

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    broken = "control_noise_refiner.0.before_proj.weight" in shapes and \
        not bool(state["control_noise_refiner.0.before_proj.weight"].any())
    if broken:
        state = {k: v for k, v in state.items() if not k.startswith("control_noise_refiner.")}
        shapes = {k: v for k, v in shapes.items() if not k.startswith("control_noise_refiner.")}
    config = controlnet_config(shapes, name)
    network = _assign(_empty(ZImageControlNetModel, config), state, "Z-Image Fun ControlNet", dtype)
    versions = {None: "1.0", "control_noise_refiner": "2.1", "control_layers": "2.0"}
    version = versions[config["add_control_noise_refiner"]]
    return network, {"format": f"alibaba-pai Fun ControlNet Union {version}, {len(config['control_layers_places'])} "
                               f"blocks, {config['control_in_dim']}-channel hint"}


def places(blocks: int, layers: int) -> list[int]:
    """The main layers ``blocks`` ControlNet blocks feed (ComfyUI's rule, see the module docstring)."""
    every = max(1, round(layers / blocks))
    return [i * every for i in range(blocks) if i * every < layers]


def hint_latents(link: Any, rows: int, h: int, w: int, latent: Any, channels: int) -> "torch.Tensor":
    """The control context [rows, channels, 1, h, w]: the control image's model-space latent, then for the
    2.x files (33 channels) either zeros (no mask: ZImageControlNetPipeline's rule) or, given the apply
    node's mask, the kept mask (nearest at the latent's size) and the latent of the image to repaint with
    its masked pixels grey, as ZImageControlNetInpaintPipeline builds it; QwenImageDiffsynthControlnet has
    no image to repaint, so that image is all grey (ComfyUI's rule for the node)."""
    import torch

    from nodes.control.apply import latent_hint, to_rows

    key = ("z-image", h, w, channels)
    if key not in link.cache:
        control = latent_hint(link, h, w, latent.to_model, "Z-Image")
        parts = [control]
        if channels > control.shape[1] and link.mask is not None:
            kept = torch.nn.functional.interpolate(link.mask.to(torch.float32), size=(h, w), mode="nearest")
            # channels-first underneath, as the pipeline's: a constant image is where the VAE's group norms
            # amplify rounding most, so it goes through the same convolution layout
            grey = latent.to_model(link.vae.encode(torch.full((1, 3, h * 8, w * 8), 0.5).movedim(1, -1)))
            parts += [to_rows(kept, control.shape[0]), grey.expand(control.shape[0], -1, -1, -1)]
        have = sum(p.shape[1] for p in parts)
        if channels > have:
            parts.append(control.new_zeros(control.shape[0], channels - have, h, w))
        link.cache[key] = torch.cat(parts, 1)[:, :channels].unsqueeze(2)
    return to_rows(link.cache[key], rows)


def run(network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict,
        model_config: Any, latent: Any, model: Any) -> dict[str, list]:
    """One Fun ControlNet's samples for rows ``x`` [B, 16, h, w], keyed by the main layer each feeds, float32.
    ``model``: the Z-Image transformer, whose modules the ControlNet borrows for the call."""
    import torch

    from nodes.families.z_image import captions

    if model is None or not hasattr(model, "noise_refiner"):
        raise ConditioningError(f"the Z-Image ControlNet {link.net.name!r} borrows the Z-Image transformer's "
                                "layers, and this model has none", "model")
    b, _, h, w = x.shape
    dtype = network.dtype
    hint = hint_latents(link, b, h, w, latent, int(network.config.control_in_dim)).to(x.device, dtype)
    sigma = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b) / 1000.0
    rows = list(x.to(model.dtype).unsqueeze(2).unbind(0))
    caps = captions(context.to(model.dtype), kwargs.get("text_tokens"))
    with _LENT:
        for attr in BORROWED:
            setattr(network, attr, getattr(model, attr))
        try:
            samples = network(rows, 1.0 - sigma, caps, list(hint.unbind(0)), conditioning_scale=float(link.strength))
        finally:
            for attr in BORROWED:
                setattr(network, attr, None)
    where = places(len(samples), int(model_config["n_layers"]))
    return {PREFIX + str(layer): [samples[i].to(torch.float32)] for i, layer in enumerate(where)}


def inputs(totals: dict[str, list]) -> dict[str, Any]:
    """The transformer's keyword: main layer -> the summed sample added after it."""
    return {"controlnet_block_samples": {int(k[len(PREFIX):]): v[0] for k, v in totals.items()
                                         if k.startswith(PREFIX)}}
