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

from pathlib import Path
from typing import Any

from nodes.checkpoint import hidream_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import Loaded

LABEL = keys.LABEL
LLAMA_LAYERS = keys.LLAMA_LAYERS
has_transformer = keys.has_transformer
transformer_config = keys.transformer_config

#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): its names
#: are the module's own, so each tensor is its own row in a build straight into disk blocks.
FILES = TransformerFiles("HiDreamImageTransformer2DModel", keys, "hidream", LABEL, own_names=True)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is HiDream-I1's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def _folder_llama(folder: Path, dtype: Any) -> Any:
    """``text_encoder_4/`` (transformers' LlamaForCausalLM) as the LlamaModel the family reads: its
    ``model.*`` tensors by the folder's config, ``lm_head`` left unread (HiDream reads hidden states only);
    linear weights held as stored. .bin files through from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.llama_text import build_llama
    from nodes.checkpoint.load import reading

    found = folder_state(folder, dtype)
    if found is None:
        return LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).model.to(dtype)
    config = LlamaConfig.from_pretrained(str(folder))
    config.use_cache = False
    with reading(found[0]):
        return build_llama(found[1], f"{folder.parent.name}/{folder.name}", dtype, config)


def _folder_text(path: Path, dtype: Any) -> dict[str, Any]:
    """The VAE and the text encoders the folder holds (a hub folder may leave out Llama 3.1, which the
    pipeline takes apart: its CLIP then says which encoder is missing when it encodes)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection

    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.folders import folder_component

    modules = {"vae": folder_component(path / "vae", AutoencoderKL, dtype)}
    build = {"text_encoder": lambda f: folder_component(f, CLIPTextModelWithProjection, dtype),
             "text_encoder_2": lambda f: folder_component(f, CLIPTextModelWithProjection, dtype),
             "text_encoder_3": lambda f: _folder_t5(f, dtype), "text_encoder_4": lambda f: _folder_llama(f, dtype)}
    for module, make in build.items():
        if (path / module).is_dir():
            modules[module] = make(path / module)
    return modules


def _folder_tokenizers(path: Path, modules: dict[str, Any]) -> dict[str, Any]:
    """The folder's tokenizers (Kiln's bundled ones where a folder lacks its own) for the encoders it
    holds; Llama's padded with its end token, as HiDreamImagePipeline sets it."""
    from transformers import AutoTokenizer

    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.checkpoint.llama_tokenizer import llama3_tokenizer
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer
    from nodes.families import hidream as fam

    bundled = {"tokenizer": clip_tokenizer, "tokenizer_2": lambda: clip_tokenizer("!"), "tokenizer_3": t5_tokenizer,
               "tokenizer_4": llama3_tokenizer}
    out = {}
    for spec in fam.FAMILY.text_encoders:
        if spec.module in modules:
            out[spec.tokenizer] = folder_tokenizer(path, AutoTokenizer, bundled[spec.tokenizer], spec.tokenizer)
    if "tokenizer_4" in out:
        out["tokenizer_4"].pad_token = out["tokenizer_4"].eos_token
    return out


def folder_shift(path: Path) -> float | None:
    """The shift the folder's scheduler states: FlowMatchEulerDiscreteScheduler's ``shift`` or, for a
    flow-sigmas UniPC (as HiDream-I1 Full ships), ``flow_shift``; None when it states none."""
    import json

    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    shift = config.get("shift", config.get("flow_shift") if config.get("use_flow_sigmas") else None)
    return None if shift is None else float(shift)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers HiDream-I1 folder (module docstring): the transformer (linear weights held as stored, asked
    of the manager with the other components' bytes; straight into disk blocks when it pages there), the
    FLUX VAE with its config's scale and shift, the text encoders and tokenizers the folder holds, and the
    family's flow sampling at the folder's shift (the rest of a UniPC or FlowMatchEuler config is the
    samplers' business, ComfyUI's KSampler choices)."""
    from diffusers import HiDreamImageTransformer2DModel

    from nodes.checkpoint.flow_transformers import flow_info, folder_modules, vae_latent
    from nodes.families import hidream as fam

    modules = folder_modules(path, LABEL, lambda: _folder_text(path, dtype), HiDreamImageTransformer2DModel, dtype,
                             offload)
    config = fam.FAMILY.scheduler_config()
    shift = folder_shift(path)
    if shift is not None:
        config["shift"] = shift
    return Loaded(family=fam.FAMILY, scheduler_config=config, latent=vae_latent(fam.FAMILY, modules["vae"]),
                  modules=modules, tokenizers=_folder_tokenizers(path, modules),
                  info=flow_info(modules["unet"], "diffusers", LABEL))
