"""Loading Z-Image offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/z_image_turbo_bf16.safetensors``) in
  the original key layout (with or without ``model.diffusion_model.``) or diffusers' in one file; the
  key map is nodes.checkpoint.z_image_keys, the build FLUX's rule
  (nodes.checkpoint.flux_load.transformer_from_original: config from shapes, fp8 scales following).
* Qwen3-4B through CLIPLoader (type ``lumina2``, as ComfyUI's template: nodes.checkpoint.split and
  nodes.checkpoint.qwen3_text), ``ae.safetensors`` (FLUX.1's VAE) through VAELoader.
* diffusers folders (``ZImagePipeline.save_pretrained``: ``transformer/``, ``text_encoder/`` (Qwen3),
  ``tokenizer/``, ``vae/``, ``scheduler/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.checkpoint import z_image_keys as keys
from nodes.checkpoint.load import CheckpointError, Loaded
from nodes.checkpoint.flow_transformers import TransformerFiles, is_pipeline_folder, load_pipeline_folder
from nodes.checkpoint.tokenizer_memo import folder_tokenizer

LABEL = "Z-Image"


def has_z_image_transformer(shapes: Any) -> bool:
    """A Z-Image NextDiT in either layout (pad tokens included: Lumina 2 has none)."""
    return (keys.is_original(shapes) or keys.is_diffusers(shapes)) and keys.has_pad_tokens(shapes)


def time_embedder_in_compute_dtype(model: Any) -> Any:
    """``model`` with its timestep embedder's linears held in the compute dtype, as plain Linear layers.

    diffusers' Z-Image TimestepEmbedder casts the sinusoidal time features to its first linear's weight
    dtype before the MLP: a weight kept fp8 would fail there, one kept bf16 would round the time where
    diffusers keeps it (it leaves ``t_embedder`` out of layer-wise casting for that reason). The values
    are those the per-call cast (times any fp8 scale) gives, so nothing else changes; a few KB. A plain
    Linear is left as it is (already done, or held in the compute dtype), so a build straight into disk
    blocks may run this after each block (nodes.checkpoint.paged.build_paged's ``ready``). Returns ``model``."""
    import torch

    from nodes.runtime.fp8 import compute_dtype, effective_weight

    dtype = compute_dtype(model)
    for layer in model.t_embedder.modules():
        if not isinstance(layer, torch.nn.Linear) or type(layer) is torch.nn.Linear or layer.weight.is_meta \
                or layer.weight.numel() == 0:
            continue
        weight = effective_weight(layer, dtype).detach()
        layer._buffers.pop("kiln_scale", None)
        vars(layer).pop("kiln_rotation", None)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        layer.__class__ = torch.nn.Linear
    return model


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout (nodes.checkpoint.z_image_keys), the timestep embedder held in the compute dtype last in both builds.
FILES = TransformerFiles("ZImageTransformer2DModel", keys, "z_image", LABEL,
                         after=lambda model, _state: time_embedder_in_compute_dtype(model),
                         in_compute=("t_embedder.",))
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


def is_z_image_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is Z-Image's (its config names the class)."""
    return is_pipeline_folder(path, FILES.model_class)


def folder_qwen3(folder: Path, dtype: Any) -> Any:
    """The folder's Qwen3 (``text_encoder/``) through nodes.checkpoint.qwen3_text with its own config
    (Ovis-Image's folders read theirs so too: nodes.checkpoint.ovis_load)."""
    from transformers import Qwen3Config

    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.load import reading
    from nodes.checkpoint.qwen3_text import build_qwen3

    found = folder_state(folder, dtype)
    if found is None:
        raise CheckpointError(f"{folder.parent.name}/{folder.name}: no .safetensors weights (Kiln reads a Z-Image or "
                              "Ovis-Image folder's Qwen3 from safetensors files)")
    with reading(found[0]):
        return build_qwen3(found[1], f"{folder.parent.name}/{folder.name}", dtype, Qwen3Config.from_pretrained(str(folder)))


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers Z-Image pipeline folder (nodes.checkpoint.flow_transformers.load_pipeline_folder);
    Qwen3 and the transformer held as stored, as from split files, the time embedder in the compute dtype."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoTokenizer

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer
    from nodes.families import z_image as fam

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_qwen3(path / "text_encoder", dtype)}

    return load_pipeline_folder(path, dtype, offload, fam.FAMILY, LABEL, ZImageTransformer2DModel, others,
                                lambda: folder_tokenizer(path, AutoTokenizer, lambda: qwen_tokenizer("3")),
                                ready=time_embedder_in_compute_dtype, ready_in_blocks=True)
