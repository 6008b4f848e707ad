"""Loading HunyuanImage 2.1 offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/hunyuanimage2.1_bf16.safetensors``, the
  guidance-distilled one, or the refiner ``hunyuanimage2.1_refiner_bf16.safetensors``, told by its 3-D patch
  embedder: :func:`is_refiner`) in Tencent's original layout (nodes.checkpoint.hunyuan_image_keys), bare or under
  ``model.diffusion_model.``, or diffusers' names in one file; FLUX's rule builds it
  (nodes.checkpoint.flux_load.transformer_from_file: config from the shapes, fp8 scales followed).
* The VAE (VAELoader, ``hunyuan_image_2.1_vae_fp16.safetensors``): diffusers' ``AutoencoderKLHunyuanImage``
  (64 latent channels, 32x), from Tencent's original names (``encoder.down.N.block.M``, ``mid.block_1``,
  ``mid.attn_1.q``; depth-1 3-D kernels squeezed) or diffusers' (:func:`build_vae`).
* Qwen2.5-VL 7B and ByT5 through DualCLIPLoader type ``hunyuan_image``: Qwen-Image's builder for
  ``qwen_2.5_vl_7b*.safetensors`` and a T5 encoder for ``byt5_small_glyphxl_fp16.safetensors`` (T5's names;
  told from T5-XXL by its byte vocabulary: :func:`is_byt5`), whose tokenizer needs no file (transformers'
  ``ByT5Tokenizer``).
* A diffusers folder (``HunyuanImagePipeline.save_pretrained``: transformer/, vae/, text_encoder/ Qwen2.5-VL,
  tokenizer/, text_encoder_2/ ByT5, tokenizer_2/, scheduler/; or ``HunyuanImageRefinerPipeline``'s) through
  CheckpointLoaderSimple / DiffusersLoader (nodes.checkpoint.pipeline_folders): the same builders as the split
  files, so both give the same modules (:func:`load_folder`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import hunyuan_image_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import CheckpointError

LABEL = keys.LABEL
#: ByT5's vocabulary: 256 bytes and 3 special tokens, padded to 384 rows; T5's SentencePiece ones have 32k+.
BYT5_MAX_VOCAB = 1024


def has_transformer(keys_: Any) -> bool:
    """A HunyuanImage 2.1 transformer in either layout, with or without ComfyUI's prefix: text to image (its
    ByT5 projection marks it) or the refiner (no ByT5 projection, no HunyuanVideo ``vector_in``; its 3-D patches,
    which the key-only test cannot see, pick its family when loading: :func:`_family_of`)."""
    from nodes.checkpoint import hunyuan_video15_load

    if hunyuan_video15_load.has_transformer(keys_):  # HunyuanVideo 1.5's: these names and its own
        return False
    if keys.is_original(keys_) or keys.is_diffusers(keys_):
        return True
    refiner_markers = keys.has_keys(keys_, *(m for m in keys.MARKERS if not m.startswith("byt5_in"))) or (
        "context_embedder.token_refiner.refiner_blocks.0.norm1.weight" in keys_ and "x_embedder.proj.weight" in keys_)
    return refiner_markers and not any(k.endswith("vector_in.in_layer.weight") for k in keys_)


def is_refiner(shapes: Any) -> bool:
    """The refiner's transformer: a 3-D patch embedder (HunyuanImage 2.1 text to image has 2-D ones)."""
    from nodes.checkpoint.flux_keys import UNET_PREFIX

    if not isinstance(shapes, Mapping):  # names only: the rank cannot be seen
        return False
    for name in ("img_in.proj.weight", "x_embedder.proj.weight"):
        shape = shapes.get(name) or shapes.get(UNET_PREFIX + name)
        if shape is not None:
            return len(shape) == 5
    return False


def _family_of(state: Mapping[str, Any]) -> str:
    """The refiner (nodes.families.hunyuan_image_refiner) or text to image, by the patch embedder's rank."""
    from nodes.checkpoint.tensors import shapes_of

    return "hunyuan_image_refiner" if is_refiner(shapes_of(state)) else "hunyuan_image"


FILES = TransformerFiles("HunyuanImageTransformer2DModel", keys, "hunyuan_image", LABEL, family_of=_family_of)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- the VAE ----------------------------------------------------------------------------------------


