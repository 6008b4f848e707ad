"""A tiny random-weight Anima for tests: the tiny Cosmos Predict2 DiT (tests/tiny_cosmos.py) with an LLM adapter,
a tiny Qwen3 (tests/tiny_qwen3.py, the full vocabulary) and the tiny Wan 2.1 VAE, in the files users have.

API:
    adapter()          -> nodes.checkpoint.anima_adapter.LLMAdapter at toy sizes (cached; do not mutate).
    transformer_state() -> the Anima file's tensors: the DiT in the original layout and ``llm_adapter.*``.
    make_models_folder(root) -> ComfyUI's files under the names the templates ask for (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_cosmos
import tiny_qwen3
from flow_family_files import save_split_transformer, save_state

QWEN_LAYERS = 2
#: The adapter at toy size: Qwen3's 48-wide states in, the DiT's text width out.
ADAPTER = dict(source=48, target=tiny_cosmos.TEXT, width=tiny_cosmos.TEXT, layers=2, heads=2, mlp=4 * tiny_cosmos.TEXT)
#: The files ComfyUI's Anima templates load (image_anima_base_v1, image_anima_preview).
TEMPLATE_FILES = ("anima-base-v1.0.safetensors", "anima-preview3-base.safetensors")


@functools.lru_cache(maxsize=None)
def adapter() -> Any:
    import torch

    from nodes.checkpoint.anima_adapter import LLMAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        module = LLMAdapter(**ADAPTER)
        with torch.no_grad():  # the norms start at ones: make them matter
            for name, p in module.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return module.eval().requires_grad_(False)


def transformer_state() -> dict:
    state = tiny_cosmos.original_state()
    state.update({"llm_adapter." + k: v.contiguous() for k, v in adapter().state_dict().items()})
    return state


def qwen_state() -> dict:
    return tiny_qwen3.file_state(vocab=tiny_qwen3.FULL_VOCAB, layers=QWEN_LAYERS, lm_head=False)


#: The LoRA's modules (original names) and the parameters they patch.
LORA_MODULES = {"blocks.0.self_attn.q_proj": "transformer_blocks.0.attn1.to_q.weight",
                "blocks.1.mlp.layer1": "transformer_blocks.1.ff.net.0.proj.weight"}


def lora_factors() -> dict:
    """module (original name) -> (down, up) of a seeded rank-4 LoRA on :data:`LORA_MODULES`."""
    from flow_family_lora import random_factors

    state = tiny_cosmos.original_state()
    return random_factors([(m, tuple(state[m + ".weight"].shape)) for m in LORA_MODULES], seed=9)


def make_models_folder(root: Any) -> Path:
    """diffusion_models/tiny-anima.safetensors (bare), -prefixed (``model.diffusion_model.``), -diffusers-keys
    (the DiT under diffusers' names), and the templates' anima-base-v1.0 / anima-preview3-base;
    loras/anima-turbo-lora-v0.2.safetensors (ComfyUI's names, the base template's) and tiny-anima-kohya.safetensors;
    text_encoders/qwen_3_06b_base.safetensors (the tiny Qwen3); vae/qwen_image_vae.safetensors (the tiny
    Wan 2.1 VAE in the Wan layout)."""
    from nodes.checkpoint.cosmos_keys import original_to_diffusers
    from nodes.checkpoint.qwen_image_vae import to_original

    root = Path(root)
    state = transformer_state()
    diffusers_keys = original_to_diffusers({k: v for k, v in state.items() if not k.startswith("pos_embedder.")})
    save_split_transformer(root / "diffusion_models", "tiny-anima", state, diffusers_keys)
    for name in TEMPLATE_FILES:
        save_state(root / "diffusion_models" / name, state)
    save_state(root / "text_encoders" / "qwen_3_06b_base.safetensors", qwen_state())
    from flow_family_lora import lora_file

    save_state(root / "loras" / "anima-turbo-lora-v0.2.safetensors", lora_file(lora_factors(), "comfy"))
    save_state(root / "loras" / "tiny-anima-kohya.safetensors", lora_file(lora_factors(), "kohya"))
    save_state(root / "vae" / "qwen_image_vae.safetensors", to_original(tiny_cosmos.components()["vae"].state_dict()))
    return root
