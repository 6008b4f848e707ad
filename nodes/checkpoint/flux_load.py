"""Loading FLUX.1 offline from the files people have.

* ComfyUI's split layout: the transformer alone in the original (BFL) key layout
  (``models/diffusion_models/flux1-dev.safetensors``, also fp8 ``float8_e4m3fn``
  files), with or without ``model.diffusion_model.``, or in diffusers' layout;
  CLIP-L and T5-XXL as separate text-encoder files; ``ae.safetensors`` as the VAE.
* All-in-one single files (ComfyUI's checkpoint layout: ``model.diffusion_model.``,
  ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``,
  ``vae.`` or ``first_stage_model.``).
* diffusers folders (``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``).

Configs come from tensor shapes (nodes.checkpoint.flux_keys); tokenizers are the
folder's or the shipped ones. fp8 transformer weights stay fp8 (nodes.runtime.fp8).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from nodes.checkpoint import detect as det
from nodes.checkpoint import flux_keys
from nodes.checkpoint.load import CheckpointError, Loaded, _assign, _empty
from nodes.checkpoint.tensors import plain, shapes_of
from nodes.checkpoint.tokenizer_memo import folder_tokenizer
from nodes.families import flux as fam

T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"


def has_flux_transformer(shapes: Any) -> bool:
    return fam.FAMILY.claims_unet(shapes)


def family_of(shapes: Any) -> fam.Flux:
    return fam.SCHNELL if fam.SCHNELL.claims_unet(shapes) else fam.FAMILY


def build_transformer(state: dict[str, Any], what: str, dtype: Any) -> Any:
    """FluxTransformer2DModel from BFL- or diffusers-layout tensors (linear weights held by
    nodes.runtime.fp8.held_dtype: fp8 kept fp8, bf16 kept bf16 when computing in fp32)."""
    from diffusers import FluxTransformer2DModel

    return transformer_from_file(state, what, dtype, FluxTransformer2DModel, "FLUX", flux_keys,
                                 flux_keys.bfl_to_diffusers, flux_keys.diffusers_to_bfl,
                                 lambda s: all(k in s for k in fam.DIFFUSERS_MARKERS))


def transformer_from_file(state: Mapping[str, Any], what: str, dtype: Any, model_cls: Any, label: str, keys: Any,
                          to_diffusers: Callable, from_diffusers: Callable, is_diffusers: Callable[[Any], bool],
                          refuse: Callable[[Any], None] | None = None) -> Any:
    """A FLUX-shaped transformer (FLUX's, Chroma's, FLUX.2's, Z-Image's) from a file's tensors in either
    layout, one rule for all: ComfyUI's ``model.diffusion_model.`` taken off (``keys.strip``), the fp8
    scales taken (nodes.checkpoint.scaled_fp8.take), ``refuse(state)`` (a family's CheckpointError for
    a variant Kiln does not run), then :func:`transformer_from_original`, through ``from_diffusers``
    first when ``is_diffusers(state)`` (diffusers' layout in one file)."""
    from nodes.checkpoint import scaled_fp8

    state, scales = scaled_fp8.take(keys.strip(dict(state)), what)
    if refuse is not None:
        refuse(state)
    return transformer_from_original(dict(state), scales, what, dtype, model_cls, label, keys, to_diffusers,
                                     from_diffusers if is_diffusers(state) else None)


def transformer_from_original(state: dict[str, Any], scales: dict[str, Any], what: str, dtype: Any,
                              model_cls: Any, label: str, keys: Any, to_diffusers: Callable,
                              from_diffusers: Callable | None = None) -> Any:
    """A FLUX-shaped transformer (FLUX's, Chroma's) from original-layout tensors: the config from
    the shapes (``keys.transformer_config``), the weights renamed by ``to_diffusers`` with their fp8
    scales following them, linear weights held as stored. ``from_diffusers``: the file is in
    diffusers' layout, brought to the original one first (its scales already carry the model's names)."""
    from nodes.checkpoint import scaled_fp8

    own: dict[str, Any] = {}  # a diffusers-layout file's scales: already under the model's names
    if from_diffusers is not None:
        state, own, scales = from_diffusers(state), scales, {}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = keys.transformer_config(shapes)
        converted = to_diffusers(state)
        scales = {**scaled_fp8.follow(scales, shapes, to_diffusers), **own}
    except keys.KeyMismatch as exc:
        raise CheckpointError(f"{what}: the {label} transformer's keys do not fit the {label} layout: {exc}") from None
    except KeyError as exc:
        raise CheckpointError(f"{what}: not a complete {label} transformer ({exc} is missing)") from None
    model = _empty(model_cls, config)
    return scaled_fp8.fill_as_stored(model, converted, scales, dtype, what, f"{label} transformer ({what})")


def _t5_skeleton(sub: Mapping[str, Any], what: str, umt5: bool = False) -> Any:
    """An uninitialised T5EncoderModel (accelerate's empty weights; ``umt5``: UMT5EncoderModel) configured
    from the shapes of the transformers-layout tensors ``sub``."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    #: T5 v1.0 (t5-11b, Cosmos' "oldt5") has one ReLU feed-forward input ``wi``; v1.1 / UMT5 a gated-GELU pair.
    gated = "encoder.block.0.layer.1.DenseReluDense.wi.weight" not in sub
    try:
        d_ff, d_model = sub["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape
        vocab = sub.get("shared.weight", sub.get("encoder.embed_tokens.weight")).shape[0]
        buckets, heads = sub["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        inner = sub["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    except (KeyError, AttributeError) as exc:
        raise CheckpointError(f"{what}: not a T5 encoder (no {exc})") from None
    layers = len({k.split(".")[2] for k in sub if k.startswith("encoder.block.")})
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                        num_heads=heads, relative_attention_num_buckets=buckets,
                        feed_forward_proj="gated-gelu" if gated else "relu",
                        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    return _empty(model_cls, config)


def _t5_state(model: Any, sub: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The file's T5 tensors as ``model`` holds them: the tied embedding under both names it may
    have, and the linear weights as stored (nodes.runtime.fp8.keep_linears_as_stored). T5-XXL is
    4.7 B parameters, 19 GB in fp32: kept as a fp16/fp8 file stores them, a CPU host computing in
    fp32 holds 8-12 GB of it."""
    from nodes.runtime.fp8 import keep_linears_as_stored

    own = model.state_dict()
    # transformers ties encoder.embed_tokens to shared (T5's _tied_weights_keys) and loads shared: one
    # tensor under both names, even where a file stores the two (0.5 GB each for T5-XXL in fp32)
    embedding = sub.get("shared.weight", sub.get("encoder.embed_tokens.weight"))
    sub = {k: v for k, v in sub.items() if not k.endswith("embed_tokens.weight") or
           (k in own and k != "encoder.embed_tokens.weight")}
    sub["shared.weight"] = embedding
    if "encoder.embed_tokens.weight" in own:
        sub["encoder.embed_tokens.weight"] = embedding
    return keep_linears_as_stored(model, sub, dtype)


def build_t5(state: Mapping[str, Any], prefix: str, what: str, dtype: Any, config: Any = None,
             umt5: bool = False) -> Any:
    """T5EncoderModel from transformers-layout keys under ``prefix``; its ``config`` (a T5Config, e.g. a
    folder's) or, lacking one, the config the shapes give. ``umt5``: the file is UMT5's (Wan's text encoder:
    the same names, a relative attention bias in every block), built as transformers' UMT5EncoderModel."""
    from nodes.checkpoint import scaled_fp8

    tied = prefix + "encoder.embed_tokens.weight"  # not read when shared.weight is there (_t5_state)
    sub = {k[len(prefix):]: state[k] for k in state
           if k.startswith(prefix) and not (k == tied and prefix + "shared.weight" in state)}
    sub, scales = scaled_fp8.take(sub, what)  # T5's keys need no conversion: scales stay under their names
    sub = dict(sub)
    if config is None:
        model = _t5_skeleton(sub, what, umt5)
    else:
        from transformers import T5EncoderModel, UMT5EncoderModel

        model = _empty(UMT5EncoderModel if umt5 else T5EncoderModel, config)
    try:
        model = _assign(model, _t5_state(model, sub, dtype), f"T5 text encoder ({what})", None)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    return scaled_fp8.attach(model, scales, what)


def t5_held_bytes(state: Mapping[str, Any], prefix: str, dtype: Any) -> int:
    """Bytes :func:`build_t5` will hold, from the header alone (tensors on the meta device through the
    same rule), for the model manager's plan before anything is read."""
    import torch

    from nodes.checkpoint.scaled_fp8 import MARKER, SUFFIXES
    from nodes.checkpoint.tensors import dtypes_of, shapes_of

    shapes, dtypes = shapes_of(state), dtypes_of(state)
    shapes = {k: s for k, s in shapes.items() if k != MARKER and not k.endswith(SUFFIXES)}
    sub = {k[len(prefix):]: torch.empty(shapes[k], dtype=dtypes[k], device="meta") for k in shapes if k.startswith(prefix)}
    with torch.device("meta"):
        model = _t5_skeleton(sub, prefix)
    held = {id(v): v for v in _t5_state(model, sub, dtype).values()}  # a tied tensor once, as build_t5 holds it
    return sum(v.numel() * v.element_size() for v in held.values())


def build_vae(state: dict[str, Any], prefix: str, what: str, dtype: Any) -> Any:
    """The 16-channel FLUX AutoencoderKL from original-layout keys under ``prefix``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    sub = {det.VAE + k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}
    shapes = {k: tuple(v.shape) for k, v in sub.items()}
    try:
        config = det.vae_config(shapes, fam.FAMILY)
    except det.UnsupportedCheckpoint as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    config.update(scaling_factor=fam.FLUX_LATENT.scale, shift_factor=fam.FLUX_LATENT.shift, force_upcast=False,
                  use_quant_conv=det.VAE + "quant_conv.weight" in shapes,
                  use_post_quant_conv=det.VAE + "post_quant_conv.weight" in shapes)
    vae = _empty(AutoencoderKL, config)
    try:
        converted = sfu.convert_ldm_vae_checkpoint(sub, dict(vae.config))
    except KeyError as exc:
        raise CheckpointError(f"{what}: the FLUX VAE is incomplete ({exc} is missing)") from None
    return _assign(vae, converted, f"FLUX VAE ({what})", dtype)


def is_flux_vae(shapes: Any, prefix: str = "") -> bool:
    key = prefix + "decoder.conv_in.weight"
    return key in shapes and shapes[key][1] == fam.FLUX_LATENT.channels


def _tokenizers() -> dict[str, Any]:
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    return {"tokenizer": clip_tokenizer(), "tokenizer_2": t5_tokenizer()}


def _sched(family: fam.Flux) -> dict[str, Any]:
    return family.scheduler_config()


#: A loader's question to the model manager before it builds a denoiser (ModelManager.plan_for_load):
#: ``(bytes the denoiser will hold, bytes of the same load's other modules)`` -> an offload Plan or None.
OffloadAsk = Callable[[int, int], Any]


def _straight_into_blocks(state: Mapping, name: str, dtype: Any, fp8: str, offload: OffloadAsk | None,
                          besides: int = 0) -> Any:
    """The transformer built straight into blocks resting on disk (nodes.checkpoint.flux_blocks) when the
    manager, asked with the size from the header, will page it to disk anyway; None otherwise (load whole)."""
    from nodes.checkpoint import flux_blocks

    if offload is None or not (flux_blocks.is_bfl(state) or flux_blocks.is_diffusers(state)):
        return None
    plan = offload(flux_blocks.held_bytes(state, dtype, fp8), besides)
    if plan is None or plan.rest != "disk":  # on a GPU host the blocks rest in RAM: built whole, then placed
        return None
    return flux_blocks.build_into_blocks(state, name, dtype, plan, fp8=fp8)


def load_transformer_file(state: Mapping, name: str, dtype: Any, fp8: str = "",
                          offload: OffloadAsk | None = None) -> Loaded:
    """UNETLoader's FLUX path: the transformer alone; ``fp8`` (a torch dtype name) stores its
    linear weights in that 8-bit float (UNETLoader's weight_dtype). ``offload``: the manager's
    plan for the denoiser, asked before building (None: always built whole)."""
    from nodes.checkpoint.flux_blocks import strip_prefix
    from nodes.checkpoint.scaled_fp8 import is_scaled

    bare = strip_prefix(state, fam.UNET_PREFIX) if any(k.startswith(fam.UNET_PREFIX) for k in state) else state
    fp8 = "" if is_scaled(state.keys()) else fp8  # as ComfyUI: a scaled file's own storage, weight_dtype unused
    family = family_of({k: () for k in bare})
    transformer = _straight_into_blocks(bare, name, dtype, fp8, offload)
    if transformer is None:
        state = plain(state)
        if fp8:
            import torch

            target = getattr(torch, fp8)
            state = {k: v.to(target) if v.ndim == 2 and k.endswith(".weight") and v.is_floating_point() else v
                     for k, v in state.items()}
        transformer = build_transformer(state, name, dtype)
    from nodes.runtime.fp8 import fp8_bytes

    return Loaded(family=family, scheduler_config=_sched(family), latent=family.latent,
                  modules={"unet": transformer},
                  info={"format": "unet", "prediction_type": "flow", "fp8": fp8_bytes(transformer) > 0,
                        "prediction_reason": "flow matching (FLUX)", **_held_note(transformer)})


def _held_note(transformer: Any) -> dict[str, str]:
    """``info["held"]`` for the loader's message: the weights held as stored, if any (a CPU host may then
    widen them: nodes.runtime.models.ModelManager.widen_if_room replaces the note)."""
    from nodes.runtime.fp8 import kept_as_stored, weight_scale

    kept = kept_as_stored(transformer)
    scaled = sum(weight_scale(m) is not None for m in transformer.modules())
    scales = f", {scaled} of them times their file's scales" if scaled else ""
    return {"held": f"{kept} weights kept {kept} and cast per layer{scales}"} if kept else {}


def load_single_file(state: Mapping, name: str, dtype: Any, offload: OffloadAsk | None = None) -> Loaded:
    """An all-in-one FLUX checkpoint: transformer, CLIP-L, T5-XXL and VAE in one file, read tensor by
    tensor (a LazyState); ``offload`` as for :func:`load_transformer_file`."""
    from nodes.checkpoint.load import build_text_encoder

    shapes = shapes_of(state)
    clip_found = any(k.startswith(fam.CLIP_L_PREFIX) for k in shapes)
    t5_found = any(k.startswith(fam.T5_PREFIX) for k in shapes)
    vae_prefix = next((p for p in ("vae.", "first_stage_model.") if is_flux_vae(shapes, p)), None)
    lacking = [what for what, ok in (("CLIP-L (text_encoders.clip_l.*)", clip_found),
                                     ("T5-XXL (text_encoders.t5xxl.*)", t5_found),
                                     ("the VAE (vae.*)", vae_prefix is not None)) if not ok]
    if lacking:
        raise CheckpointError(
            f"{name} holds a FLUX transformer without {', '.join(lacking)}: it is a diffusion model, not a "
            "checkpoint. Put it in models/diffusion_models and load it with UNETLoader, the text encoders with "
            "DualCLIPLoader (type flux: clip_l + t5xxl) and ae.safetensors with VAELoader")
    from nodes.checkpoint.flux_blocks import strip_prefix

    family = family_of({k[len(fam.UNET_PREFIX):]: v for k, v in shapes.items() if k.startswith(fam.UNET_PREFIX)})
    besides = t5_held_bytes(state, fam.T5_PREFIX, dtype) + dtype.itemsize * sum(
        math.prod(s) for k, s in shapes.items() if not k.startswith((fam.UNET_PREFIX, fam.T5_PREFIX)))
    transformer = _straight_into_blocks(strip_prefix(state, fam.UNET_PREFIX), name, dtype, "", offload, besides)
    if transformer is None:
        transformer = build_transformer(plain({k: state[k] for k in state if k.startswith(fam.UNET_PREFIX)}),
                                        name, dtype)
    spec = fam.FAMILY.text_encoders[0]
    clip_shapes = {k: v for k, v in shapes.items() if k.startswith(fam.CLIP_L_PREFIX)}
    config = det.lone_text_config(clip_shapes, "transformers", fam.CLIP_L_PREFIX, "openai", drop_last=False)
    clip = build_text_encoder(state, fam.CLIP_L_PREFIX, "transformers", spec, config, dtype)
    t5 = build_t5(state, fam.T5_PREFIX, name, dtype)
    vae = build_vae(state, vae_prefix, name, dtype)
    return Loaded(family=family, scheduler_config=_sched(family), latent=family.latent,
                  modules={"unet": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5},
                  tokenizers=_tokenizers(),
                  info={"format": "single_file", "prediction_type": "flow", "prediction_reason": "flow matching (FLUX)"})


def _folder_t5(folder: Path, dtype: Any) -> Any:
    """A folder's T5 (``text_encoder_2/``), its linear weights held as stored (:func:`build_t5`, which
    ties the embedding saved once under ``shared.weight``); .bin files through from_pretrained."""
    from transformers import T5Config, T5EncoderModel

    from nodes.checkpoint.folders import folder_state
    from nodes.checkpoint.load import reading

    found = folder_state(folder, dtype)
    if found is None:
        model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True)
        return model if model.dtype == dtype else model.to(dtype)
    with reading(found[0]):
        return build_t5(found[1], "", f"{folder.parent.name}/{folder.name}", dtype, T5Config.from_pretrained(str(folder)))


def is_flux_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file() and (path / "transformer").is_dir()


def load_folder(path: Path, dtype: Any, offload: OffloadAsk | None = None) -> Loaded:
    """A diffusers FLUX pipeline folder (FluxPipeline.save_pretrained / the hub layout, sharded or not).
    The transformer's and T5's linear weights are held as stored, as from the split files
    (nodes.runtime.fp8.held_dtype: the hub's bf16 transformer is 23.8 GB in a CPU's fp32 instead of
    47.6 GB). ``offload``: the manager's plan for the transformer, asked last with the other
    components' bytes (built straight into disk blocks when it will be paged there)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    from nodes.checkpoint.flow_transformers import folder_modules, folder_scheduler_config, vae_latent
    from nodes.checkpoint.folders import folder_component

    def others() -> dict[str, Any]:
        return {"vae": folder_component(path / "vae", AutoencoderKL, dtype),
                "text_encoder": folder_component(path / "text_encoder", CLIPTextModel, dtype),
                "text_encoder_2": _folder_t5(path / "text_encoder_2", dtype)}

    modules = folder_modules(path, "FLUX", others, FluxTransformer2DModel, dtype, offload)
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    tokenizers = {"tokenizer": folder_tokenizer(path, CLIPTokenizer, clip_tokenizer),
                  "tokenizer_2": folder_tokenizer(path, T5TokenizerFast, t5_tokenizer, "tokenizer_2")}
    family = fam.FAMILY if modules["unet"].config.guidance_embeds else fam.SCHNELL
    config = folder_scheduler_config(path, family)
    latent = vae_latent(family, modules["vae"])
    return Loaded(family=family, scheduler_config=config, latent=latent, modules=modules, tokenizers=tokenizers,
                  info={"format": "diffusers", "prediction_type": "flow",
                        "prediction_reason": "flow matching (FLUX)", **_held_note(modules["unet"])})
