"""Loading SD3.5 offline from the files people have.

* Stability's single files (``sd3.5_large.safetensors``, ``sd3.5_medium.safetensors``,
  ``sd3_medium_incl_clips*.safetensors``): ``model.diffusion_model.joint_blocks.*``,
  ``first_stage_model.*`` and, in some, ``text_encoders.clip_l.``, ``.clip_g.`` and
  ``.t5xxl.`` (each ``transformer.`` then transformers' layout). The released 3.5
  files hold no text encoders: the checkpoint loads, its CLIP says what is missing
  (ComfyUI gives no CLIP at all; Kiln gives one that has only the encoders found).
* The transformer alone (UNETLoader), with or without ``model.diffusion_model.``, or in
  diffusers' layout (``transformer/diffusion_pytorch_model.safetensors``).
* The text encoders as separate files (nodes.checkpoint.split, TripleCLIPLoader).

The original -> diffusers conversion is diffusers' own
``convert_sd3_transformer_checkpoint_to_diffusers``; the config comes from the shapes
(:func:`transformer_config`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from nodes.checkpoint.load import CheckpointError, Loaded, _assign, _empty
from nodes.checkpoint.tensors import plain, shapes_of
from nodes.families import sd3 as fam

#: What the error names for each encoder a single file may lack.
ENCODER_NAMES = {"text_encoder": "CLIP-L (text_encoders.clip_l.*)", "text_encoder_2": "CLIP-G (text_encoders.clip_g.*)",
                 "text_encoder_3": "T5-XXL (text_encoders.t5xxl.*)"}
#: Width of one attention head in every SD3 release (the head count is the width over this).
HEAD_WIDTH = 64
#: diffusers' SD3 sample_size (latent pixels); only a default image size, not a weight shape.
SAMPLE_SIZE = 128


#: Where each shape the config needs lives, in Stability's layout and in diffusers'.
ORIGINAL_KEYS = dict(proj="x_embedder.proj.weight", context="context_embedder.weight", pooled="y_embedder.mlp.0.weight",
                     positions="pos_embed", final="final_layer.linear.weight", blocks=r"joint_blocks\.(\d+)\.",
                     qk="joint_blocks.0.x_block.attn.ln_q.weight", dual=r"joint_blocks\.(\d+)\.x_block\.attn2\.")
DIFFUSERS_KEYS = dict(proj="pos_embed.proj.weight", context="context_embedder.weight",
                      pooled="time_text_embed.text_embedder.linear_1.weight", positions="pos_embed.pos_embed",
                      final="proj_out.weight", blocks=r"transformer_blocks\.(\d+)\.",
                      qk="transformer_blocks.0.attn.norm_q.weight", dual=r"transformer_blocks\.(\d+)\.attn2\.")


def is_diffusers_layout(keys: Any) -> bool:
    return DIFFUSERS_KEYS["positions"] in keys


def transformer_config(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """SD3Transformer2DModel arguments from the shapes of either layout (no ``model.diffusion_model.``).

    Depth from the blocks, width from the patch embedding, heads of 64 (the q/k
    norm's width where the file has one), ``pos_embed_max_size`` from the table's
    length, Medium's extra self-attention layers from their ``attn2`` keys."""
    from nodes.families.base import indices

    names = DIFFUSERS_KEYS if is_diffusers_layout(shapes) else ORIGINAL_KEYS
    try:
        proj, context, pooled = shapes[names["proj"]], shapes[names["context"]], shapes[names["pooled"]]
        positions, final = shapes[names["positions"]][1], shapes[names["final"]]
    except KeyError as exc:
        raise CheckpointError(f"not a complete SD3 transformer ({exc} is missing)") from None
    layers = indices(shapes, names["blocks"])
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"the SD3 transformer's blocks are not numbered 0..n (found {layers[:5]}...)")
    width, patch = proj[0], proj[2]
    qk = shapes.get(names["qk"])
    head = qk[0] if qk is not None else HEAD_WIDTH
    side = math.isqrt(positions)
    if side * side != positions or width % head:
        raise CheckpointError(f"the SD3 transformer's shapes do not fit (width {width}, {positions} positions)")
    return dict(sample_size=SAMPLE_SIZE, patch_size=patch, in_channels=proj[1], num_layers=len(layers),
                attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=context[1],
                caption_projection_dim=context[0], pooled_projection_dim=pooled[1],
                out_channels=final[0] // (patch * patch), pos_embed_max_size=side,
                dual_attention_layers=tuple(indices(shapes, names["dual"])),
                qk_norm="rms_norm" if qk is not None else None)


