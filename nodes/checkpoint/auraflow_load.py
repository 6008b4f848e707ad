"""Loading AuraFlow (and Pony V7) offline: fal's / ComfyUI's single files, split files and diffusers folders.

* An all-in-one checkpoint (CheckpointLoaderSimple, ``aura_flow_0.3.safetensors``: ComfyUI's layout): the
  transformer under ``model.diffusion_model.`` (fal's names: nodes.checkpoint.auraflow_keys), Pile-T5-XL under
  ``text_encoders.pile_t5xl.transformer.`` (transformers' UMT5 names), SDXL's VAE under ``vae.`` (or
  ``first_stage_model.``). :func:`load_single_file`.
* The transformer alone (UNETLoader) in fal's layout (with or without ``model.diffusion_model.``) or diffusers'
  names in one file; the text encoder through CLIPLoader (any type: ComfyUI has none for it and picks the
  encoder by the file, a UMT5-shaped T5 with the Pile-T5 vocabulary; nodes.checkpoint.split), SDXL's VAE
  through VAELoader.
* diffusers folders (``AuraFlowPipeline.save_pretrained``: ``transformer/``, ``text_encoder/`` (UMT5EncoderModel),
  ``tokenizer/``, ``vae/``, ``scheduler/``), Pony V7's included.

**The tokenizer.** Pile-T5 tokenizes with the Llama SentencePiece model, which ComfyUI ships in its own source
tree and no Kiln file may copy or fetch. A diffusers folder carries it (``tokenizer/``). A single file's is read,
in this order, from: the file itself (a ``spiece_model`` tensor, as Comfy-Org's text-encoder files carry theirs:
nodes.checkpoint.spiece_file); a folder ``<file name without .safetensors>.tokenizer/`` beside the file; a folder
``pile_t5_tokenizer/`` beside the file (shared by every AuraFlow / Pony V7 file there). Such a folder is the
``tokenizer/`` folder of a diffusers AuraFlow or Pony V7 download copied as it is (read with transformers'
AutoTokenizer), or holds that SentencePiece ``tokenizer.model`` alone. None of them: a CheckpointError naming
the node, the input and where to put what (:func:`tokenizer_for`). ComfyUI's own Pile-T5 tokenizer reads its
model from ComfyUI's source tree and writes none into the files it saves (its UMT5 and Gemma tokenizers read and
write ``spiece_model``), so fal's and Pony V7's single files are expected to need the folder beside them.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import auraflow_keys as keys
from nodes.checkpoint.flow_transformers import (TransformerFiles, diffusion_model_part, is_pipeline_folder,
                                                load_pipeline_folder)
from nodes.checkpoint.load import CheckpointError, Loaded

LABEL = "AuraFlow"
#: The vocabulary Pile-T5 (EleutherAI's, the Llama tokenizer's 32000 padded to 32128) has; UMT5-XXL has 256384.
PILE_T5_VOCAB = 32128
#: The shared tokenizer folder's name beside a file (see the module docstring).
SHARED_TOKENIZER = "pile_t5_tokenizer"

#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles).
FILES = TransformerFiles("AuraFlowTransformer2DModel", keys, "auraflow", LABEL)
build_transformer, file_layout = FILES.build, FILES.layout


def has_transformer(keys_: Any) -> bool:
    """An AuraFlow MMDiT in either layout (fal's ``double_layers`` names or diffusers' with its register tokens)."""
    return keys.is_original(keys_) or keys.is_diffusers(keys_)


def is_pile_t5(shapes: Mapping[str, tuple], prefix: str) -> bool:
    """Whether the UMT5-shaped encoder under ``prefix`` is Pile-T5 (its vocabulary's rows), not Wan's UMT5-XXL."""
    embedding = shapes.get(prefix + "shared.weight", shapes.get(prefix + "encoder.embed_tokens.weight"))
    return embedding is not None and embedding[0] == PILE_T5_VOCAB


def load_transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "",
                          offload: Any = None) -> Loaded:
    """UNETLoader's path (nodes.checkpoint.flow_transformers.TransformerFiles.load) on the file's diffusion model."""
    return FILES.load(diffusion_model_part(state), name, dtype, fp8=fp8, offload=offload)


def _folder_tokenizer(folder: Path) -> Any:
    """A tokenizer folder beside a file: transformers' files (AutoTokenizer), or a SentencePiece model alone."""
    from nodes.checkpoint.spiece_file import SpieceTokenizer

    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from nodes.checkpoint.tokenizer_memo import from_folder

        try:
            return from_folder(AutoTokenizer, folder.parent, folder.name)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: not a readable tokenizer folder ({exc})") from None
    if (folder / "tokenizer.model").is_file():
        return SpieceTokenizer((folder / "tokenizer.model").read_bytes(), str(folder / "tokenizer.model"), eos=True)
    raise CheckpointError(f"{folder} holds neither transformers' tokenizer files nor a SentencePiece tokenizer.model")


def tokenizer_for(state: Mapping[str, Any], path: Path, node: str, input_name: str) -> Any:
    """Pile-T5's tokenizer for a single file (see the module docstring for the order); a CheckpointError
    naming ``node`` and ``input_name`` and where to put it when there is none."""
    from nodes.checkpoint.spiece_file import SpieceTokenizer, spiece_bytes

    data = spiece_bytes(state)
    if data is not None:
        return SpieceTokenizer(data, path.name, eos=True)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    for folder in (path.parent / f"{stem}.tokenizer", path.parent / SHARED_TOKENIZER):
        if folder.is_dir():
            return _folder_tokenizer(folder)
    raise CheckpointError(
        f"{node}'s {input_name} {path.name}: AuraFlow's Pile-T5 tokenizer is neither in the file (no spiece_model "
        f"tensor) nor beside it. Copy the tokenizer/ folder of a diffusers AuraFlow or Pony V7 download (or that "
        f"folder's SentencePiece tokenizer.model alone) to {path.parent / SHARED_TOKENIZER}/ or "
        f"{path.parent / (stem + '.tokenizer')}/, or load the diffusers folder itself; Kiln downloads nothing")


def build_vae(state: Mapping[str, Any], prefix: str, name: str, dtype: Any) -> Any:
    """SDXL's VAE from a checkpoint's ``prefix`` keys: VAELoader's build (nodes.checkpoint.vae_file) on them."""
    from nodes.checkpoint.tensors import renamed_view
    from nodes.checkpoint.vae_file import _build_vae
    from nodes.families import sdxl

    view = renamed_view(state, {k[len(prefix):]: k for k in state if k.startswith(prefix)})
    return _build_vae(Path(name), view, dtype, sdxl.FAMILY)


def load_single_file(state: Mapping[str, Any], path: Path, dtype: Any, vae_dtype: Any = None,
                     offload: Any = None) -> Loaded:
    """An all-in-one AuraFlow checkpoint (ComfyUI's layout, see the module docstring): the transformer as
    UNETLoader builds it, Pile-T5-XL with its tokenizer (:func:`tokenizer_for`), SDXL's VAE (fp32 unless
    ``vae_dtype``: SDXL's VAE overflows in fp16). ``dtype``: a dtype or the model manager's rule, resolved for
    AuraFlow (nodes.runtime.precision). A part missing is a CheckpointError naming it and the split loaders."""
    import torch

    from nodes.checkpoint.load import reading
    from nodes.checkpoint.tensors import shapes_of
    from nodes.checkpoint.umt5_text import build_umt5
    from nodes.families import auraflow as fam
    from nodes.runtime.precision import resolve

    dtype = resolve(dtype, fam.FAMILY)

    name = path.name
    shapes = shapes_of(state)
    has_t5 = any(k.startswith(fam.PILE_T5_PREFIX + "encoder.") for k in shapes)
    vae_prefix = next((p for p in ("vae.", "first_stage_model.") if p + "decoder.conv_in.weight" in shapes), None)
    lacking = [what for what, ok in ((f"Pile-T5-XL ({fam.PILE_T5_PREFIX}*)", has_t5),
                                     ("the VAE (vae.*)", vae_prefix is not None)) if not ok]
    if lacking:
        raise CheckpointError(
            f"{name} holds an {LABEL} transformer without {', '.join(lacking)}: it is a diffusion model, not a "
            "checkpoint. Put it in models/diffusion_models and load it with UNETLoader, Pile-T5-XL with CLIPLoader "
            "and SDXL's VAE with VAELoader")
    tokenizer = tokenizer_for(state, path, "CheckpointLoaderSimple", "ckpt_name")
    with reading(path):
        transformer = load_transformer_file(state, name, dtype, offload=offload).modules["unet"]
        t5 = build_umt5(state, fam.PILE_T5_PREFIX, name, dtype)
        vae = build_vae(state, vae_prefix, name, vae_dtype or torch.float32)
    family = fam.FAMILY
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent,
                  modules={"unet": transformer, "vae": vae, "text_encoder": t5}, tokenizers={"tokenizer": tokenizer},
                  info={"format": "single_file", "prediction_type": "flow",
                        "prediction_reason": f"flow matching ({LABEL})"})


