"""Tiny random-weight Stable Diffusion models for tests (seconds to build, no downloads).

API (variant is one of "sd1", "sd2", "sd2-v" (v-prediction), "sdxl"; also "sdxl-refiner"
(bigG alone, aesthetic-score time ids) and the "-inpaint" variants, which the shared models
folder below leaves out):

    components(variant)            -> dict of diffusers/transformers parts, keyed as
                                      pipelines name them: unet, vae, text_encoder,
                                      tokenizer, scheduler (+ text_encoder_2, tokenizer_2
                                      for sdxl). Cached per variant: do not mutate.
    fresh_components(variant, seed=0) -> the same, newly built (safe to modify).
    pipeline(variant, cls=None)    -> a diffusers pipeline over components(variant);
                                      cls e.g. StableDiffusionImg2ImgPipeline or
                                      StableDiffusionXLImg2ImgPipeline (default: txt2img).
    save_diffusers(variant, folder)          -> folder (a diffusers pipeline folder)
    save_single_file(variant, path, half=False) -> path (original LDM/ComfyUI layout)
    save_vae(variant, path)        -> path (a standalone VAE .safetensors, original layout)
    make_models_folder(root)       -> root, with
        checkpoints/tiny-<variant>.safetensors and checkpoints/tiny-<variant>-diffusers/
        for every variant, and vae/tiny-vae.safetensors (sd1's VAE).
    checkpoint_name(variant, fmt="single"|"diffusers") -> the name a loader node takes.

Pytest fixtures (tests/conftest.py): ``tiny_models_dir`` (session-scoped models
folder as above) and ``tiny_env`` (an engine Environment whose models folder is it).

Sizes: UNet 0.3-1.5 M params, VAE ~1 M, text encoders 3.3 M (mostly CLIP's
49408-token embedding). The weights of a variant are the same on every call
(fixed seed). A 64x64 image gives an 8x8 latent, as with real SD.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from nodes.checkpoint.tiny import VARIANTS, build_components, pipeline_from_components, prediction_of

__all__ = ["VARIANTS", "components", "fresh_components", "pipeline", "save_diffusers", "save_single_file",
           "save_vae", "make_models_folder", "checkpoint_name", "encoded_prompts", "decode"]


def fresh_components(variant: str, seed: int = 0) -> dict[str, Any]:
    return build_components(variant, seed)


@functools.lru_cache(maxsize=None)
def components(variant: str) -> dict[str, Any]:
    return build_components(variant, 0)


def pipeline(variant: str, cls: Any = None, parts: dict[str, Any] | None = None) -> Any:
    return pipeline_from_components(dict(parts or components(variant)), cls)


def encoded_prompts(variant: str, prompt: str, negative: str) -> tuple[list, list, dict[str, Any]]:
    """(positive, negative) CONDITIONING as Kiln's text nodes give them, and the same embeddings as
    keyword arguments for a diffusers pipeline, encoded once by diffusers' own ``encode_prompt`` so a
    parity test compares the sampling alone."""
    import torch

    with torch.no_grad():
        enc = pipeline(variant).encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=negative)
    if len(enc) == 4:  # SDXL: pooled embeddings as well
        pos, neg, pooled, neg_pooled = enc
        return ([[pos, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]],
                dict(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                     negative_pooled_prompt_embeds=neg_pooled))
    pos, neg = enc
    return ([[pos, {"pooled_output": None}]], [[neg, {"pooled_output": None}]],
            dict(prompt_embeds=pos, negative_prompt_embeds=neg))


def decode(vae: Any, samples: Any) -> Any:
    """A raw latent decoded by a diffusers VAE as an IMAGE [B, H, W, C] in 0..1, the form parity tests
    compare pixels in."""
    import torch

    with torch.no_grad():
        image = vae.decode(samples).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def save_diffusers(variant: str, folder: str | Path, parts: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    pipeline(variant, parts=parts).save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_single_file(variant: str, path: str | Path, half: bool = False,
                     parts: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from nodes.checkpoint.to_original import components_to_original

    state = components_to_original(parts or components(variant), prediction_of(variant))
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_vae(variant: str, path: str | Path) -> Path:
    """A standalone VAE file as users download them (keys without ``first_stage_model.``)."""
    from safetensors.torch import save_file

    from nodes.checkpoint.to_original import vae_to_original

    vae = components(variant)["vae"]
    state = vae_to_original(vae.state_dict(), dict(vae.config))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k[len("first_stage_model."):]: v.contiguous() for k, v in state.items()}, str(path))
    return path


def checkpoint_name(variant: str, fmt: str = "single") -> str:
    return f"tiny-{variant}.safetensors" if fmt == "single" else f"tiny-{variant}-diffusers"


def make_models_folder(root: str | Path) -> Path:
    root = Path(root)
    for variant in VARIANTS:
        save_single_file(variant, root / "checkpoints" / checkpoint_name(variant))
        save_diffusers(variant, root / "checkpoints" / checkpoint_name(variant, "diffusers"))
    save_vae("sd1", root / "vae" / "tiny-vae.safetensors")
    (root / "tiny-models.json").write_text(json.dumps({"variants": list(VARIANTS)}))
    return root


# -- tiny ControlNets ----------------------------------------------------------------------
#: The hint encoder's widths (released ControlNets: 16, 32, 96, 256; four levels, /8 like the VAE).
HINT_CHANNELS = (8, 8, 16, 16)


def fresh_controlnet(variant: str, seed: int = 1) -> Any:
    """A ControlNet for ``variant``'s tiny UNet (its encoder copied, as diffusers' ``from_unet``
    does), every weight moved off its initial value (the zero convolutions too, strongly
    enough that the control visibly changes a 64x64 image)."""
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(components(variant)["unet"], conditioning_embedding_out_channels=HINT_CHANNELS)
        with torch.no_grad():
            for name, p in net.named_parameters():
                scale = 0.3 if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                                "controlnet_cond_embedding.conv_out")) else 0.02
                p.add_(torch.randn_like(p) * scale)
    return net.eval()


@functools.lru_cache(maxsize=None)
def controlnet(variant: str, seed: int = 1) -> Any:
    return fresh_controlnet(variant, seed)


def save_controlnet(net: Any, path: str | Path, layout: str = "original", base_unet: Any = None) -> Path:
    """Write ``net`` as users find ControlNets: "original" (``control_model.*`` keys, as
    lllyasviel's files), "plain" (the same without the prefix, ComfyUI's repacks),
    "diffusers-file" (diffusers key names in one file), "diffusers" (a folder), or "diff"
    (original layout holding the difference to ``base_unet``, with a ``difference`` key)."""
    import torch
    from safetensors.torch import save_file

    from nodes.control.load import diffusers_to_original

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        net.save_pretrained(str(path), safe_serialization=True)
        return path
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if layout == "diff":
        base = base_unet.state_dict()
        state = {k: (v - base[k] if k in base else v) for k, v in state.items()}
    if layout != "diffusers-file":
        state = diffusers_to_original(state, path.name)
        if layout in ("original", "diff"):
            state = {"control_model." + k: v for k, v in state.items()}
        if layout == "diff":
            state["difference"] = torch.tensor([])
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
