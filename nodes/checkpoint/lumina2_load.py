"""Loading Lumina Image 2.0 (and Neta Lumina, NetaYume Lumina) offline: ComfyUI's files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/lumina_2_model_bf16.safetensors``) in
  ComfyUI's NextDiT layout (with or without ``model.diffusion_model.``) or diffusers' in one file; the key
  map is nodes.checkpoint.lumina2_keys, the build FLUX's rule (nodes.checkpoint.flux_load.transformer_from_file).
* Gemma 2 2B through CLIPLoader (type ``lumina2``, ``gemma_2_2b_fp16.safetensors``: nodes.checkpoint.split
  and nodes.checkpoint.gemma_text), its tokenizer from the file's ``spiece_model`` tensor; ``ae.safetensors``
  (FLUX.1's VAE) through VAELoader.
* An all-in-one checkpoint (CheckpointLoaderSimple, NetaYume's ``NetaYumev35_pretrained_all_in_one.safetensors``:
  ComfyUI's layout) — the transformer under ``model.diffusion_model.``, Gemma 2 under
  ``text_encoders.gemma2_2b.transformer.``, its tokenizer as ``text_encoders.spiece_model``, the VAE under
  ``vae.`` (:func:`load_single_file`).
* diffusers folders (``Lumina2Pipeline.save_pretrained``: ``transformer/``, ``text_encoder/`` (Gemma2Model),
  ``tokenizer/``, ``vae/``, ``scheduler/``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import lumina2_keys as keys
from nodes.checkpoint.flow_transformers import (TransformerFiles, diffusion_model_part, is_pipeline_folder,
                                                load_pipeline_folder)
from nodes.checkpoint.load import CheckpointError, Loaded

LABEL = "Lumina 2"


def refuse_z_image_modulation(state: Mapping[str, Any], what: str) -> None:
    """A NextDiT with Z-Image's modulation layers (``adaLN_modulation.0``) but none of its pad tokens is
    neither model (Lumina 2's modulation is ``adaLN_modulation.1``, after a SiLU): a CheckpointError naming
    ``what``, rather than a list of keys that do not fit."""
    if "layers.0.adaLN_modulation.0.weight" in state:
        raise CheckpointError(f"{what} holds a NextDiT with Z-Image's modulation (layers.N.adaLN_modulation.0) but "
                              "without Z-Image's pad tokens (x_pad_token / cap_pad_token): neither a complete Z-Image "
                              "nor a Lumina Image 2.0 transformer (whose modulation is adaLN_modulation.1)")


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles).
FILES = TransformerFiles("Lumina2Transformer2DModel", keys, "lumina2", LABEL, refuse=refuse_z_image_modulation)
build_transformer, file_layout = FILES.build, FILES.layout
def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's path (nodes.checkpoint.flow_transformers.TransformerFiles.load) on the file's diffusion
    model: a lone transformer file, or the ``model.diffusion_model.`` part of an all-in-one checkpoint."""
    return FILES.load(diffusion_model_part(state), name, dtype, fp8=fp8, offload=offload)


def has_transformer(keys_: Any) -> bool:
    """A Lumina 2 NextDiT in either layout (ComfyUI's: Z-Image's names without its pad tokens)."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def load_single_file(state: Mapping[str, Any], name: str, dtype: Any, offload: Any = None) -> Loaded:
    """An all-in-one Lumina 2 checkpoint (ComfyUI's layout, see the module docstring): the transformer as
    UNETLoader builds it (straight into disk blocks when ``offload`` pages it), Gemma 2 with the tokenizer
    stored beside it, the FLUX VAE. A part missing is a CheckpointError naming it and the split loaders."""
    from nodes.checkpoint.flux_load import build_vae, is_flux_vae
    from nodes.checkpoint.gemma_text import build_gemma2, spiece_tokenizer
    from nodes.checkpoint.load import reading
    from nodes.checkpoint.tensors import shapes_of
    from nodes.families import lumina2 as fam

    shapes = shapes_of(state)
    has_gemma = any(k.startswith(fam.GEMMA_PREFIX + "model.layers.") for k in shapes)
    vae_prefix = next((p for p in ("vae.", "first_stage_model.") if is_flux_vae(shapes, p)), None)
    lacking = [what for what, ok in ((f"Gemma 2 ({fam.GEMMA_PREFIX}*)", has_gemma),
                                     ("the VAE (vae.*)", vae_prefix is not None)) if not ok]
    if lacking:
        raise CheckpointError(
            f"{name} holds a {LABEL} transformer without {', '.join(lacking)}: it is a diffusion model, not a "
            "checkpoint. Put it in models/diffusion_models and load it with UNETLoader, gemma_2_2b*.safetensors "
            "with CLIPLoader (type lumina2) and ae.safetensors with VAELoader")
    tokenizer = spiece_tokenizer(state, name, fam.TEXT_ENCODERS_PREFIX,
                                 "; load its diffusion model with UNETLoader, gemma_2_2b_fp16.safetensors with "
                                 "CLIPLoader (type lumina2) and ae.safetensors with VAELoader instead")
    with reading(Path(name)):
        transformer = load_transformer_file(state, name, dtype, offload=offload).modules["unet"]
        gemma = build_gemma2(state, name, dtype, fam.GEMMA_PREFIX + "model.")
        vae = build_vae(state, vae_prefix, name, dtype)
    family = fam.FAMILY
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent,
                  modules={"unet": transformer, "vae": vae, "text_encoder": gemma}, tokenizers={"tokenizer": tokenizer},
                  info={"format": "single_file", "prediction_type": "flow",
                        "prediction_reason": f"flow matching ({LABEL})"})


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Lumina 2's (its config names the class)."""
    return is_pipeline_folder(path, FILES.model_class)


def folder_gemma2(folder: Path, dtype: Any) -> Any:
    """The folder's Gemma 2 (``text_encoder/``) with its own config, linear weights held as stored."""
    from transformers import Gemma2Config

    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.gemma_text import build_gemma2
    from nodes.checkpoint.load import reading

    found = folder_state(folder, dtype)
    if found is None:
        raise CheckpointError(f"{folder.parent.name}/{folder.name}: no .safetensors weights (Kiln reads a Lumina 2 "
                              "folder's Gemma 2 from safetensors files)")
    with reading(found[0]):
        return build_gemma2(found[1], f"{folder.parent.name}/{folder.name}", dtype,
                            config=Gemma2Config.from_pretrained(str(folder)))


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Lumina 2 pipeline folder (nodes.checkpoint.flow_transformers.load_pipeline_folder):
    Gemma 2 and the transformer held as stored, the folder's tokenizer and scheduler config."""
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.gemma_text import folder_gemma_tokenizer
    from nodes.families import lumina2 as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_gemma2(path / "text_encoder", dtype)}

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, Lumina2Transformer2DModel, others,
                                lambda: folder_gemma_tokenizer(path))