def is_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is AuraFlow's (its config names the class)."""
    return is_pipeline_folder(path, FILES.model_class)


def folder_umt5(folder: Path, dtype: Any) -> Any:
    """The folder's Pile-T5 (``text_encoder/``, UMT5EncoderModel) with its own config, linear weights as stored."""
    from transformers import UMT5Config

    from nodes.checkpoint.flux_load import build_t5
    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.load import reading

    found = folder_state(folder, dtype)
    if found is None:
        raise CheckpointError(f"{folder.parent.name}/{folder.name}: no .safetensors weights (Kiln reads an AuraFlow "
                              "folder's text encoder from safetensors files)")
    with reading(found[0]):
        return build_t5(found[1], "", f"{folder.parent.name}/{folder.name}", dtype,
                        UMT5Config.from_pretrained(str(folder)), umt5=True)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers AuraFlow pipeline folder (nodes.checkpoint.flow_transformers.load_pipeline_folder): its
    tokenizer (a folder without one is refused: Kiln has no copy), scheduler config and VAE scale."""
    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.families import auraflow as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_umt5(path / "text_encoder", dtype)}

    def no_tokenizer() -> Any:
        raise CheckpointError(f"{path.name}: an {LABEL} folder without tokenizer/ (Kiln has no copy of Pile-T5's "
                              "tokenizer; copy the tokenizer/ folder of the diffusers download into it)")

    from transformers import AutoTokenizer

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, AuraFlowTransformer2DModel, others,
                                lambda: folder_tokenizer(path, AutoTokenizer, no_tokenizer))

