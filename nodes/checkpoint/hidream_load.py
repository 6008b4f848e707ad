"""Loading HiDream-I1 offline: ComfyUI's split transformer file (UNETLoader) and diffusers folders.

* The transformer alone (``models/diffusion_models/hidream_i1_{full,dev,fast}_*.safetensors``: bf16, fp8,
  ComfyUI's scaled fp8), with or without ``model.diffusion_model.``, under diffusers' own names
  (nodes.checkpoint.hidream_keys: the config from the shapes and the release's constants). The build is
  FLUX's rule (nodes.checkpoint.flux_load.transformer_from_file: fp8 scales through
  nodes.checkpoint.scaled_fp8, linear weights held as stored, the experts' routers in the compute dtype),
  or straight into disk blocks when the model manager pages it there (:func:`file_layout`; the released
  model is 17B parameters, 34 GB in bf16).
* A diffusers folder (``HiDreamImagePipeline.save_pretrained``: transformer/, vae/, text_encoder/ ..
  text_encoder_4/, tokenizer/ .. tokenizer_4/, scheduler/) through CheckpointLoaderSimple or DiffusersLoader
  (:func:`load_folder`). The four text encoders come from QuadrupleCLIPLoader's files otherwise
  (nodes.hidream_nodes).
"""
from __future__ import annotations

from typing import Any

from nodes.checkpoint import hidream_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles

LABEL = keys.LABEL
LLAMA_LAYERS = keys.LLAMA_LAYERS
has_transformer = keys.has_transformer
transformer_config = keys.transformer_config

#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): its names
#: are the module's own, so each tensor is its own row in a build straight into disk blocks.
FILES = TransformerFiles("HiDreamImageTransformer2DModel", keys, "hidream", LABEL, own_names=True)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout
