"""Loading PixArt-α and PixArt-Σ offline: the transformer's single file and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/PixArt-Sigma-XL-2-1024-MS.pth`` or
  ``.safetensors``; a .pth may nest its tensors under ``state_dict``) in the original key layout
  (with or without ``model.diffusion_model.``) or diffusers' names in one file; the key map and the
  configuration read from the shapes are nodes.checkpoint.pixart_keys. The variant (α or Σ) is told
  by the file (pixart_keys.variant). T5-XXL comes through CLIPLoader (type ``pixart``) and the VAE
  (SD 1.x's for α, SDXL's for Σ) through VAELoader.
* diffusers folders (``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline.save_pretrained``:
  ``transformer/``, ``text_encoder/`` (T5), ``tokenizer/``, ``vae/``, ``scheduler/``) through
  CheckpointLoader and DiffusersLoader; ``model_index.json`` names the pipeline, hence the variant.

PixArt predicts noise on a DDPM schedule (not flow), so the loader's info says epsilon.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

from nodes.checkpoint import pixart_keys
from nodes.checkpoint.load import CheckpointError, Loaded

MODEL_CLASS = "PixArtTransformer2DModel"


def has_transformer(keys: Any) -> bool:
    """A PixArt transformer in either layout (the marker names only PixArt has)."""
    return pixart_keys.is_pixart(keys) or pixart_keys.is_diffusers(keys)


def _family(variant: str) -> Any:
    from nodes.families import pixart

    return pixart.SIGMA if variant == "sigma" else pixart.ALPHA


def _info(transformer: Any, fmt: str, family: Any) -> dict[str, Any]:
    from nodes.checkpoint.flux_load import _held_note
    from nodes.runtime.fp8 import fp8_bytes

    return {"format": fmt, "prediction_type": "epsilon",
            "prediction_reason": f"noise prediction on DDPM's linear schedule ({family.label})",
            "fp8": fp8_bytes(transformer) > 0, **_held_note(transformer)}


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any) -> tuple[Any, str]:
    """(PixArtTransformer2DModel, variant) from a file's tensors in either layout, linear weights held as
    stored. A file in diffusers' names is first brought to the original layout (one path for both)."""
    from diffusers import PixArtTransformer2DModel

    from nodes.checkpoint.flux_load import transformer_from_file

    plain = pixart_keys.strip(dict(state))
    diffusers_layout = pixart_keys.is_diffusers(plain)
    shapes = {k: tuple(v.shape) for k, v in plain.items()}
    if diffusers_layout:
        shapes = {k: tuple(v.shape) for k, v in pixart_keys.diffusers_to_original(plain).items()}
    found = pixart_keys.variant(shapes)
    keys = SimpleNamespace(strip=pixart_keys.strip, KeyMismatch=pixart_keys.KeyMismatch,
                           transformer_config=lambda s: pixart_keys.transformer_config(
                               {**s, **{k: shapes[k] for k in pixart_keys.READ_ONLY if k in shapes}}, what))
    model = transformer_from_file(plain, what, dtype, PixArtTransformer2DModel, "PixArt", keys,
                                  pixart_keys.original_to_diffusers, pixart_keys.diffusers_to_original,
                                  lambda s: diffusers_layout)
    return model, found


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's path for PixArt: the module built whole (``offload`` is not asked: a PixArt XL
    transformer is 0.6 B parameters), ``fp8`` (a torch dtype name) storing its linear weights so."""
    from nodes.checkpoint.flow_transformers import _as_stored

    transformer, found = build_transformer(_as_stored(state, fp8), name, dtype)
    family = _family(found)
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent,
                  modules={"unet": transformer}, info=_info(transformer, "unet", family))


def folder_variant(path: Path) -> str | None:
    """"alpha" / "sigma" for a diffusers PixArt pipeline folder (its model_index.json names the
    pipeline; a folder of another class with PixArt's transformer reads as Σ), None otherwise."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    if not is_pipeline_folder(path, MODEL_CLASS):
        return None
    try:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    return "alpha" if "Alpha" in name else "sigma"


def is_folder(path: Path) -> bool:
    return folder_variant(path) is not None


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers PixArt pipeline folder (nodes.checkpoint.flow_transformers.load_pipeline_folder): T5
    and the transformer held as stored; the latent takes the VAE config's scale (the folder's own)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5TokenizerFast

    from nodes.checkpoint.flow_transformers import load_pipeline_folder
    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer_memo import folder_tokenizer

    family = _family(folder_variant(path) or "sigma")

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": _folder_t5(path / "text_encoder", dtype)}

    loaded = load_pipeline_folder(path, dtype, offload, family, family.label, PixArtTransformer2DModel, others,
                                  lambda: folder_tokenizer(path, T5TokenizerFast, t5_tokenizer))
    loaded.info = _info(loaded.modules["unet"], "diffusers", family)
    return loaded


def refuse_checkpoint(name: str) -> CheckpointError:
    """CheckpointLoader given the transformer alone: which loaders it needs."""
    return CheckpointError(f"{name} holds a PixArt transformer: it is a diffusion model, not a checkpoint. Put it in "
                           "models/diffusion_models and load it with UNETLoader, t5xxl with CLIPLoader (type pixart) "
                           "and the VAE (SDXL's for PixArt-Σ, SD 1.x's for PixArt-α) with VAELoader")
