"""Loading Cosmos Predict2 (and Anima's DiT) offline from ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/cosmos_predict2_2B_t2i.safetensors``) in
  the original layout (bare, under NVIDIA's ``net.`` or ComfyUI's ``model.diffusion_model.``) or with
  diffusers' names; the key map is nodes.checkpoint.cosmos_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, fp8 scales following, a key
  that does not fit named with the file).
* T5-XXL v1.0 (``oldt5_xxl_*.safetensors``) through CLIPLoader type ``cosmos`` (nodes.checkpoint.split,
  nodes.checkpoint.flux_load.build_t5 with its ReLU feed-forward), the Wan 2.1 VAE through VAELoader.
* A diffusers folder (``Cosmos2TextToImagePipeline.save_pretrained``: transformer/, text_encoder/ (T5 v1.0),
  tokenizer/, vae/ (AutoencoderKLWan), scheduler/) through CheckpointLoaderSimple / DiffusersLoader
  (nodes.checkpoint.pipeline_folders): the same builders as the split files, so both give the same modules.

The transformer is built in memory (no page-by-page build: its files are 4 GB (2B) to 28 GB (14B)).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import cosmos_keys as keys
from nodes.checkpoint.load import Loaded

LABEL = "Cosmos Predict2"


def has_transformer(shapes: Any) -> bool:
    """A Cosmos Predict2 DiT in either layout, without Anima's LLM adapter."""
    return (keys.is_original(shapes) or keys.is_diffusers(shapes)) and not has_adapter(shapes)


def has_adapter(shapes: Any) -> bool:
    """Anima's file: the Predict2 DiT plus ``llm_adapter.*`` (ComfyUI's detection key)."""
    return any(k.endswith("llm_adapter.blocks.0.cross_attn.q_proj.weight") for k in shapes)


def has_anima_transformer(shapes: Any) -> bool:
    """Anima's DiT and LLM adapter (nodes.checkpoint.anima_adapter), in either layout."""
    return (keys.is_original(shapes) or keys.is_diffusers(shapes)) and has_adapter(shapes)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any, anima: bool = False) -> Any:
    """diffusers' CosmosTransformer3DModel from a file's tensors in either layout (linear weights as stored);
    ``anima``: with Anima's LLM adapter as its ``llm_adapter`` submodule."""
    from diffusers import CosmosTransformer3DModel

    from nodes.checkpoint.anima_adapter import anima_dit
    from nodes.checkpoint.flux_load import transformer_from_file

    return transformer_from_file(state, what, dtype, anima_dit if anima else CosmosTransformer3DModel,
                                 "Anima" if anima else LABEL, keys, keys.original_to_diffusers,
                                 keys.diffusers_to_original, keys.is_diffusers)


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's path (nodes.checkpoint.flow_transformers.transformer_file), built in memory."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import cosmos

    return transformer_file(state, name, dtype, fp8, build_transformer, cosmos.FAMILY, LABEL)


def load_anima_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "", offload: Any = None) -> Loaded:
    """UNETLoader's path for Anima (``anima-base-v1.0.safetensors``), built in memory."""
    from nodes.checkpoint.flow_transformers import transformer_file
    from nodes.families import anima

    def build(state: Mapping[str, Any], what: str, dtype: Any) -> Any:
        return build_transformer(state, what, dtype, anima=True)

    return transformer_file(state, name, dtype, fp8, build, anima.FAMILY, "Anima")


#: The pipeline a text-to-image folder's model_index.json names (Video2World's folders read another input).
PIPELINE = "Cosmos2TextToImagePipeline"


def is_folder(path: Path) -> bool:
    """A diffusers Cosmos Predict2 text-to-image folder: its index names the pipeline and its transformer
    config diffusers' Cosmos DiT."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    if not is_pipeline_folder(path, "CosmosTransformer3DModel"):
        return False
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name") == PIPELINE
    except (OSError, ValueError):
        return False


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """The folder's transformer (diffusers' CosmosTransformer3DModel, linear weights as stored), T5 v1.0
    (nodes.checkpoint.flux_load's folder T5 rule), the Wan 2.1 VAE (the VAELoader's builder,
    nodes.checkpoint.qwen_image_vae: AutoencoderKLWan's names are its diffusers names) and the tokenizer.
    Sampling is the family's (the EDM ``rflow`` levels, nodes.families.cosmos), not the folder's scheduler
    config: the pipeline's FlowMatchEulerDiscreteScheduler with Karras sigmas visits those same levels."""
    from diffusers import CosmosTransformer3DModel
    from transformers import T5TokenizerFast

    from nodes.checkpoint import qwen_image_vae
    from nodes.checkpoint.flow_transformers import flow_info, folder_modules
    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.load import reading
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.families import cosmos

    def others() -> dict[str, Any]:
        found = folder_state(path / "vae", dtype)
        if found is None:
            raise OSError("vae/ holds no .safetensors")
        with reading(found[0]):
            vae = qwen_image_vae.build(found[1], f"{path.name}/vae", dtype)
        return {"vae": vae, "text_encoder": _folder_t5(path / "text_encoder", dtype)}

    modules = folder_modules(path, LABEL, others, CosmosTransformer3DModel, dtype, offload)
    family = cosmos.FAMILY
    tokenizers = {"tokenizer": folder_tokenizer(path, T5TokenizerFast, t5_tokenizer)}
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent, modules=modules,
                  tokenizers=tokenizers, info=flow_info(modules["unet"], "diffusers", LABEL))
