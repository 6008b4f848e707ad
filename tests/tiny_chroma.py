"""A tiny random-weight Chroma for tests: the real architecture at toy sizes.

API:
    components()          -> diffusers parts keyed as ChromaPipeline names them (cached; do not mutate):
                             transformer, vae, text_encoder (T5), tokenizer, scheduler.
    pipeline(cls=None)    -> ChromaPipeline (or cls, e.g. ChromaImg2ImgPipeline) over them.

The VAE, T5 and tokenizer are the tiny FLUX's (tests/tiny_flux.py): Chroma uses FLUX's
16-channel VAE and FLUX's T5-XXL, so sharing them is what the real files do too.
"""
from __future__ import annotations

import functools
from typing import Any

import tiny_flux

#: Transformer: 2 heads of 32, rope axes as the tiny FLUX's, one double and one single block.
HEADS, HEAD_DIM, AXES = 2, 32, (4, 14, 14)
TEXT = tiny_flux.TEXT  # T5 width = joint attention width


def build(seed: int = 1) -> dict[str, Any]:
    import torch
    from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from nodes.families import chroma

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=TEXT, axes_dims_rope=AXES,
            approximator_num_channels=16, approximator_hidden_dim=64, approximator_layers=2)
        tiny_flux._perturb(transformer, 0.05)
        transformer.eval()
    flux_parts = tiny_flux.components("dev")
    config = {k: v for k, v in chroma.FAMILY.scheduler_config().items() if k not in ("_class_name", "prediction_type")}
    return {"transformer": transformer, "vae": flux_parts["vae"], "text_encoder": flux_parts["text_encoder_2"],
            "tokenizer": flux_parts["tokenizer_2"], "scheduler": FlowMatchEulerDiscreteScheduler(**config)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline(cls: Any = None) -> Any:
    if cls is None:
        from diffusers import ChromaPipeline as cls
    pipe = cls(**dict(components()), image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