def is_vae(shapes: Mapping[str, tuple]) -> bool:
    """HunyuanImage 2.1's VAE: a 64-channel latent into a 2-D decoder, either layout."""
    conv = shapes.get("decoder.conv_in.weight")
    attention = "decoder.mid.attn_1.q.weight" in shapes or "decoder.mid_block.attentions.0.to_q.weight" in shapes
    return conv is not None and len(conv) == 4 and conv[1] == 64 and attention


def vae_to_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' names for Tencent's VAE layout: each level's resnets then its resampler numbered in one
    run (``down_blocks.N`` / ``up_blocks.N``), ``mid.block_1/2`` -> ``mid_block.resnets.0/1``,
    ``mid.attn_1.q/k/v/proj_out`` -> ``mid_block.attentions.0.to_q/k/v/proj``; 5-D kernels of depth 1
    squeezed to 2-D."""
    out: dict[str, Any] = {}
    runs: dict[str, dict[tuple[int, int], int]] = {}
    for side, level_name, resample in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        items = set()
        for k in state:
            m = re.match(rf"^{side}\.{level_name}\.(\d+)\.block\.(\d+)\.", k)
            if m:
                items.add((int(m.group(1)), int(m.group(2))))
            m = re.match(rf"^{side}\.{level_name}\.(\d+)\.{resample}\.", k)
            if m:
                items.add((int(m.group(1)), 10**6))
        runs[side] = {item: i for i, item in enumerate(sorted(items))}
    for k, v in state.items():
        name = k
        m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(.*)$", k)
        if m:
            index = runs[m.group(1)][(int(m.group(3)), int(m.group(4)))]
            name = f"{m.group(1)}.{m.group(2)}_blocks.{index}.{m.group(5)}"
        m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(?:downsample|upsample)\.(.*)$", k)
        if m:
            name = f"{m.group(1)}.{m.group(2)}_blocks.{runs[m.group(1)][(int(m.group(3)), 10**6)]}.{m.group(4)}"
        name = re.sub(r"\.mid\.block_(\d)\.", lambda g: f".mid_block.resnets.{int(g.group(1)) - 1}.", name)
        name = re.sub(r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1.", name)
        name = name.replace(".mid.attn_1.proj_out.", ".mid_block.attentions.0.proj.")
        name = name.replace(".mid.attn_1.norm.", ".mid_block.attentions.0.norm.")
        if v.ndim == 5 and v.shape[2] == 1:
            v = v.squeeze(2)
        out[name] = v
    return out


def vae_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """AutoencoderKLHunyuanImage arguments from diffusers-layout shapes."""
    blocks = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    levels, layers, resamples = [], 0, 0
    per_level = 0
    for i in blocks:
        if f"encoder.down_blocks.{i}.conv1.weight" in shapes:
            per_level += 1
            if per_level == 1:
                levels.append(shapes[f"encoder.down_blocks.{i}.conv1.weight"][0])
        else:
            resamples += 1
            layers, per_level = max(layers, per_level), 0
    layers = max(layers, per_level)
    return dict(in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
                latent_channels=shapes["decoder.conv_in.weight"][1], block_out_channels=tuple(levels),
                layers_per_block=layers, spatial_compression_ratio=2 ** resamples, sample_size=384,
                scaling_factor=0.75289, downsample_match_channel=True, upsample_match_channel=True)


def build_vae(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """AutoencoderKLHunyuanImage from either layout; a key that does not fit names the file."""
    from diffusers import AutoencoderKLHunyuanImage

    from nodes.checkpoint.load import _assign, _empty
    from nodes.checkpoint.tensors import cast_view

    if not any(k.startswith("decoder.up_blocks.") for k in state):
        state = vae_to_diffusers(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = vae_config(shapes)
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a complete {LABEL} VAE ({exc} is missing)") from None
    vae = _assign(_empty(AutoencoderKLHunyuanImage, config), cast_view(dict(state), dtype), f"{LABEL} VAE ({what})",
                  dtype).eval().requires_grad_(False)
    vae.kiln_downscale = int(config["spatial_compression_ratio"])  # pixels per latent cell (VAELoader's handle)
    return vae


# -- ByT5 -------------------------------------------------------------------------------------------


def is_byt5(shapes: Mapping[str, tuple], prefix: str) -> bool:
    """A T5 encoder with ByT5's byte vocabulary (a few hundred rows, not T5's 32k)."""
    emb = shapes.get(prefix + "shared.weight") or shapes.get(prefix + "encoder.embed_tokens.weight")
    return emb is not None and emb[0] <= BYT5_MAX_VOCAB


def build_byt5(state: Mapping[str, Any], prefix: str, what: str, dtype: Any) -> Any:
    """ByT5's encoder (a T5 v1.1 encoder: gated GELU) from T5's names (nodes.checkpoint.flux_load.build_t5)."""
    from nodes.checkpoint.flux_load import build_t5
    from nodes.checkpoint.tensors import plain

    return build_t5(plain(state), prefix, what, dtype)


def byt5_tokenizer() -> Any:
    """transformers' ByT5Tokenizer: bytes + 3 (no vocabulary file), as the pipeline's ``tokenizer_2``."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