def build_transformer(state: Mapping[str, Any], what: str, dtype: Any, fp8: str = "") -> Any:
    """SD3Transformer2DModel from Stability's tensors (with or without the prefix) or diffusers'. Linear
    weights are held as nodes.runtime.fp8.held_dtype says (a bf16 file computing in fp32 keeps them bf16,
    cast per layer); ``fp8`` (a torch dtype name, UNETLoader's weight_dtype) stores them in that 8-bit float."""
    import torch
    from diffusers import SD3Transformer2DModel

    from nodes.checkpoint import scaled_fp8
    from nodes.runtime.fp8 import keep_linears_as_stored

    state = {k[len(fam.UNET_PREFIX):] if k.startswith(fam.UNET_PREFIX) else k: v for k, v in plain(state).items()}
    state, scales = scaled_fp8.take(state, what)
    state = dict(state)
    fp8 = "" if scales else fp8  # as ComfyUI: a scaled file keeps its own storage
    try:
        config = transformer_config({k: tuple(v.shape) for k, v in state.items()})
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    model = _empty(SD3Transformer2DModel, config)
    try:  # diffusers' own layout (a transformer folder's file) needs no conversion
        converted = dict(state) if is_diffusers_layout(state) else \
            _converted(state)
        if not is_diffusers_layout(state):
            scales = scaled_fp8.follow(scales, {k: tuple(v.shape) for k, v in state.items()}, _converted)
    except KeyError as exc:
        raise CheckpointError(f"{what}: the SD3 transformer's keys do not fit the SD3 layout ({exc} is missing)") \
            from None
    if fp8:
        target = getattr(torch, fp8)
        converted = {k: v.to(target) if v.ndim == 2 and k.endswith(".weight") and v.is_floating_point() else v
                     for k, v in converted.items()}
    try:
        model = _assign(model, keep_linears_as_stored(model, converted, dtype), "SD3 transformer", None)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    return scaled_fp8.attach(model, scales, what)


def build_vae(state: Mapping[str, Any], prefix: str, what: str, dtype: Any) -> Any:
    """The 16-channel SD3 VAE (FLUX's architecture, SD3's scale and shift in its config)."""
    from nodes.checkpoint.flux_load import build_vae as build_16_channel

    vae = build_16_channel(state, prefix, what, dtype)
    vae.register_to_config(scaling_factor=fam.SD3_LATENT.scale, shift_factor=fam.SD3_LATENT.shift)
    return vae


def _sampling() -> dict[str, Any]:
    return fam.FAMILY.scheduler_config()


def load_transformer_file(state: Mapping, name: str, dtype: Any, fp8: str = "", offload: Any = None) -> Loaded:
    """UNETLoader's SD3 path: the transformer alone; ``fp8`` as for :func:`build_transformer`. ``offload``:
    the manager's plan, asked before building (nodes.checkpoint.flux_load.OffloadAsk); when it pages the
    transformer to disk, it is built straight into its blocks (nodes.checkpoint.paged_files)."""
    from nodes.checkpoint.flux_load import _held_note
    from nodes.checkpoint.paged_files import file_straight, strip
    from nodes.runtime.fp8 import fp8_bytes

    transformer = None if offload is None else \
        file_straight(state, name, dtype, fp8, offload, file_layout(strip(state), name))
    if transformer is None:
        transformer = build_transformer(state, name, dtype, fp8)
    return Loaded(family=fam.FAMILY, scheduler_config=_sampling(), latent=fam.SD3_LATENT,
                  modules={"unet": transformer},
                  info={"format": "unet", "prediction_type": "flow", "prediction_reason": "flow matching (SD3)",
                        "fp8": fp8_bytes(transformer) > 0, **_held_note(transformer)})


def _converted(state: Mapping[str, Any]) -> dict[str, Any]:
    from diffusers.loaders import single_file_utils as sfu

    return sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(state))


def file_layout(state: Mapping[str, Any], what: str) -> Any:
    """How an SD3 file (prefix stripped) becomes its module, for a build straight into disk blocks:
    diffusers' own converter, as :func:`build_transformer` uses it (none for diffusers' layout)."""
    from diffusers import SD3Transformer2DModel

    from nodes.checkpoint.paged_files import FileLayout

    return FileLayout(SD3Transformer2DModel, "SD3", transformer_config,
                      None if is_diffusers_layout(state) else _converted)


