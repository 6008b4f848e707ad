"""Loading Cosmos Predict2 (and Anima's DiT) offline from ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/cosmos_predict2_2B_t2i.safetensors``) in
  the original layout (bare, under NVIDIA's ``net.`` or ComfyUI's ``model.diffusion_model.``) or with
  diffusers' names; the key map is nodes.checkpoint.cosmos_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_file: config from shapes, fp8 scales following, a key
  that does not fit named with the file).
* T5-XXL v1.0 (``oldt5_xxl_*.safetensors``) through CLIPLoader type ``cosmos`` (nodes.checkpoint.split,
  nodes.checkpoint.flux_load.build_t5 with its ReLU feed-forward), the Wan 2.1 VAE through VAELoader.

The transformer is built in memory (no page-by-page build: its files are 4 GB (2B) to 28 GB (14B)).
"""
from __future__ import annotations

from collections.abc import Mapping
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
