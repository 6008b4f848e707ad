"""Loading Qwen-Image offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``qwen_image*.safetensors``: bf16, fp8_e4m3fn, or Comfy's
  scaled fp8 through nodes.checkpoint.scaled_fp8), keys as diffusers names them, with or without
  ``model.diffusion_model.``; the config comes from the shapes.
* The text encoder (CLIPLoader type ``qwen_image``, ``qwen_2.5_vl_7b*.safetensors``): Qwen2.5-VL with
  its language model under ``model.`` (ComfyUI's layout; transformers 5 saves it under
  ``model.language_model.``) and its vision tower under ``visual.``, which the Edit models read
  pictures with (nodes.checkpoint.qwen_vision). Kiln builds transformers' ``Qwen2_5_VLModel`` from
  the shapes, its tower on the first picture read (:func:`build_text_model`), or
  ``Qwen2_5_VLTextModel`` for a file without the tower.
* The VAE (VAELoader, ``qwen_image_vae.safetensors``): nodes.checkpoint.qwen_image_vae.
* A diffusers folder (``QwenImagePipeline.save_pretrained``), its own tokenizer/ used.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.flow_transformers import is_pipeline_folder, load_pipeline_folder, transformer_file
from nodes.checkpoint.tokenizer_memo import folder_tokenizer
from nodes.checkpoint.tensors import plain
from nodes.families import qwen_image as fam
from nodes.families.qwen_image_layered import LAYERED_MARKER

#: The language model's first attention bias (Qwen2's q/k/v have biases; ComfyUI detects by it).
TEXT_MARKER = "layers.0.self_attn.k_proj.bias"
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.", "")
#: ComfyUI's Qwen2.5-VL rope sections of the release's 128-wide heads; other widths scale them (for
#: text alone the three sections see the same positions, so any split gives the same result).
MROPE_128 = (16, 24, 24)



def has_transformer(keys: Any) -> bool:
    return fam.FAMILY.claims_unet({k: () for k in keys})


def transformer_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """QwenImageTransformer2DModel's config from its shapes (ComfyUI's rule: in_channels from img_in,
    layers by count); the rope axes are the release's for 128-wide heads, scaled for others."""
    import re

    inner, in_channels = shapes["img_in.weight"]
    head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    layers = len({int(m.group(1)) for k in shapes for m in [re.match(r"transformer_blocks\.(\d+)\.", k)] if m})
    temporal = head // 8
    spatial = (head - temporal) // 2
    config = {"patch_size": 2, "in_channels": in_channels, "out_channels": shapes["proj_out.weight"][0] // 4,
              "num_layers": layers, "attention_head_dim": head, "num_attention_heads": inner // head,
              "joint_attention_dim": shapes["txt_in.weight"][1], "guidance_embeds": False,
              "axes_dims_rope": (temporal, spatial, spatial)}
    if LAYERED_MARKER in shapes:  # Qwen-Image-Layered: its RGB/RGBA time embedding and layer rope
        config.update(use_additional_t_cond=True, use_layer3d_rope=True)
    return config


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """The transformer from ComfyUI's/diffusers' names; fp8 scales attached, linears held as stored."""
    from diffusers import QwenImageTransformer2DModel

    from nodes.checkpoint import scaled_fp8
    from nodes.checkpoint.load import _empty

    state = {k[len(fam.UNET_PREFIX):] if k.startswith(fam.UNET_PREFIX) else k: v for k, v in state.items()}
    state, scales = scaled_fp8.take(state, what)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = transformer_config(shapes)
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a complete Qwen-Image transformer ({exc} is missing)") from None
    model = _empty(QwenImageTransformer2DModel, config)
    return scaled_fp8.fill_as_stored(model, state, scales, dtype, what, f"Qwen-Image transformer ({what})")


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's Qwen-Image path (nodes.checkpoint.flow_transformers); ``offload`` as FLUX's. A
    Qwen-Image-Layered file (:data:`LAYERED_MARKER`) loads as that family."""
    family = family_of(state.keys())
    label = "Qwen-Image-Layered" if family is not fam.FAMILY else "Qwen-Image"
    return transformer_file(state, name, dtype, fp8, build_transformer, family, label, offload, file_layout)


def family_of(keys: Any) -> Any:
    """Qwen-Image's family, or Qwen-Image-Layered's for a transformer with its extra time embedding
    (with or without ComfyUI's ``model.diffusion_model.`` prefix)."""
    from nodes.families import qwen_image_layered

    return qwen_image_layered.FAMILY if qwen_image_layered.FAMILY.claims_unet(keys) else fam.FAMILY


def file_layout(state: Mapping[str, Any], what: str) -> Any:
    """A Qwen-Image file (prefix stripped) holds diffusers' own names: built straight into disk blocks
    with no conversion (nodes.checkpoint.paged.own_rows), the config from its shapes."""
    from diffusers import QwenImageTransformer2DModel

    from nodes.checkpoint.paged_files import FileLayout

    return FileLayout(QwenImageTransformer2DModel, "Qwen-Image", transformer_config)


# -- the text encoder ---------------------------------------------------------------------------


def text_prefix(keys: Any) -> str | None:
    """The language model's key prefix in a Qwen2.5-VL file, or None when it is not one."""
    from nodes.checkpoint.qwen_decoder import decoder_prefix

    return decoder_prefix(keys, TEXT_PREFIXES, TEXT_MARKER)


def text_config(shapes: Mapping[str, tuple], what: str) -> Any:
    """Qwen2_5_VLTextConfig from the shapes of bare language-model keys (the sizes:
    nodes.checkpoint.qwen_decoder.decoder_sizes). The files do not state the head width: every released
    Qwen2.5-VL (3B, 7B, 32B, 72B) uses 128, taken whenever the widths allow it; narrower models (the
    tests' tiny ones) are read as four query heads."""
    from transformers import Qwen2_5_VLTextConfig

    from nodes.checkpoint.qwen_decoder import decoder_sizes

    sizes = decoder_sizes(shapes, what, "Qwen2.5-VL language model", q_norm=False)
    head = 128 if sizes.hidden % 128 == 0 and sizes.kv_rows % 128 == 0 else sizes.hidden // 4
    sections = [s * head // 128 for s in MROPE_128]
    sections[0] += head // 2 - sum(sections)
    return Qwen2_5_VLTextConfig(**sizes.fields(head), rms_norm_eps=1e-6, max_position_embeddings=128000,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                 "mrope_section": sections})


def build_text_model(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
    """The Qwen2.5-VL of a file, the lm_head left out: the language model (``Qwen2_5_VLTextModel``), and
    when the file holds ``visual.*`` transformers' ``Qwen2_5_VLModel`` around it with the vision tower
    (which the Edit models and TextGenerate read pictures with) left to build on the first picture read
    (nodes.checkpoint.qwen_vision.with_tower_on_demand: a text-to-image job never holds its weights, about
    0.7B parameters in Qwen2.5-VL 7B). Text-only encoding runs the same language model either way. Only the
    language model's tensors are read now (``state`` may be a lazily read file's view)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLTextModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from nodes.checkpoint import qwen_vision
    from nodes.checkpoint.qwen_decoder import decoder_from_file
    from nodes.checkpoint.tensors import shapes_of

    prefix = text_prefix(state.keys())
    if prefix is None:
        raise CheckpointError(f"{what} holds no Qwen2.5-VL language model (no {TEXT_MARKER} with embed_tokens); "
                              "CLIPLoader type qwen_image needs qwen_2.5_vl_7b*.safetensors")
    text = decoder_from_file(state, prefix, what, dtype, Qwen2_5_VLTextModel, lambda shapes: text_config(shapes, what),
                             "Qwen-Image text encoder (Qwen2.5-VL)")
    visual = qwen_vision.vision_view(state)
    if not visual:
        return text
    vision = qwen_vision.vision_config(shapes_of(visual), what)
    config = Qwen2_5_VLConfig(text_config=text.config.to_dict(), vision_config=vision)
    return qwen_vision.with_tower_on_demand(Qwen2_5_VLModel, Qwen2_5_VisionTransformerPretrainedModel, config,
                                            text, visual, what, dtype, "Qwen2.5-VL vision tower")


# -- diffusers folders ----------------------------------------------------------------------------


def is_qwen_image_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Qwen-Image's (its config names the class)."""
    return is_pipeline_folder(path, "QwenImageTransformer2DModel")


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Qwen-Image folder (nodes.checkpoint.flow_transformers.load_pipeline_folder):
    transformer, Qwen2.5-VL, VAE, its tokenizer; the transformer built straight into disk blocks when
    the manager (``offload``) will page it there, as every family's folder is."""
    from diffusers import QwenImageTransformer2DModel

    import json

    config = json.loads((path / "transformer" / "config.json").read_text())
    family = family_of([LAYERED_MARKER] if config.get("use_additional_t_cond") else [])
    return load_pipeline_folder(path, dtype, offload, family, "Qwen-Image", QwenImageTransformer2DModel,
                                lambda: vae_and_text_encoder(path, dtype, build_text_model),
                                lambda: qwen25_folder_tokenizer(path), latent_from_vae=False)


def qwen25_folder_tokenizer(path: Path) -> Any:
    """A Qwen2.5-VL folder's tokenizer (``tokenizer/``), else Kiln's Qwen2.5 one: Qwen-Image's rule, which
    HunyuanImage 2.1's and HunyuanVideo 1.5's folders share."""
    from transformers import AutoTokenizer

    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    return folder_tokenizer(path, AutoTokenizer, lambda: qwen_tokenizer("2.5"))


def vae_and_text_encoder(path: Path, dtype: Any, build_text: Any, build_vae: Any = None) -> dict[str, Any]:
    """A folder's VAE (``vae/``, Qwen-Image's unless ``build_vae(state, what, dtype)`` is given: Qwen-Image
    2.1's) and its text encoder (folder_text_encoder): the parts Qwen-Image's, Krea 2's and Qwen-Image 2.1's
    folders share in kind."""
    from nodes.checkpoint import qwen_image_vae
    from nodes.checkpoint.load import open_state

    vae_files = sorted((path / "vae").glob("*.safetensors"))
    if not vae_files:
        raise OSError("vae/ holds no .safetensors")
    vae_state = {k: v for f in vae_files for k, v in plain(open_state(f)).items()}
    return {"vae": (build_vae or qwen_image_vae.build)(vae_state, f"{path.name}/vae", dtype),
            "text_encoder": folder_text_encoder(path, dtype, build_text)}


def folder_text_encoder(path: Path, dtype: Any, build_text: Any = build_text_model) -> Any:
    """A folder's text encoder (``text_encoder/``, built by ``build_text(state, what, dtype)``, Qwen2.5-VL's
    build_text_model unless given), read from its files as a lazily read view: each tensor is read as the
    build asks for it, and a part left for later (a Qwen-VL's vision tower: nodes.checkpoint.qwen_vision)
    holds no memory until then. Qwen-Image's rule, which LongCat-Image's and Kandinsky 5's folders share."""
    from nodes.checkpoint.load import open_state
    from nodes.checkpoint.tensors import ShardedState

    files = sorted((path / "text_encoder").glob("*.safetensors"))
    if not files:
        raise OSError("text_encoder/ holds no .safetensors")
    state = ShardedState({k: part for part in map(open_state, files) for k in part})
    return build_text(state, f"{path.name}/text_encoder", dtype)
