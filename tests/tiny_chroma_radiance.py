"""A tiny random-weight Chroma1-Radiance for tests: the real architecture at toy sizes.

API:
    network(x0=True)      -> ChromaRadianceTransformer (cached; do not mutate): the tiny Chroma's trunk sizes,
                             patch 4, NeRF width 8, two NeRF blocks of ratio 2, 3x3 cosine features, conv head.
    original_state(x0)    -> its tensors in ComfyUI's file layout (with the ``__x0__`` flag when x0).
    make_models_folder(root) -> diffusion_models/tiny-chroma-radiance.safetensors (x0, ComfyUI's prefix) and
                             tiny-chroma-radiance-v.safetensors (velocity, no prefix), text_encoders/tiny-t5xxl.
"""
from __future__ import annotations

import functools
from typing import Any

import tiny_chroma
import tiny_flux

PATCH, NERF_HIDDEN, NERF_DEPTH, NERF_RATIO, NERF_FREQS = 4, 8, 2, 2, 3


def trunk_config() -> dict[str, Any]:
    return dict(patch_size=1, in_channels=tiny_chroma.HEADS * tiny_chroma.HEAD_DIM, num_layers=1, num_single_layers=1,
                attention_head_dim=tiny_chroma.HEAD_DIM, num_attention_heads=tiny_chroma.HEADS,
                joint_attention_dim=tiny_chroma.TEXT, axes_dims_rope=tiny_chroma.AXES, approximator_num_channels=16,
                approximator_hidden_dim=64, approximator_layers=2)


@functools.lru_cache(maxsize=None)
def network(x0: bool = True, seed: int = 3) -> Any:
    import torch

    from nodes.checkpoint.chroma_radiance_net import ChromaRadianceTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ChromaRadianceTransformer(trunk_config(), channels=3, patch_size=PATCH, nerf_hidden=NERF_HIDDEN,
                                        nerf_depth=NERF_DEPTH, nerf_mlp_ratio=NERF_RATIO, nerf_freqs=NERF_FREQS,
                                        head="conv", x0=x0, joint_attention_dim=tiny_chroma.TEXT)
        tiny_flux._perturb(net, 0.05)
    return net.eval()


def original_state(x0: bool = True) -> dict:
    from nodes.checkpoint.chroma_radiance_keys import diffusers_to_original

    return diffusers_to_original(dict(network(x0).state_dict()), x0=x0)


def make_models_folder(root: Any) -> Any:
    from pathlib import Path

    root = Path(root)
    for sub in ("diffusion_models", "text_encoders", "vae", "checkpoints"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tiny_flux._save(root / "diffusion_models" / "tiny-chroma-radiance.safetensors",
                    {"model.diffusion_model." + k: v for k, v in original_state(True).items()})
    tiny_flux._save(root / "diffusion_models" / "tiny-chroma-radiance-v.safetensors", original_state(False))
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    return root