def text_encoders(state: Mapping[str, Any], name: str, dtype: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(modules, tokenizers, missing encoder names) for the encoders a single file holds."""
    from nodes.checkpoint import detect as det
    from nodes.checkpoint.flux_load import build_t5
    from nodes.checkpoint.load import build_text_encoder
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    shapes = shapes_of(state)
    modules, tokenizers, missing = {}, {}, []
    for spec in fam.FAMILY.text_encoders:
        sub = {k: v for k, v in shapes.items() if k.startswith(spec.prefix)}
        if not sub:
            missing.append(spec.module)
            continue
        if spec.kind == "t5":
            modules[spec.module] = build_t5(state, spec.prefix, name, dtype)
            tokenizers[spec.tokenizer] = t5_tokenizer()
            continue
        config = det.lone_text_config(sub, "transformers", spec.prefix, spec.kind, drop_last=False)
        try:
            modules[spec.module] = build_text_encoder(state, spec.prefix, "transformers", spec, config, dtype)
        except (CheckpointError, KeyError) as exc:
            raise CheckpointError(f"{name}: the SD3 {ENCODER_NAMES[spec.module]} does not load: {exc}") from None
        tokenizers[spec.tokenizer] = clip_tokenizer(spec.pad)
    return modules, tokenizers, missing


def load_single_file(state: Mapping, name: str, dtype: Any) -> Loaded:
    """A Stability SD3 checkpoint: transformer, VAE and the text encoders it holds."""
    shapes = shapes_of(state)
    vae_prefix = next((p for p in ("first_stage_model.", "vae.") if p + "decoder.conv_in.weight" in shapes), None)
    if vae_prefix is None:
        raise CheckpointError(f"{name} holds an SD3 transformer without a VAE (no first_stage_model.*): it is a "
                              "diffusion model, not a checkpoint. Load it with UNETLoader, the text encoders with "
                              "TripleCLIPLoader (clip_l, clip_g, t5xxl) and the VAE with VAELoader")
    transformer = build_transformer({k: state[k] for k in state if k.startswith(fam.UNET_PREFIX)}, name, dtype)
    vae = build_vae(state, vae_prefix, name, dtype)
    modules, tokenizers, missing = text_encoders(state, name, dtype)
    info: dict[str, Any] = {"format": "single_file", "prediction_type": "flow",
                            "prediction_reason": "flow matching (SD3)"}
    if missing:
        info["missing_text"] = [ENCODER_NAMES[m] for m in missing]
    return Loaded(family=fam.FAMILY, scheduler_config=_sampling(), latent=fam.SD3_LATENT,
                  modules={"unet": transformer, "vae": vae, **modules}, tokenizers=tokenizers, info=info)


def is_sd3_folder(path: Any) -> bool:
    """A diffusers SD3 pipeline folder: a transformer beside a third text encoder, or a model index naming SD3."""
    import json

    index = path / "model_index.json"
    if not (path.is_dir() and index.is_file() and (path / "transformer").is_dir()):
        return False
    if (path / "text_encoder_3").is_dir():
        return True
    try:
        return "StableDiffusion3" in str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return False


def load_folder(path: Any, dtype: Any) -> Loaded:
    """A diffusers SD3 pipeline folder (StableDiffusion3Pipeline.save_pretrained / the hub layout); a folder
    without text_encoder_3 (diffusers allows it) gives zeros for T5, as diffusers' pipeline does."""
    import dataclasses
    import json

    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from nodes.checkpoint.flux_load import _folder_t5
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.load import quiet_progress
    from nodes.checkpoint.t5_tokenizer import t5_tokenizer
    from nodes.checkpoint.tokenizer import clip_tokenizer

    quiet_progress()
    modules: dict[str, Any] = {}
    try:
        modules["unet"] = folder_component(path / "transformer", SD3Transformer2DModel, dtype)
        modules["vae"] = folder_component(path / "vae", AutoencoderKL, dtype)
        for spec in fam.FAMILY.text_encoders:
            if not (path / spec.module).is_dir():
                continue
            modules[spec.module] = _folder_t5(path / spec.module, dtype) if spec.kind == "t5" else \
                folder_component(path / spec.module, CLIPTextModelWithProjection, dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: not a loadable diffusers SD3 folder ({exc})") from exc
    for m in modules.values():
        m.eval()
        m.requires_grad_(False)
    tokenizers = {}
    for spec in fam.FAMILY.text_encoders:
        if spec.module in modules:
            tokenizers[spec.tokenizer] = t5_tokenizer() if spec.kind == "t5" else clip_tokenizer(spec.pad)
    config = fam.FAMILY.scheduler_config()
    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        shift = json.loads(sched_file.read_text()).get("shift")
        if shift is not None:
            config["shift"] = float(shift)
    vae_cfg = modules["vae"].config
    latent = dataclasses.replace(fam.SD3_LATENT, scale=float(vae_cfg.scaling_factor),
                                 shift=float(getattr(vae_cfg, "shift_factor", None) or 0.0))
    info: dict[str, Any] = {"format": "diffusers", "prediction_type": "flow",
                            "prediction_reason": "flow matching (SD3)"}
    missing = [ENCODER_NAMES[s.module].split(" (")[0] for s in fam.FAMILY.text_encoders if s.module not in modules]
    if missing:
        info["missing_text"] = missing
    return Loaded(family=fam.FAMILY, scheduler_config=config, latent=latent, modules=modules, tokenizers=tokenizers,
                  info=info)