# -- diffusers folders ------------------------------------------------------------------------------

def is_folder(path: Path) -> bool:
    """A diffusers HunyuanImage 2.1 folder, text to image or the refiner: its transformer config names
    diffusers' HunyuanImageTransformer2DModel."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def folder_encoders(path: Path, dtype: Any, build_vae: Any) -> dict[str, Any]:
    """The VAE (``vae/``, by ``build_vae(state, what, dtype)``: the split file's builder), Qwen2.5-VL
    (``text_encoder/``) by Qwen-Image's folder rule (nodes.checkpoint.qwen_image_load.vae_and_text_encoder) and,
    where the folder has it, ByT5 (``text_encoder_2/``) by the folder T5 rule (nodes.checkpoint.flux_load's, the
    split file's build_t5 with the folder's config): HunyuanImage 2.1's and HunyuanVideo 1.5's folders alike."""
    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.qwen_image_load import build_text_model, vae_and_text_encoder

    modules = vae_and_text_encoder(path, dtype, build_text_model, build_vae)
    if (path / "text_encoder_2").is_dir():
        modules["text_encoder_2"] = _folder_t5(path / "text_encoder_2", dtype)
    return modules


def folder_tokenizers(path: Path, loaded: Any) -> Any:
    """``loaded`` with ByT5's tokenizer (``tokenizer_2/``, else transformers' own, which needs no file) when the
    folder has ByT5; Qwen's (``tokenizer``) is load_pipeline_folder's."""
    import dataclasses

    from transformers import ByT5Tokenizer

    from nodes.checkpoint.tokenizer_memo import folder_tokenizer

    if "text_encoder_2" not in loaded.modules:
        return loaded
    second = folder_tokenizer(path, ByT5Tokenizer, byt5_tokenizer, "tokenizer_2")
    return dataclasses.replace(loaded, tokenizers={**loaded.tokenizers, "tokenizer_2": second})


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Any:
    """A diffusers HunyuanImage 2.1 folder (``HunyuanImagePipeline.save_pretrained``: transformer/, vae/,
    text_encoder/ Qwen2.5-VL, tokenizer/, text_encoder_2/ ByT5, tokenizer_2/, scheduler/, guider/) through
    nodes.checkpoint.flow_transformers.load_pipeline_folder with the split files' builders (:func:`build_vae`,
    :func:`folder_encoders`), so both give the same modules; the refiner's (``HunyuanImageRefinerPipeline``:
    a 3-D patch embedder, the refiner's VAE, no ByT5) as nodes.families.hunyuan_image_refiner. The latent is the
    family's (as from the split files), the shift the folder's scheduler config over the family's; the guider
    config is not read (Kiln's graph sets the guidance)."""
    import importlib
    import json

    from diffusers import HunyuanImageTransformer2DModel

    from nodes.checkpoint import hunyuan_refiner_vae
    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.qwen_image_load import qwen25_folder_tokenizer

    try:
        patch = json.loads((path / "transformer" / "config.json").read_text()).get("patch_size", (1, 1))
    except (OSError, ValueError):
        patch = (1, 1)
    refiner = isinstance(patch, (list, tuple)) and len(patch) == 3
    family = importlib.import_module(
        f"nodes.families.{'hunyuan_image_refiner' if refiner else 'hunyuan_image'}").FAMILY
    vae = hunyuan_refiner_vae.build_vae if refiner else build_vae
    loaded = load_pipeline_folder(path, dtype, offload, family, LABEL, HunyuanImageTransformer2DModel,
                                  lambda: folder_encoders(path, dtype, vae), lambda: qwen25_folder_tokenizer(path),
                                  latent_from_vae=False)
    return folder_tokenizers(path, loaded)
