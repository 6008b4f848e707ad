"""Loading FLUX.2 offline: ComfyUI's split files and diffusers folders.

* The transformer alone (UNETLoader, ``models/diffusion_models/flux-2-klein-4b*.safetensors``,
  ``flux2_dev_fp8mixed.safetensors``) in BFL's key layout (with or without ``model.diffusion_model.``),
  plain, fp8 or ComfyUI's scaled fp8, or in diffusers' layout in one file; the key map is
  nodes.checkpoint.flux2_keys. A guidance embedder makes it [dev] (nodes.families.flux2_dev), else [klein].
* The text encoder through CLIPLoader type ``flux2`` (via nodes.checkpoint.split): Qwen3 for [klein]
  (nodes.checkpoint.qwen3_text), Mistral Small 3 for [dev] (nodes.checkpoint.mistral_text). The VAE
  through VAELoader (``flux2-vae.safetensors``: the LDM VAE names plus the latent batch-norm ``bn.*``),
  wrapped as nodes.checkpoint.flux2_vae.Flux2LatentVAE.
* diffusers folders (``Flux2KleinPipeline.save_pretrained``: ``transformer/``, ``text_encoder/``
  (Qwen3), ``tokenizer/``, ``vae/``, ``scheduler/``; ``Flux2Pipeline``'s: Mistral3 in ``text_encoder/``,
  ``tokenizer/tekken.json``).

A FLUX.2 file handed to CheckpointLoader is refused with the loaders it needs.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint import flux2_keys
from nodes.checkpoint.flow_transformers import TransformerFiles
from nodes.checkpoint.load import CheckpointError, Loaded, _assign, _empty
from nodes.families import flux2 as fam
from nodes.families import flux2_dev as dev

#: One key marks diffusers' layout of the transformer (the original names it ``.lin``).
DIFFUSERS_MARKER = "double_stream_modulation_img.linear.weight"
def has_flux2_transformer(shapes: Any) -> bool:
    """Either FLUX.2: [klein] or [dev] (a guidance embedder)."""
    return fam.FAMILY.claims_unet(shapes) or dev.FAMILY.claims_unet(shapes)


#: The transformer file's builds and loader (nodes.checkpoint.flow_transformers.TransformerFiles): either
#: layout (nodes.checkpoint.flux2_keys' table); a guidance embedder makes it [dev], else [klein].
FILES = TransformerFiles("Flux2Transformer2DModel", flux2_keys, "flux2", "FLUX.2",
                         is_diffusers=lambda s: DIFFUSERS_MARKER in s,
                         family_of=lambda s: "flux2_dev" if dev.FAMILY.claims_unet({k: () for k in s}) else "flux2")
build_transformer, load_transformer_file, file_layout = FILES.build, FILES.load, FILES.layout


# -- the VAE ----------------------------------------------------------------------------------------

#: ComfyUI's files may keep the 1x1 convolutions inside the coders; the LDM layout has them on top.
_QUANT_RENAMES = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def is_flux2_vae(shapes: Any, prefix: str = "") -> bool:
    """The latent batch-norm statistics mark the FLUX.2 VAE (a FLUX.1 ae.safetensors has none)."""
    return prefix + "bn.running_mean" in shapes and prefix + "decoder.conv_in.weight" in shapes


def build_vae(state: Mapping[str, Any], prefix: str, what: str, dtype: Any) -> Any:
    """The FLUX.2 VAE from original-layout keys under ``prefix``, behind the patch latent."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders import single_file_utils as sfu

    from nodes.checkpoint import detect as det
    from nodes.checkpoint.flux2_vae import Flux2LatentVAE

    sub = {k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}
    for old, new in _QUANT_RENAMES.items():
        sub = {new + k[len(old):] if k.startswith(old) else k: v for k, v in sub.items()}
    bn = {k[len("bn."):]: v for k, v in sub.items() if k.startswith("bn.")}
    ldm = {det.VAE + k: v for k, v in sub.items() if not k.startswith("bn.")}
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    try:
        found = det.vae_config(shapes, fam.FAMILY)
    except det.UnsupportedCheckpoint as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    config = {k: found[k] for k in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                                    "block_out_channels", "down_block_types", "up_block_types", "norm_num_groups")}
    config.update(use_quant_conv=det.VAE + "quant_conv.weight" in shapes,
                  use_post_quant_conv=det.VAE + "post_quant_conv.weight" in shapes)
    decoder = tuple(shapes.get(det.VAE + f"decoder.up.{i}.block.0.conv1.weight", (0,))[0]
                    for i in range(len(config["block_out_channels"])))
    if all(decoder) and decoder != tuple(config["block_out_channels"]):  # a small decoder (Comfy-Org's variant)
        config["decoder_block_out_channels"] = decoder
    if bn.get("running_mean") is None or tuple(bn["running_mean"].shape) != (4 * config["latent_channels"],):
        raise CheckpointError(f"{what}: the FLUX.2 VAE's bn.running_mean must hold {4 * config['latent_channels']} "
                              "values (one per patch channel)")
    vae = _empty(AutoencoderKLFlux2, config)
    try:
        converted = sfu.convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    except KeyError as exc:
        raise CheckpointError(f"{what}: the FLUX.2 VAE is incomplete ({exc} is missing)") from None
    converted.update({f"bn.{k}": v for k, v in bn.items()})
    if "bn.num_batches_tracked" not in converted:
        import torch

        converted["bn.num_batches_tracked"] = torch.tensor(0)
    vae = _assign(vae, converted, f"FLUX.2 VAE ({what})", dtype)
    return Flux2LatentVAE(vae).eval().requires_grad_(False)


