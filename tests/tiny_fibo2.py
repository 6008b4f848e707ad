"""A tiny random-weight FIBO 2 for tests: the real architectures at toy sizes, in the files users have.

API:
    components()      -> diffusers parts keyed as BriaFibo2Pipeline names them (cached; do not mutate):
                         transformer (BriaFibo2Transformer2DModel), vae (tiny FLUX.2's AutoencoderKLFlux2),
                         text_encoder (tiny Krea 2's Qwen3-VL: 36 layers, so the taps 5..35 exist),
                         processor (Qwen3VLProcessor's text side over Kiln's Qwen3 tokenizer), scheduler.
    pipeline()        -> BriaFibo2Pipeline over them.
    make_models_folder(root) -> ComfyUI's split files (see there).

The gist schedule is the release's in proportion (16 learned queries: 8..16 gist tokens in steps of 2
over 8..64 text tokens), so prompts of a few dozen tokens get different gist counts.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, save_state

DIM, HEADS, LAYERS, GISTS = 64, 2, 5, 16


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (zero-initialised gates and modulations would hide inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


class TextProcessor:
    """Qwen3VLProcessor's text side (the pipeline's ``processor`` for text to image): Qwen3VLProcessor itself
    needs torchvision for its video half, which the venv lacks. Pictures are refused, not ignored."""

    def __init__(self) -> None:
        from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

        self.tokenizer = qwen_tokenizer("3")

    def __call__(self, text: Any, images: Any = None, **kwargs: Any) -> Any:
        assert images is None, "the tiny FIBO 2 processor reads no pictures"
        return self.tokenizer(text, **kwargs)


def processor() -> Any:
    return TextProcessor()


def build(seed: int = 5) -> dict[str, Any]:
    import torch
    from diffusers import BriaFibo2Transformer2DModel, FlowMatchEulerDiscreteScheduler

    import tiny_flux2
    import tiny_krea2
    from nodes.families import fibo2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = BriaFibo2Transformer2DModel(
            in_channels=32, patch_size=2, dim=DIM, n_layers=LAYERS, n_refiner_layers=1, n_heads=HEADS,
            cap_feat_dim=3 * tiny_krea2.TEXT, injection_layer_ids=(0, 1, 2, 3, 4), perceiver_num_layers=2,
            min_num_gist_tokens=GISTS // 2, max_num_gist_tokens=GISTS, gist_step=GISTS // 8,
            gist_min_text_len=GISTS // 2, gist_max_text_len=GISTS * 4, axes_dims=(8, 12, 12))
        _perturb(transformer, 0.2)
    transformer.eval().requires_grad_(False)
    config = {k: v for k, v in fibo2.SCHEDULER.items() if k not in ("_class_name", "prediction_type")
              and not k.startswith("kiln_")}
    return {"transformer": transformer, "vae": tiny_flux2.components()["vae"],
            "text_encoder": tiny_krea2.components()["text_encoder"], "processor": processor(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("BriaFibo2Pipeline", components())


def transformer_state() -> dict:
    return {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()}


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny FIBO 2: diffusion_models/tiny-fibo2.safetensors (diffusers' names,
    bare) and tiny-fibo2-prefixed.safetensors (``model.diffusion_model.``), text_encoders/
    tiny-qwen3vl_4b.safetensors (ComfyUI's Qwen3-VL layout), vae/tiny-flux2-vae.safetensors."""
    import tiny_flux2
    import tiny_krea2

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-fibo2", transformer_state())
    save_state(root / "text_encoders" / "tiny-qwen3vl_4b.safetensors", tiny_krea2.comfy_text_state())
    save_state(root / "vae" / "tiny-flux2-vae.safetensors", tiny_flux2.vae_state())
    return root
