"""A tiny random-weight ERNIE-Image for tests: the real architectures at toy sizes, in the files users have.

API:
    components()        -> diffusers parts keyed as ErnieImagePipeline names them (cached; do not mutate):
                           transformer, vae (AutoencoderKLFlux2), text_encoder (Mistral3Model: a tiny
                           Ministral 3 with a Pixtral tower, as the release), tokenizer (the tiny Tekken
                           vocabulary, ``<s>`` first as the release's tokenizer adds it), scheduler.
    pipeline()          -> ErnieImagePipeline over them (no prompt enhancer).
    comfy_text_state()  -> Ministral 3 as Comfy-Org's ministral-3-3b file holds it (``model.``, ``tekken_model``).
    make_models_folder(root) -> ComfyUI's split files (see there).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import quiet_pipeline, save_split_transformer, save_state

#: Transformer: 2 heads of 32, two shared-adaLN blocks; Ministral 3 TEXT wide, 3 layers (the pipeline
#: reads the second to last), 4 query heads of 8 over 2 key/value heads, the tiny Tekken's 325 tokens.
HIDDEN, HEADS, LAYERS, TEXT, TEXT_LAYERS, VOCAB = 64, 2, 2, 32, 3, 325
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def _perturb(module: Any, scale: float) -> None:
    """Random weights everywhere (the zero-initialised modulation and output layers would hide inputs)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def text_config() -> Any:
    from transformers import Ministral3Config

    return Ministral3Config(vocab_size=VOCAB, hidden_size=TEXT, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def tokenizer(bos: bool = True) -> Any:
    """The tiny Tekken tokenizer; with ``bos`` it puts ``<s>`` first, as the release's tokenizer.json does."""
    from tokenizers.processors import TemplateProcessing

    from nodes.checkpoint.tekken_tokenizer import tekken_tokenizer
    from tiny_tekken import tekken_json

    tok = tekken_tokenizer(tekken_json()[0])
    if bos:
        tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def build(seed: int = 5) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLFlux2, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Config, Mistral3Model, PixtralVisionConfig

    from nodes.checkpoint.ernie_image_keys import rope_axes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ErnieImageTransformer2DModel(
            hidden_size=HIDDEN, num_attention_heads=HEADS, num_layers=LAYERS, ffn_hidden_size=96, in_channels=128,
            out_channels=128, patch_size=1, text_in_dim=TEXT, rope_axes_dim=tuple(rope_axes(HIDDEN // HEADS)))
        _perturb(transformer, 0.15)
        vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=16, head_dim=8)
        text_encoder = Mistral3Model(Mistral3Config(text_config=text_config(), vision_config=vision))
        _perturb(text_encoder, 0.05)
        vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32,
                                 norm_num_groups=32, sample_size=64)
        _perturb(vae, 0.02)
        with torch.no_grad():  # batch-norm statistics far from (0, 1), so the normalisation is tested
            vae.bn.running_mean.copy_(torch.randn(128) * 0.5)
            vae.bn.running_var.copy_(torch.rand(128) * 2 + 0.5)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    return quiet_pipeline("ErnieImagePipeline", components())


def comfy_text_state(with_tekken: bool = True) -> dict:
    """Comfy-Org's ministral-3-3b layout: the language model under ``model.``, the tokenizer's tekken.json
    as the uint8 tensor ``tekken_model`` (left out when not ``with_tekken``); no vision tower."""
    import torch

    from tiny_tekken import tekken_json

    out = {"model." + k[len("language_model."):]: v.contiguous()
           for k, v in components()["text_encoder"].state_dict().items() if k.startswith("language_model.")}
    if with_tekken:
        out["tekken_model"] = torch.frombuffer(bytearray(tekken_json()[0]), dtype=torch.uint8)
    return out


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny ERNIE-Image: diffusion_models/tiny-ernie.safetensors (bare names),
    tiny-ernie-prefixed.safetensors (``model.diffusion_model.``), text_encoders/tiny-ministral-3-3b.safetensors,
    vae/tiny-flux2-vae.safetensors (the original layout with ``bn.*``) and checkpoints/tiny-ernie-diffusers/
    (ErnieImagePipeline.save_pretrained)."""
    from tiny_flux2 import vae_state

    root = Path(root)
    save_split_transformer(root / "diffusion_models", "tiny-ernie",
                           {k: v.contiguous() for k, v in components()["transformer"].state_dict().items()})
    save_state(root / "text_encoders" / "tiny-ministral-3-3b.safetensors", comfy_text_state())
    save_state(root / "vae" / "tiny-flux2-vae.safetensors", vae_state(components()["vae"]))
    pipeline().save_pretrained(str(root / "checkpoints" / "tiny-ernie-diffusers"), safe_serialization=True)
    return root


@functools.lru_cache(maxsize=None)
def prompt_enhancer() -> Any:
    """A tiny Ministral3ForCausalLM (the prompt enhancer's architecture: Ministral 3 with its own head)."""
    import torch
    from transformers import Ministral3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = Ministral3ForCausalLM(text_config())
        _perturb(model, 0.05)
    return model.eval().requires_grad_(False)


def comfy_pe_state() -> dict:
    """Comfy-Org's ernie-image-prompt-enhancer layout: ``model.``, ``lm_head.weight`` and ``tekken_model``."""
    import torch

    from tiny_tekken import tekken_json

    out = {k: v.contiguous() for k, v in prompt_enhancer().state_dict().items()}
    out["tekken_model"] = torch.frombuffer(bytearray(tekken_json()[0]), dtype=torch.uint8)
    return out
