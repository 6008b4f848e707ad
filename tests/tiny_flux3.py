"""A tiny random-weight FLUX.3 [klein] (base and step-distilled) for tests: the real architectures at toy sizes.

API:
    components(distilled) -> diffusers parts keyed as the FLUX.3 modular pipelines name them (cached; do not
                             mutate): transformer (Flux3Transformer2DModel, ``flow_map`` for the distilled one),
                             vae (the tiny FLUX.2's AutoencoderKLFlux2), text_encoder (Qwen3VLForConditionalGeneration,
                             32 layers so the taps 4..32 exist), tokenizer (:class:`Processor`), scheduler.
    pipeline(distilled, cfg) -> Flux3ModularPipeline / Flux3DistilledModularPipeline over them, the prompt
                             upsampler step taken out (the prompt is encoded as given).
    original_state(distilled) -> the transformer in BFL's key layout (flux3-image-klein*.safetensors).
    make_models_folder(root) -> ComfyUI's split files (see there).

The processor: the pipeline asks its tokenizer component for ``apply_chat_template`` and ``.tokenizer``
(transformers' Qwen3-VL processor); offline, :class:`Processor` gives both over Kiln's Qwen tokenizer with
:data:`CHAT_TEMPLATE`, Qwen3-VL's template cut to text turns, so the pipeline builds its prompt string
through the chat template independently of Kiln's own constant.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiny_flux2
import tiny_krea2
from flow_family_files import quiet_pipeline, save_split_transformer, save_state, with_chat_template

#: Transformer: 2 heads of 32, rope axes 4 x 8, one per-mode block per mode and one joint block.
HEADS, HEAD_DIM, AXES = 2, 32, (8, 8, 8, 8)
TEXT, TEXT_LAYERS = tiny_krea2.TEXT, 32  # Qwen3-VL width; the transformer reads 8 x TEXT (taps 4..32)
#: Qwen3-VL's chat template for text-only messages (no default system turn), with the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Processor:
    """What the pipeline reads of transformers' Qwen3-VL processor: the chat template and the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages: list, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, **kwargs)


def _perturb(module: Any, scale: float) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def build(distilled: bool, seed: int = 7) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from transformers import Qwen3VLForConditionalGeneration

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.families import flux3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux3Transformer2DModel(
            in_channels=128, cond_in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=len(flux3.TEXT_LAYERS) * TEXT, timestep_channels=64,
            axes_dims_rope=AXES, flow_map=distilled)
        _perturb(transformer, 0.15)
        torch.manual_seed(seed + 1)
        qwen = Qwen3VLForConditionalGeneration(tiny_krea2.text_config(TEXT_LAYERS))
        _perturb(qwen, 0.02)
    for m in (transformer, qwen):
        m.eval().requires_grad_(False)
    return {"transformer": transformer, "vae": tiny_flux2.components()["vae"], "text_encoder": qwen,
            "tokenizer": Processor(with_chat_template(qwen_tokenizer("3"), CHAT_TEMPLATE)),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=flux3.SHIFT)}


@functools.lru_cache(maxsize=None)
def components(distilled: bool = False) -> dict[str, Any]:
    """The parts; the base and the distilled share the text encoder (the base's) and the VAE."""
    parts = build(distilled)
    if distilled:
        parts["text_encoder"] = components(False)["text_encoder"]
    return parts


def pipeline(distilled: bool = False, cfg: float = 3.5) -> Any:
    """The modular pipeline over the tiny parts (its guider at ``cfg`` for the base), the upsampler taken out."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks

    blocks = (Flux3DistilledAutoBlocks if distilled else Flux3AutoBlocks)()
    blocks.sub_blocks.pop("prompt_upsampler", None)
    _quiet(blocks)
    pipe = blocks.init_pipeline()
    parts = dict(components(distilled))
    if not distilled:
        parts["guider"] = ClassifierFreeGuidance(guidance_scale=cfg)
    pipe.update_components(**parts)
    return pipe


def _quiet(block: Any) -> None:
    """Progress bars off in ``block`` and every block nested in it (the pipeline's own setter goes one level)."""
    if hasattr(block, "set_progress_bar_config"):
        block.set_progress_bar_config(disable=True)
    for sub in getattr(block, "sub_blocks", {}).values():
        _quiet(sub)


def original_state(distilled: bool = False) -> dict:
    from nodes.checkpoint.flux3_keys import diffusers_to_original

    state = components(distilled)["transformer"].state_dict()
    return {k: v.contiguous() for k, v in diffusers_to_original(state).items()}


def make_models_folder(root: Any) -> Path:
    """ComfyUI's folders with the tiny FLUX.3: diffusion_models/flux3-klein-tiny.safetensors (BFL keys),
    flux3-klein-tiny-prefixed.safetensors, flux3-klein-tiny-diffusers-keys.safetensors, the same three for
    flux3-klein-distilled-tiny, text_encoders/qwen3vl_4b-tiny.safetensors (ComfyUI's qwen3vl_4b layout) and
    vae/flux2-vae-tiny.safetensors."""
    root = Path(root)
    for distilled, stem in ((False, "flux3-klein-tiny"), (True, "flux3-klein-distilled-tiny")):
        diffusers_keys = {k: v.contiguous() for k, v in components(distilled)["transformer"].state_dict().items()}
        save_split_transformer(root / "diffusion_models", stem, original_state(distilled), diffusers_keys)
    save_state(root / "text_encoders" / "qwen3vl_4b-tiny.safetensors",
               tiny_krea2.comfy_text_state(components()["text_encoder"].model))
    save_state(root / "vae" / "flux2-vae-tiny.safetensors", tiny_flux2.vae_state())
    return root


def save_folder(folder: Any, distilled: bool = False) -> Path:
    """The tiny FLUX.3 as the modular pipeline's own ``save_pretrained`` writes it (modular_model_index.json,
    transformer/, text_encoder/, vae/), with the Qwen tokenizer in tokenizer/ as a real folder ships it (the
    offline :class:`Processor` stand-in cannot be saved)."""
    folder = Path(folder)
    pipeline(distilled).save_pretrained(str(folder), overwrite_modular_index=True)
    components(distilled)["tokenizer"].tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder
