"""Models kept as separate files, as ComfyUI users store them: a UNet, text encoders.

A UNet file may be in the original layout (with or without
``model.diffusion_model.``) or diffusers' (``down_blocks.*``); either is brought to
the original layout and goes through the same detection and conversion as a
checkpoint. A text-encoder file may be in transformers' layout (transformers 4
or 5 keys, with or without ``text_model.``) or OpenCLIP's. A file whose keys do
not fit names the expected family and what is missing or unexpected; the wrong
kind of file (a CLIP given as a UNet, a VAE, a LoRA) says which loader it needs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nodes import families
from nodes.checkpoint import detect as det
from nodes.checkpoint.load import CheckpointError, Loaded, build_sd_unet, build_text_encoder, open_state, reading
from nodes.checkpoint.tensors import plain, shapes_of
from nodes.families.base import Family, has_prefix
from nodes.runtime.precision import resolve


#: How errors name the text encoder kinds.
KIND_NAMES = {"openai": "CLIP-L", "openclip": "OpenCLIP", "t5": "T5-XXL", "umt5": "UMT5-XXL", "qwen3": "Qwen3",
              "qwen2.5-vl": "Qwen2.5-VL", "qwen3-vl": "Qwen3-VL", "llama3": "Llama 3.1", "ministral3": "Ministral 3",
              "mistral3": "Mistral Small 3", "gemma2": "Gemma 2", "byt5": "ByT5",
              "pile_t5": "Pile-T5-XL"}
#: The Comfy-Org files that carry each Mistral encoder's tokenizer, for the error when one is missing.
TEKKEN_FILES = {"ministral3": "ministral-3-3b.safetensors", "mistral3": "mistral_3_small_flux2_*.safetensors"}
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
#: ComfyUI CLIPLoader types naming no model family Kiln has, under which ComfyUI picks the encoder by
#: the file alone; a causal-LM file loads as the family of its encoder kind there, as in ComfyUI (its
#: TextGenerate template llm_qwen3_text_gen loads qwen_3_4b as "ltxv": Z-Image's Qwen3).
BY_FILE_TYPES = ("ltxv",)
BY_FILE_FAMILY = {"qwen3": "lumina2", "qwen2.5-vl": "qwen_image"}


def _what_else(name: str, shapes: dict[str, tuple]) -> str:
    """Why a file is not a UNet, in the user's terms."""
    from nodes.checkpoint.llama_text import is_llama
    from nodes.checkpoint.qwen3_text import is_qwen3  # Qwen3 / Qwen3-VL language models too
    from nodes.checkpoint.qwen_image_load import text_prefix as qwen25_prefix  # Qwen2.5-VL

    if (det.text_encoder_layout(shapes) is not None or is_qwen3(shapes) or qwen25_prefix(shapes) is not None
            or is_llama(shapes)):
        return f"{name} holds a text encoder (CLIP), not a diffusion model; load it with CLIPLoader"
    if has_prefix(shapes, "encoder.down") or has_prefix(shapes, "first_stage_model."):
        return f"{name} holds a VAE, not a diffusion model; load it with VAELoader"
    if any(k.startswith("lora_") or ".lora_" in k for k in shapes):
        return f"{name} is a LoRA, not a diffusion model; load it with LoraLoader"
    return f"{name} holds no UNet Kiln knows (no input_blocks.* or down_blocks.* keys; e.g. {sorted(shapes)[:3]})"


def unet_to_original_layout(state: Any, name: str) -> Any:
    """The UNet's tensors under ``model.diffusion_model.`` in the original layout.

    A renamed view of ``state``: the keys are mapped, no tensor is read.
    """
    from nodes.checkpoint.tensors import LazyState
    from nodes.checkpoint.to_original import unet_to_original

    keys = {k: k for k in state}  # new name -> this state's name; the tensors are read later, once
    if has_prefix(keys, det.UNET):
        renames = {k: k for k in keys if k.startswith(det.UNET)}
    elif has_prefix(keys, "input_blocks.") and has_prefix(keys, "middle_block."):
        renames = {det.UNET + k: k for k in keys}
    elif has_prefix(keys, "down_blocks.") and "conv_in.weight" in keys:
        try:
            renames = unet_to_original(keys, det.unet_layout_config(shapes_of(state)))
        except KeyError as exc:
            raise CheckpointError(f"{name}: a diffusers-layout UNet with a key Kiln does not know ({exc})") from None
    else:
        raise CheckpointError(_what_else(name, shapes_of(state)))
    if isinstance(state, LazyState):
        return state.renamed(renames)
    return {new: state[old] for new, old in renames.items()}


