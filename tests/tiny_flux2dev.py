"""A tiny random-weight FLUX.2 [dev] for tests: the real architectures at toy sizes, in the files users have.

API:
    components()      -> diffusers parts keyed as Flux2Pipeline names them (cached; do not mutate):
                         transformer (guidance embedder), vae (tiny_flux2's), text_encoder
                         (Mistral3ForConditionalGeneration, 40 layers, a Pixtral tower), tokenizer (Kiln's
                         Tekken tokenizer over :func:`tekken_json`, with :data:`CHAT_TEMPLATE`), scheduler.
    pipeline()        -> Flux2Pipeline over them.
    tekken_json()     -> a small tekken.json: Tekken's control tokens at their ranks, BPE ranks trained here.
    mistral_state(layers, layout) -> the text encoder as a file holds it (see there).
    make_models_folder(root) -> ComfyUI's split files under the names the templates ask for.

The chat template is Mistral Small 3's cut to what Flux2Pipeline asks of it (a system turn, one user
turn of text), so diffusers builds its token ids through ``apply_chat_template`` independently of
Kiln's own constant (nodes.families.flux2_dev.TEMPLATE).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flow_family_files import with_chat_template
import tiny_flux2
from tiny_tekken import tekken_file

MISTRAL = 32  # Mistral width; the transformer reads 3 x MISTRAL (layers 10, 20, 30 stacked)
#: Tekken's control tokens at their ranks (``<pad>`` is 11, ComfyUI's pad token), fillers after them.
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
            "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
NUM_SPECIAL = 24
CORPUS = ("You are an AI that reasons about image descriptions. You give structured responses focusing on object "
          "relationships, object\nattribution and actions without speculation. a red barn in a field, a lighthouse "
          "on a cliff at dawn, the cat sat on the mat ") * 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{ '[SYSTEM_PROMPT]' + message.content[0].text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message.role == 'user' %}{{ '[INST]' + message.content[0].text + '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)
#: The file names ComfyUI's FLUX.2 [dev] templates ask for.
NAMES = dict(unet="flux2_dev_fp8mixed.safetensors", clip="mistral_3_small_flux2_bf16.safetensors",
             clip_fp8="mistral_3_small_flux2_fp8.safetensors", vae="flux2-vae.safetensors",
             vae_small="full_encoder_small_decoder.safetensors", lora="Flux_2-Turbo-LoRA_comfyui.safetensors")


@functools.lru_cache(maxsize=None)
def tekken_json() -> bytes:
    return tekken_file(CORPUS, 120, SPECIALS, NUM_SPECIAL)[0]


def tokenizer() -> Any:
    from nodes.checkpoint.tekken_tokenizer import tekken_tokenizer

    tok = with_chat_template(tekken_tokenizer(tekken_json()), CHAT_TEMPLATE)
    return tok


def build(seed: int = 7) -> dict[str, Any]:
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_flux2.make_transformer(3 * MISTRAL, guidance=True)
        text = MistralConfig(vocab_size=512, hidden_size=MISTRAL, intermediate_size=2 * MISTRAL, num_hidden_layers=40,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e9,
                             rms_norm_eps=1e-5, max_position_embeddings=2048, sliding_window=None)
        vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8, head_dim=8)
        mistral = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                                  image_token_index=10, spatial_merge_size=2))
        tiny_flux2._perturb(transformer, 0.15)
        tiny_flux2._perturb(mistral, 0.02)
        with torch.no_grad():  # a guidance embedding strong enough that its value shows in the image
            for p in transformer.time_guidance_embed.guidance_embedder.parameters():
                p.mul_(3.0)
        transformer.eval()
        mistral.eval()
    parts = tiny_flux2.components()
    return {"transformer": transformer, "vae": parts["vae"], "text_encoder": mistral, "tokenizer": tokenizer(),
            "scheduler": parts["scheduler"]}


@functools.lru_cache(maxsize=None)
def components() -> dict[str, Any]:
    return build()


def pipeline() -> Any:
    from flow_family_files import quiet_pipeline

    return quiet_pipeline("Flux2Pipeline", components())


def prompt_embeds(prompt: str) -> Any:
    """The pipeline's own prompt embeddings at ComfyUI's token ids: ``_get_mistral_3_small_prompt_embeds``
    with the sequence as long as the prompt (no padding tokens), so the ids are ComfyUI's."""
    import torch

    parts = components()
    pipe = pipeline()
    n = len(pipe.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": pipe.system_message}]},
          {"role": "user", "content": [{"type": "text", "text": prompt}]}]], tokenize=True)[0])
    with torch.no_grad():
        return pipe._get_mistral_3_small_prompt_embeds(parts["text_encoder"], parts["tokenizer"], prompt,
                                                        max_sequence_length=n, device=torch.device("cpu"))


