"""Loading ERNIE-Image offline: ComfyUI's split files.

* The transformer alone (UNETLoader, ``models/diffusion_models/ernie-image*.safetensors``: bf16, fp8,
  scaled fp8), with or without ``model.diffusion_model.``; diffusers' names are the same
  (nodes.checkpoint.ernie_image_keys). The build is FLUX's rule (nodes.checkpoint.flux_load
  .transformer_from_file: config from the shapes, fp8 scales through nodes.checkpoint.scaled_fp8), or
  straight into disk blocks when the model manager pages it there (:func:`file_layout`).
* Ministral 3 3B through CLIPLoader type ``flux2`` (``ministral-3-3b.safetensors``, its Tekken tokenizer
  inside): nodes.checkpoint.ministral_text, read by nodes.checkpoint.split.
* The VAE is FLUX.2's (``flux2-vae.safetensors``, VAELoader: nodes.checkpoint.flux2_load.build_vae).
* A diffusers folder (``ErnieImagePipeline.save_pretrained``) through CheckpointLoaderSimple (:func:`load_folder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.checkpoint import ernie_image_keys as keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import Loaded
from nodes.checkpoint.tokenizer_memo import from_folder

LABEL = "ERNIE-Image"


def has_transformer(keys_: Any) -> bool:
    """An ERNIE-Image transformer, with or without ComfyUI's prefix."""
    return keys.is_original(keys_)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): its names
#: are the module's own, each tensor its own row in a build straight into disk blocks.
FILES = TransformerFiles("ErnieImageTransformer2DModel", keys, "ernie_image", LABEL, own_names=True)
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- diffusers folders ----------------------------------------------------------------------------


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is ERNIE-Image's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def folder_tokenizer(path: Path) -> Any:
    """The folder's tokenizer: ``tokenizer/tekken.json`` (Mistral's own file) through Kiln's Tekken reader, else
    the saved ``tokenizer.json``; ``<s>`` is put first by the family's encoding, not the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from nodes.checkpoint.tekken_tokenizer import folder_tekken, tekken_tokenizer

    data = folder_tekken(path / "tokenizer")
    if data is not None:
        return tekken_tokenizer(data)
    return from_folder(PreTrainedTokenizerFast, path, "tokenizer")


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers ERNIE-Image folder (``ErnieImagePipeline.save_pretrained``: transformer/, vae/
    (AutoencoderKLFlux2), text_encoder/ (Mistral3Model: its language model is read, the vision tower is not),
    tokenizer/, scheduler/; a prompt enhancer in pe/ is not read: TextGenerate takes it as its own CLIP file)."""
    from diffusers import AutoencoderKLFlux2, ErnieImageTransformer2DModel
    from transformers import AutoConfig

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.flux2_vae import Flux2LatentVAE
    from nodes.checkpoint.folders import folder_component, folder_state
    from nodes.checkpoint.load import reading
    from nodes.checkpoint.ministral_text import build_ministral3
    from nodes.families import ernie_image as fam

    def others() -> dict[str, Any]:
        modules = {"vae": Flux2LatentVAE(folder_component(path / "vae", AutoencoderKLFlux2, dtype))}
        found = folder_state(path / "text_encoder", dtype)
        if found is None:
            raise OSError("text_encoder/ holds no .safetensors weights")
        config = AutoConfig.from_pretrained(str(path / "text_encoder"), local_files_only=True)
        with reading(found[0]):
            modules["text_encoder"] = build_ministral3(found[1], f"{path.name}/text_encoder", dtype,
                                                       getattr(config, "text_config", config))
        return modules

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, ErnieImageTransformer2DModel, others,
                                lambda: folder_tokenizer(path), latent_from_vae=False)