def load_unet_file(path: Path, dtype: Any, fp8: str = "", offload: Any = None) -> Loaded:
    """A diffusion model alone (UNETLoader): family from its shapes, no text encoder or VAE.
    ``dtype``: a dtype, or the model manager's rule resolved for the family found (nodes.runtime.precision).
    ``offload``: the model manager's plan for the denoiser, asked before building (a FLUX
    transformer, or SD3, Z-Image, FLUX.2, Chroma or Qwen-Image one, that will be paged to disk is built
    straight into its blocks; see nodes.checkpoint.flux_load.OffloadAsk and nodes.checkpoint.paged_files)."""
    state = open_state(path)
    keys = {k: () for k in state}
    for claims, load, family in _transformer_loaders():
        if claims(keys):
            with reading(path):
                return load(state, path.name, resolve(dtype, family), fp8=fp8, offload=offload)
    state = unet_to_original_layout(state, path.name)
    with reading(path):
        return _build_unet(path, state, dtype, offload)


def _transformer_loaders() -> tuple[tuple[Any, Any, Family], ...]:
    """(claims the keys, loads the file, the family whose dtypes it computes in), tried in order: where two
    could claim one file, the more specific comes first."""
    from nodes.checkpoint import (chroma_load, chroma_radiance_load, cosmos_load, ernie_image_load, fibo2_load, flux2_load, flux3_load,
                                  flux_load, hidream_load, hunyuan_image_load, hunyuan_video15_load, ideogram4_load,
                                  joyimage_load, kandinsky5_load, krea2_load, longcat_load, lumina2_load, ovis_load,
                                  pixart_load, qwen_image21_load, qwen_image_load, sd3_load, wan_load, z_image_load)
    from nodes.families import (anima, chroma, chroma_radiance, cosmos, ernie_image, fibo2, flux, flux2, flux3, hidream,
                                hunyuan_image, hunyuan_video15, ideogram4, joyimage, kandinsky5, krea2, longcat, lumina2,
                                ovis, pixart, qwen_image, qwen_image21, sd3, wan, z_image)

    from nodes.checkpoint import auraflow_load, omnigen2_load
    from nodes.families import auraflow, omnigen2

    return ((auraflow_load.has_transformer, auraflow_load.load_transformer_file, auraflow.FAMILY),
            (sd3.is_sd3_transformer, sd3_load.load_transformer_file, sd3.FAMILY),
            (flux3_load.has_transformer, flux3_load.load_transformer_file, flux3.FAMILY),  # FLUX's txt_in too
            (cosmos_load.has_transformer, cosmos_load.load_transformer_file, cosmos.FAMILY),  # its own key names
            (cosmos_load.has_anima_transformer, cosmos_load.load_anima_file, anima.FAMILY),  # Cosmos' + llm_adapter
            (z_image_load.has_z_image_transformer, z_image_load.load_transformer_file, z_image.FAMILY),
            (omnigen2_load.has_transformer, omnigen2_load.load_transformer_file, omnigen2.FAMILY),  # Lumina 2's too
            (lumina2_load.has_transformer, lumina2_load.load_transformer_file, lumina2.FAMILY),  # Z-Image's names
            (fibo2_load.has_transformer, fibo2_load.load_transformer_file, fibo2.FAMILY),
            (ernie_image_load.has_transformer, ernie_image_load.load_transformer_file, ernie_image.FAMILY),
            (ideogram4_load.has_transformer, ideogram4_load.load_transformer_file, ideogram4.FAMILY),
            (joyimage_load.has_transformer, joyimage_load.load_transformer_file, joyimage.FAMILY),
            (krea2_load.has_transformer, krea2_load.load_transformer_file, krea2.FAMILY),
            (wan_load.has_transformer, wan_load.load_transformer_file, wan.FAMILY),
            (kandinsky5_load.has_transformer, kandinsky5_load.load_transformer_file, kandinsky5.FAMILY),
            (hunyuan_video15_load.has_transformer, hunyuan_video15_load.load_transformer_file,  # HunyuanImage's
             hunyuan_video15.FAMILY),  # names and more: before it
            (hunyuan_image_load.has_transformer, hunyuan_image_load.load_transformer_file, hunyuan_image.FAMILY),
            (ovis_load.has_transformer, ovis_load.load_transformer_file, ovis.FAMILY),  # FLUX's blocks too
            (hidream_load.has_transformer, hidream_load.load_transformer_file, hidream.FAMILY),
            (flux2_load.has_flux2_transformer, flux2_load.load_transformer_file, flux2.FAMILY),  # FLUX's blocks too
            (qwen_image_load.has_transformer, qwen_image_load.load_transformer_file, qwen_image.FAMILY),
            (qwen_image21_load.has_transformer, qwen_image21_load.load_transformer_file, qwen_image21.FAMILY),
            (longcat_load.has_transformer, longcat_load.load_transformer_file, longcat.FAMILY),  # FLUX's blocks too
            (chroma_radiance_load.has_transformer, chroma_radiance_load.load_transformer_file,  # Chroma's trunk:
             chroma_radiance.FAMILY),  # before Chroma
            (chroma_load.has_chroma_transformer, chroma_load.load_transformer_file, chroma.FAMILY),  # so has Chroma
            (pixart_load.has_transformer, pixart_load.load_transformer_file, pixart.FAMILY),  # PixArt-α / -Σ
            (flux_load.has_flux_transformer, flux_load.load_transformer_file, flux.FAMILY))


def _build_unet(path: Path, state: Any, dtype: Any, offload: Any = None) -> Loaded:
    shapes = shapes_of(state)
    try:
        family = families.for_unet(shapes)
        config = det.unet_config(shapes, family, family.pooled_dim(shapes))
    except (det.UnsupportedCheckpoint, KeyError, StopIteration, IndexError) as exc:
        raise CheckpointError(f"{path.name}: not a UNet of a known family ({exc})") from None
    pred, why = det.prediction_type(shapes, family, config, lambda k: float(state[k].float().std(unbiased=False)))
    unet = build_sd_unet(config, state, resolve(dtype, family), offload, family.name, where=f"{path.name}: ")
    return Loaded(family=family, scheduler_config=family.scheduler_config(pred), latent=family.latent,
                  modules={"unet": unet},
                  info={"format": "unet", "prediction_type": pred, "prediction_reason": why})


@dataclasses.dataclass
class TextFile:
    """One text-encoder file as found: its tensors, layout, key prefix and CLIP kind."""

    name: str
    state: dict[str, Any]
    layout: str
    prefix: str
    kind: str
    #: Where the file is, for a tokenizer kept beside it (AuraFlow's Pile-T5: nodes.checkpoint.auraflow_load).
    path: Path | None = None

    @classmethod
    def read(cls, path: Path) -> "TextFile":
        state = open_state(path)
        shapes = shapes_of(state)
        found = det.text_encoder_layout(shapes)
        t5 = next((k[: -len(T5_MARKER)] for k in shapes if k.endswith(T5_MARKER)), None)
        from nodes.checkpoint.umt5_text import umt5_prefix

        umt5 = umt5_prefix(state.keys()) if found is None and t5 is not None else None
        if umt5 is not None:  # UMT5 (Wan's umt5_xxl_*.safetensors: T5's names, a bias in every block)
            from nodes.checkpoint.auraflow_load import is_pile_t5

            if is_pile_t5(shapes, umt5):  # AuraFlow's Pile-T5-XL: UMT5's architecture, the Llama vocabulary
                return cls(path.name, state, "t5", umt5, "pile_t5", path)
            return cls(path.name, state, "t5", umt5, "umt5")
        from nodes.checkpoint.hunyuan_image_load import is_byt5

        if found is None and t5 is not None and is_byt5(shapes, t5):  # ByT5 (HunyuanImage's byt5_small_glyphxl)
            return cls(path.name, state, "t5", t5, "byt5")
        if found is None and t5 is not None:  # a T5 encoder (FLUX's t5xxl_*.safetensors)
            return cls(path.name, state, "t5", t5, "t5")
        from nodes.checkpoint.gemma_text import is_gemma2
        from nodes.checkpoint.krea2_load import is_qwen3_vl
        from nodes.checkpoint.qwen3_text import is_qwen3

        if found is None and is_gemma2(shapes):  # Gemma 2: Lumina 2's gemma_2_2b (before Llama: no q_norm either)
            return cls(path.name, state, "gemma2", "", "gemma2")

        if found is None and is_qwen3_vl(shapes):  # Qwen3-VL: Krea 2's qwen3vl_4b (a Qwen3 decoder and visual.*)
            return cls(path.name, state, "qwen3-vl", "", "qwen3-vl")
        if found is None and is_qwen3(shapes):  # Qwen3: FLUX.2 klein's qwen_3_4b / qwen_3_8b, Z-Image's qwen_3_4b
            return cls(path.name, state, "qwen3", "", "qwen3")
        from nodes.checkpoint.qwen_image_load import text_prefix

        qwen = text_prefix(shapes) if found is None else None
        if qwen is not None:  # Qwen2.5-VL (Qwen-Image's qwen_2.5_vl_7b*.safetensors)
            return cls(path.name, state, "qwen", qwen, "qwen2.5-vl")
        mistral = _mistral_kind(shapes) if found is None else None
        if mistral is not None:  # Ministral 3 (ERNIE-Image) or Mistral Small 3 (FLUX.2 [dev]), type flux2
            return cls(path.name, state, "mistral", "", mistral)
        from nodes.checkpoint.llama_text import is_llama

        if found is None and is_llama(shapes):  # Llama 3.1 (HiDream's llama_3.1_8b_instruct*.safetensors)
            return cls(path.name, state, "llama", "", "llama3")
        if found is None:
            from nodes.checkpoint.auraflow_load import has_transformer as is_auraflow  # bare fal names
            from nodes.checkpoint.fibo2_load import has_transformer as is_fibo2  # bare diffusers names
            from nodes.checkpoint.flux3_load import has_transformer as is_flux3  # bare BFL names

            what = "a diffusion model" if has_prefix(shapes, det.UNET) or has_prefix(shapes, "input_blocks.") \
                or is_fibo2(shapes) or is_flux3(shapes) or is_auraflow(shapes) else "no CLIP text encoder"
            raise CheckpointError(f"{path.name} holds {what} (no token embedding); CLIPLoader needs a text encoder")
        layout, prefix = found
        return cls(path.name, state, layout, prefix, det.text_kind(shapes, layout, prefix))