def padded(embeds: Any) -> Any:
    """Prompt embeddings with zero tokens before them up to 512, as ComfyUI's FLUX.2 model feeds them."""
    import torch

    return torch.cat([embeds.new_zeros(embeds.shape[0], 512 - embeds.shape[1], embeds.shape[2]), embeds], dim=1)


def mistral_state(layers: int = 40, layout: str = "comfy") -> dict:
    """The text encoder as a file holds it: ``comfy`` (Comfy-Org's: the language model under ``model.``,
    ``tekken_model`` beside it; ``layers`` < 40 a pruned file, without the final norm), ``notekken`` (the
    same without the tokenizer) or ``whole`` (Mistral3ForConditionalGeneration's own keys, vision tower,
    projector and lm_head included, with ``tekken_model``)."""
    import torch

    model = components()["text_encoder"]
    tekken = torch.frombuffer(bytearray(tekken_json()), dtype=torch.uint8)
    if layout == "whole":
        return {**{k: v.clone() for k, v in model.state_dict().items()}, "tekken_model": tekken}
    out = {}
    for k, v in model.model.language_model.state_dict().items():
        if k.startswith("layers.") and int(k.split(".")[1]) >= layers or (k == "norm.weight" and layers < 40):
            continue
        out["model." + k] = v.clone()
    if layout == "comfy":
        out["tekken_model"] = tekken
    return out


def original_transformer() -> dict:
    """The transformer in BFL's key layout (what flux2_dev*.safetensors files hold)."""
    from nodes.checkpoint.flux2_keys import diffusers_to_original

    return diffusers_to_original(components()["transformer"].state_dict())


def save_diffusers(folder: str | Path) -> Path:
    """Flux2Pipeline.save_pretrained, with the release's ``tokenizer/tekken.json`` beside what the tokenizer saves."""
    folder = Path(folder)
    pipeline().save_pretrained(str(folder), safe_serialization=True)
    (folder / "tokenizer" / "tekken.json").write_bytes(tekken_json())
    return folder


def make_models_folder(root: str | Path) -> Path:
    """ComfyUI's folders with the tiny [dev] under the templates' names (:data:`NAMES`; the fp8 name holds
    ComfyUI's scaled fp8, the unet name BFL's layout) and flux2-dev-tiny-diffusers-keys.safetensors
    (diffusers' layout), mistral_pruned.safetensors (30 layers), mistral_whole.safetensors
    (Mistral3ForConditionalGeneration's keys), mistral_notekken.safetensors, mistral_fp8mixed.safetensors
    (ComfyUI's mixed-precision fp8) and the dequantised twins of the fp8 files; the [klein] VAE; and
    diffusers/flux2-dev-tiny/ (:func:`save_diffusers`)."""
    from test_scaled_fp8 import quantise, quantise_mixed
    from tiny_flux import _save

    root = Path(root)
    _save(root / "diffusion_models" / NAMES["unet"], original_transformer())
    _save(root / "diffusion_models" / "flux2-dev-tiny-diffusers-keys.safetensors",
          dict(components()["transformer"].state_dict()))
    text = root / "text_encoders"
    _save(text / NAMES["clip"], mistral_state())
    scaled, plain = quantise({k: v for k, v in mistral_state().items() if k != "tekken_model"})
    tekken = mistral_state()["tekken_model"]
    _save(text / NAMES["clip_fp8"], {**scaled, "tekken_model": tekken})
    _save(text / "mistral_dequantised.safetensors", {**plain, "tekken_model": tekken})
    kept = {k: mistral_state()[k] for k in ("tekken_model", "model.embed_tokens.weight")}
    mixed, plain = quantise_mixed({k: v for k, v in mistral_state().items() if k not in kept})
    _save(text / "mistral_fp8mixed.safetensors", {**mixed, **kept})
    _save(text / "mistral_fp8mixed_dequantised.safetensors", {**plain, **kept})
    _save(text / "mistral_pruned.safetensors", mistral_state(30))
    _save(text / "mistral_whole.safetensors", mistral_state(layout="whole"))
    _save(text / "mistral_notekken.safetensors", mistral_state(layout="notekken"))
    _save(root / "vae" / NAMES["vae"], tiny_flux2.vae_state())
    _save(root / "vae" / NAMES["vae_small"], tiny_flux2.vae_state())  # the name only: Kiln reads both variants
    save_diffusers(root / "diffusers" / "flux2-dev-tiny")
    return root