# -- diffusers folders --------------------------------------------------------------------------------


def _class_of(path: Path, sub: str) -> str | None:
    try:
        return json.loads((path / sub).read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def is_flux2_folder(path: Path) -> bool:
    """A diffusers folder whose transformer is FLUX.2's (its config names the class)."""
    from nodes.checkpoint.flow_transformers import is_pipeline_folder

    return is_pipeline_folder(path, FILES.model_class)


def load_folder(path: Path, dtype: Any, offload: Any = None) -> Loaded:
    """A diffusers FLUX.2 folder (nodes.checkpoint.flow_transformers.load_pipeline_folder): [klein]
    (Flux2KleinPipeline, Qwen3) or [dev] (Flux2Pipeline: Mistral3's language model, the Tekken
    tokenizer from ``tokenizer/tekken.json``); the text encoder and the transformer held as stored, as
    FLUX's folders. A [klein] folder whose transformer has a guidance embedder is refused."""
    from diffusers import Flux2Transformer2DModel

    from nodes.checkpoint.flow_transformers import load_pipeline_folder

    is_dev = _class_of(path, "model_index.json") == "Flux2Pipeline"
    build_text = _dev_text if is_dev else _klein_text

    def matches(transformer: Any) -> None:
        if bool(transformer.config.guidance_embeds) != is_dev:
            raise CheckpointError(f"{path.name}: its transformer {'lacks' if is_dev else 'has'} a guidance embedder, "
                                  f"which a {'FLUX.2 [dev]' if is_dev else 'FLUX.2 [klein]'} folder "
                                  f"({_class_of(path, 'model_index.json')}) {'has' if is_dev else 'lacks'}")

    family, label = (dev.FAMILY, "FLUX.2 [dev]") if is_dev else (fam.FAMILY, "FLUX.2")
    return load_pipeline_folder(path, dtype, offload, family, label, Flux2Transformer2DModel,
                                lambda: vae_and_text_encoder(path, dtype, build_text),
                                lambda: (_dev_tokenizer if is_dev else qwen3_folder_tokenizer)(path),
                                latent_from_vae=False, ready=matches)


def vae_and_text_encoder(path: Path, dtype: Any, build_text: Any) -> dict[str, Any]:
    """A folder's FLUX.2 VAE (``vae/``, behind the patch latent) and its text encoder (``text_encoder/``,
    built by ``build_text(state, path, dtype)``): the parts FLUX.2's and FLUX.3's folders share in kind."""
    from diffusers import AutoencoderKLFlux2

    from nodes.checkpoint.flux2_vae import Flux2LatentVAE
    from nodes.checkpoint.folders import folder_component, folder_state
    from nodes.checkpoint.load import reading

    modules = {"vae": Flux2LatentVAE(folder_component(path / "vae", AutoencoderKLFlux2, dtype))}
    found = folder_state(path / "text_encoder", dtype)
    if found is None:
        raise OSError("text_encoder/ holds no .safetensors weights")
    with reading(found[0]):
        modules["text_encoder"] = build_text(found[1], path, dtype)
    return modules


def _klein_text(state: Any, path: Path, dtype: Any) -> Any:
    from transformers import Qwen3Config

    from nodes.checkpoint.qwen3_text import build_qwen3

    config = Qwen3Config.from_pretrained(str(path / "text_encoder"))
    return build_qwen3(state, f"{path.name}/text_encoder", dtype, config)


def _dev_text(state: Any, path: Path, dtype: Any) -> Any:
    """Mistral3ForConditionalGeneration's language model, by its own config's text_config."""
    from nodes.checkpoint.mistral_text import build_mistral

    text = json.loads((path / "text_encoder" / "config.json").read_text()).get("text_config")
    return build_mistral(state, f"{path.name}/text_encoder", dtype, text)


def qwen3_folder_tokenizer(path: Path) -> Any:
    """The folder's Qwen tokenizer (``tokenizer/``), else Kiln's Qwen3 one."""
    from transformers import Qwen2TokenizerFast

    from nodes.checkpoint.tokenizer_memo import folder_tokenizer
    from nodes.checkpoint.qwen_tokenizer import qwen_tokenizer

    return folder_tokenizer(path, Qwen2TokenizerFast, lambda: qwen_tokenizer("3"))


def _dev_tokenizer(path: Path) -> Any:
    from nodes.checkpoint.tekken_tokenizer import folder_tekken, tekken_tokenizer

    data = folder_tekken(path / "tokenizer")
    if data is None:
        raise CheckpointError(f"{path.name}/tokenizer holds no tekken.json (Mistral's tokenizer, which FLUX.2 [dev]'s "
                              "release ships there); Kiln reads the Mistral tokenizer from it")
    return tekken_tokenizer(data)