def _mistral_kind(shapes: dict[str, tuple]) -> str | None:
    """A Mistral text encoder's kind (CLIPLoader type flux2 serves several): the rule is one function,
    nodes.checkpoint.ministral_text.mistral_kind."""
    from nodes.checkpoint.ministral_text import mistral_kind

    return mistral_kind(shapes)


def _clip_width(file: TextFile) -> int:
    shapes = shapes_of(file.state)
    return next(v[1] for k, v in shapes.items() if k.endswith("embeddings.token_embedding.weight"))


def _pair_clips(files: list[TextFile]) -> None:
    """Two transformers-layout CLIPs that both carry a text projection (SD3's clip_l and clip_g files)
    both read as OpenCLIP by their keys: the narrower of the pair is CLIP-L."""
    clips = [f for f in files if f.kind in ("openai", "openclip")]
    if len(clips) == 2 and all(f.kind == "openclip" and f.layout == "transformers" for f in clips):
        narrow = min(clips, key=_clip_width)
        if _clip_width(narrow) < max(_clip_width(f) for f in clips):
            narrow.kind = "openai"


def _fits(family: Family, kinds: list[str]) -> bool:
    """All of the family's encoder kinds, or (a family whose missing encoders give zeros, SD3) some of them."""
    wanted = sorted(s.kind for s in family.text_encoders)
    if kinds == wanted:
        return True
    if not getattr(family, "partial_text", False) or not kinds:
        return False
    return all(kinds.count(k) <= wanted.count(k) for k in kinds)


def family_for_texts(clip_type: str, files: list[TextFile]) -> Family:
    """The family that loads these encoder files under ComfyUI's ``type``, by their CLIP kinds."""
    _pair_clips(files)
    kinds = sorted(f.kind for f in files)
    if kinds == ["pile_t5"]:  # ComfyUI has no type for AuraFlow's encoder: under any type the file decides
        from nodes.families import auraflow

        return auraflow.FAMILY
    for family in families.ALL:
        if clip_type not in family.clip_types or not family.accepts_text_files(files):
            continue
        if _fits(family, kinds):
            return family
        aliases = getattr(family, "text_kind_aliases", {})
        if _fits(family, sorted(aliases.get(k, k) for k in kinds)):
            for f in files:  # a file its keys cannot tell apart from the kind the family reads (Krea 2)
                f.kind = aliases.get(f.kind, f.kind)
            return family
    if clip_type in BY_FILE_TYPES and len(files) == 1 and files[0].kind in BY_FILE_FAMILY:
        return family_for_texts(BY_FILE_FAMILY[files[0].kind], files)
    names = ", ".join(f"{f.name} ({KIND_NAMES.get(f.kind, f.kind)})" for f in files)
    wanted = [f for f in families.ALL if clip_type in f.clip_types]
    if wanted:
        needs = [" + ".join(KIND_NAMES.get(s.kind, s.kind) for s in family.text_encoders) for family in wanted]
        given = " + ".join(KIND_NAMES.get(f.kind, f.kind) for f in files)  # a kind a family took and refused
        others = ", ".join(dict.fromkeys(n for n in needs[1:] if n not in (needs[0], given)))  # FLUX.2 [dev]'s
        also = f" (or {others})" if others else ""
        raise CheckpointError(f"type {clip_type!r} needs {needs[0]}, got {names}{also}")
    raise CheckpointError(f"type {clip_type!r} has no model family with text encoders {names}")


def load_text_files(files: list[TextFile], family: Family, dtype: Any) -> Loaded:
    """The family's encoders, each from the file of its kind (any order), in the family's dtype
    (``dtype`` may be the model manager's rule: nodes.runtime.precision.resolve)."""
    from nodes.checkpoint.tokenizer import clip_tokenizer

    dtype = resolve(dtype, family)

    modules, carried = {}, {}  # the tokenizers the files carry (Mistral's Tekken, UMT5's SentencePiece)
    remaining = list(files)
    for spec in family.text_encoders:
        file = next((f for f in remaining if f.kind == spec.kind), None)
        if file is None:  # a partial family (SD3): this encoder gives zeros
            continue
        remaining.remove(file)
        if spec.kind == "umt5":
            from nodes.checkpoint.umt5_text import build_umt5, umt5_tokenizer

            carried[spec.tokenizer] = umt5_tokenizer(file.state, file.name)
            with reading(Path(file.name)):
                modules[spec.module] = build_umt5(file.state, file.prefix, file.name, dtype)
            continue
        if spec.kind == "pile_t5":  # AuraFlow's: UMT5's build, the tokenizer in the file or beside it
            from nodes.checkpoint.auraflow_load import tokenizer_for
            from nodes.checkpoint.umt5_text import build_umt5

            carried[spec.tokenizer] = tokenizer_for(file.state, file.path or Path(file.name), "CLIPLoader", "clip_name")
            with reading(Path(file.name)):
                modules[spec.module] = build_umt5(file.state, file.prefix, file.name, dtype)
            continue
        if spec.kind == "byt5":  # HunyuanImage's glyph encoder; its tokenizer needs no file
            from nodes.checkpoint.hunyuan_image_load import build_byt5, byt5_tokenizer

            carried[spec.tokenizer] = byt5_tokenizer()
            modules[spec.module] = build_byt5(file.state, file.prefix, file.name, dtype)
            continue
        if spec.kind == "t5":
            from nodes.checkpoint.flux_load import build_t5

            modules[spec.module] = build_t5(plain(file.state), file.prefix, file.name, dtype)
            continue
        if spec.kind == "qwen3":
            from nodes.checkpoint.qwen3_text import build_qwen3

            with reading(Path(file.name)):
                modules[spec.module] = build_qwen3(file.state, file.name, dtype)
            continue
        if spec.kind == "qwen3-vl":
            from nodes.checkpoint.krea2_load import build_text_model as build_qwen3_vl
            if getattr(family, "text_vision", False):  # a family that reads pictures: the tower too, on demand
                from nodes.checkpoint.krea2_load import build_encoder as build_qwen3_vl

            with reading(Path(file.name)):
                modules[spec.module] = build_qwen3_vl(file.state, file.name, dtype)
            continue
        if spec.kind == "gemma2":  # the tokenizer is the file's own (its spiece_model tensor)
            from nodes.checkpoint.gemma_text import build_gemma2, spiece_tokenizer

            carried[spec.tokenizer] = spiece_tokenizer(file.state, file.name)  # with the files' own tokenizers
            with reading(Path(file.name)):
                modules[spec.module] = build_gemma2(file.state, file.name, dtype)
            continue
        if spec.kind == "llama3":
            from nodes.checkpoint.llama_text import build_llama

            with reading(Path(file.name)):
                modules[spec.module] = build_llama(file.state, file.name, dtype)
            continue
        if spec.kind in ("ministral3", "mistral3"):  # the tokenizer is the file's (tekken_model)
            from nodes.checkpoint.ministral_text import build_ministral3
            from nodes.checkpoint.mistral_text import build_mistral
            from nodes.checkpoint.tekken_tokenizer import tokenizer_in_file

            build = build_ministral3 if spec.kind == "ministral3" else build_mistral
            with reading(Path(file.name)):
                carried[spec.tokenizer] = tokenizer_in_file(file.state, file.name, TEKKEN_FILES[spec.kind])
                modules[spec.module] = build(file.state, file.name, dtype)
            continue
        if spec.kind == "qwen2.5-vl":
            from nodes.checkpoint.qwen_image_load import build_text_model

            with reading(Path(file.name)):  # read lazily: the vision tower's tensors wait for a picture
                modules[spec.module] = build_text_model(file.state, file.name, dtype)
            continue
        shapes = shapes_of(file.state)
        config = det.lone_text_config(shapes, file.layout, file.prefix, spec.kind, drop_last=spec.dropped > 0)
        try:
            with reading(Path(file.name)):
                modules[spec.module] = build_text_encoder(file.state, file.prefix, file.layout, spec, config, dtype)
        except CheckpointError as exc:
            raise CheckpointError(f"{file.name} as {family.name}'s {spec.module}: {exc}") from None
    loaded = [spec for spec in family.text_encoders if spec.module in modules]
    tokenizers = {spec.tokenizer: clip_tokenizer(spec.pad) for spec in loaded
                  if spec.kind not in ("t5", "byt5", "umt5", "pile_t5", "qwen3", "qwen2.5-vl", "qwen3-vl", "llama3",
                                       "ministral3", "mistral3", "gemma2")}
    tokenizers.update(carried)
    qwen_versions = {"qwen3": "3", "qwen2.5-vl": "2.5", "qwen3-vl": "3"}
    if any(spec.kind in qwen_versions for spec in loaded):
        from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

        tokenizers.update({spec.tokenizer: qwen_tokenizer(qwen_versions[spec.kind])
                           for spec in loaded if spec.kind in qwen_versions})
    if any(spec.kind == "llama3" for spec in loaded):
        from nodes.checkpoint.llama_tokenizer import llama3_tokenizer

        tokenizers.update({spec.tokenizer: llama3_tokenizer() for spec in loaded if spec.kind == "llama3"})
    if any(spec.kind == "t5" for spec in loaded):
        from nodes.checkpoint.t5_tokenizer import t5_tokenizer

        tokenizers.update({spec.tokenizer: t5_tokenizer() for spec in loaded if spec.kind == "t5"})
    return Loaded(family=family, scheduler_config={}, latent=family.latent, modules=modules, tokenizers=tokenizers,
                  info={"format": "text_encoders"})
