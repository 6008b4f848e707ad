"""Loading Krea 2 offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/krea2_turbo_*.safetensors``: bf16,
  fp8_scaled, int8_convrot) in Krea's key layout (with or without ``model.diffusion_model.``) or in
  diffusers' layout in one file; the key map is nodes.checkpoint.krea2_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, fp8/int8 scales following
  the renames through nodes.checkpoint.scaled_fp8).
* Qwen3-VL 4B through CLIPLoader type ``krea2`` (``qwen3vl_4b*.safetensors``): ComfyUI's file holds
  the language model under ``model.`` (Qwen3's names: q_norm / k_norm) and the vision tower under
  ``visual.``. Kiln builds transformers' ``Qwen3VLModel`` from the shapes (:func:`build_encoder`): the
  language model at load, the vision tower when a job first hands the encoder a picture (the nodes that
  read pictures: nodes.families.qwen3_vl; the tower: nodes.checkpoint.qwen3_vision); text-to-image runs
  the language model alone. A file without ``visual.*`` gives the language model alone
  (:func:`build_text_model`).
* The VAE is Qwen-Image's (``qwen_image_vae.safetensors``, VAELoader: nodes.checkpoint.qwen_image_vae).
* A diffusers folder (``Krea2Pipeline.save_pretrained``) through CheckpointLoaderSimple.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import krea2_keys as keys
from nodes.checkpoint import qwen_vision
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import CheckpointError, Loaded

LABEL = "Krea 2"
#: Qwen3-VL's language model in a ComfyUI file (``model.``), transformers 5's save, or bare.
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.", "")
VISION_PREFIXES = qwen_vision.PREFIXES
#: What Qwen3-VL releases set and the shapes do not show (Qwen3-VL-4B-Instruct's config).
ROPE_THETA = 5_000_000.0
MROPE_128 = (24, 20, 20)
MAX_POSITIONS = 262144


def has_transformer(keys_: Any) -> bool:
    """A Krea 2 transformer in either layout, with or without ComfyUI's prefix."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def norms_in_fp32(model: Any, state: Mapping[str, Any]) -> Any:
    """``model`` with its RMSNorm scales in float32, read again from the file (``state``, either layout,
    prefix or not), whatever the model computes in: diffusers keeps them so (``_keep_in_fp32_modules``),
    and the scale is ``1 + w``, which a bf16 copy would round to 1/128. The shared rule
    (nodes.checkpoint.kept_fp32.keep_in_fp32) with Krea 2's names; usable per block (it skips layers still
    on the meta device). Returns ``model``."""
    from nodes.checkpoint.kept_fp32 import keep_in_fp32

    return keep_in_fp32(model, state, lambda name: (name, keys.to_original_name(name)))


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout (krea2_keys' renames and the blocks' table reshape keep each tensor's rows in a build straight into
#: disk blocks), the norm scales in float32 from the file last in both builds (:func:`norms_in_fp32`).
FILES = TransformerFiles("Krea2Transformer2DModel", keys, "krea2", LABEL, after=norms_in_fp32)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- the text encoder -------------------------------------------------------------------------------


def is_qwen3_vl(keys_: Any) -> bool:
    """A Qwen3-VL file: a Qwen3-style decoder (q_norm) and a vision tower beside it."""
    from nodes.checkpoint.qwen3_text import is_qwen3

    keys_ = list(keys_)
    return is_qwen3(keys_) and any(k.startswith(VISION_PREFIXES) for k in keys_)


def text_prefix(keys_: Any) -> str | None:
    from nodes.checkpoint.qwen_decoder import Q_NORM, decoder_prefix

    return decoder_prefix(keys_, TEXT_PREFIXES, Q_NORM)


def text_config(shapes: Mapping[str, tuple[int, ...]], what: str) -> Any:
    """Qwen3VLTextConfig from the shapes of bare language-model keys (the sizes: Qwen3's rule,
    nodes.checkpoint.qwen_decoder.decoder_sizes); its own are the release's rope settings, the mrope
    sections scaled to the head width."""
    from transformers import Qwen3VLTextConfig

    from nodes.checkpoint.qwen_decoder import decoder_sizes

    sizes = decoder_sizes(shapes, what, "Qwen3-VL language model")
    head = sizes.q_norm
    sections = [s * head // 128 for s in MROPE_128]
    sections[0] += head // 2 - sum(sections)
    return Qwen3VLTextConfig(**sizes.fields(), rms_norm_eps=1e-6, max_position_embeddings=MAX_POSITIONS,
                             use_cache=False, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                                                               "mrope_section": sections, "mrope_interleaved": True})


def build_text_model(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """transformers' ``Qwen3VLTextModel`` holding the language model of a Qwen3-VL file (``lm_head`` and
    the vision tower left unread); fp8_scaled / int8 layers get their scales (nodes.checkpoint.scaled_fp8).
    A file that holds no Qwen3-style decoder is a CheckpointError naming it."""
    from transformers import Qwen3VLTextModel

    from nodes.checkpoint.qwen_decoder import decoder_from_file

    prefix = text_prefix(state.keys())
    if prefix is None:
        raise CheckpointError(f"{what} holds no Qwen3-VL language model (no model.layers.0.self_attn.q_norm.weight "
                              "with model.embed_tokens.weight); CLIPLoader type krea2 needs qwen3vl_4b*.safetensors")
    return decoder_from_file(state, prefix, what, dtype, Qwen3VLTextModel, lambda shapes: text_config(shapes, what),
                             "Qwen3-VL text encoder")


def build_encoder(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """The Qwen3-VL of a file as the loaders build it for the families that hand it pictures: when the
    file holds ``visual.*``, transformers' ``Qwen3VLModel`` with :func:`build_text_model`'s language model
    and the vision tower left to build on the first picture read (nodes.checkpoint.qwen3_vision
    .with_tower_on_demand: a text-only job never holds the tower's weights, about 0.4B parameters in
    Qwen3-VL 4B); else the text model alone. Text-only encoding runs that same language model either way."""
    from nodes.checkpoint import qwen3_vision

    text = build_text_model(state, what, dtype)
    visual = qwen3_vision.vision_view(state)
    if not visual:
        return text
    return qwen3_vision.with_tower_on_demand(text, visual, what, dtype, "Qwen3-VL vision tower")


# -- diffusers folders ----------------------------------------------------------------------------


def is_krea2_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Krea 2's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Krea 2 folder (``Krea2Pipeline.save_pretrained``: transformer, Qwen3-VL, Qwen-Image VAE,
    tokenizer, scheduler), through :func:`qwen3_vl_folder`. The pipeline's ``is_distilled``
    (model_index.json) picks the shift as Krea2Pipeline does: Turbo's fixed mu 1.15, else the folder's
    scheduler config by image size."""
    import dataclasses
    import json

    from diffusers import Krea2Transformer2DModel

    from nodes.families import krea2 as fam

    loaded = qwen3_vl_folder(path, dtype, offload, fam.FAMILY, LABEL, Krea2Transformer2DModel, norms_in_fp32)
    try:
        distilled = bool(json.loads((path / "model_index.json").read_text()).get("is_distilled", False))
    except (OSError, ValueError):
        distilled = False
    if distilled:
        config = dict(loaded.scheduler_config, use_dynamic_shifting=True, base_shift=fam.TURBO_MU,
                      max_shift=fam.TURBO_MU)
        loaded = dataclasses.replace(loaded, scheduler_config=config)
    return loaded


def qwen3_vl_folder(path: Path, dtype: Any, offload: Any, family: Any, label: str, transformer_class: Any,
                    fp32_from_file: Any) -> Loaded:
    """A diffusers folder of a family on Qwen3-VL and the Qwen-Image (Wan 2.1) VAE (Krea 2, JoyImage),
    through nodes.checkpoint.flow_transformers.load_pipeline_folder: the VAE, Qwen3-VL (its vision tower,
    when saved, built on demand: :func:`build_encoder`), the folder's tokenizer (else Kiln's Qwen3 one),
    the family's latent statistics. ``fp32_from_file(model, files)`` puts the modules the class keeps in
    float32 back in float32 from ``transformer/``'s files (nodes.checkpoint.kept_fp32), also per block
    in a build straight into disk blocks."""
    from transformers import Qwen2TokenizerFast

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.qwen_image_load import vae_and_text_encoder
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    found = folder_state(path / "transformer", dtype)
    files = {} if found is None else found[1]
    return load_pipeline_folder(path, dtype, offload, family, label, transformer_class,
                                lambda: vae_and_text_encoder(path, dtype, build_encoder),
                                lambda: folder_tokenizer(path, Qwen2TokenizerFast, lambda: qwen_tokenizer("3")),
                                latent_from_vae=False, ready=lambda model: fp32_from_file(model, files),
                                ready_in_blocks=True)
