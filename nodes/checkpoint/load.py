"""Build diffusers/transformers components from a checkpoint file or a diffusers folder, offline.

Single files: :mod:`nodes.checkpoint.detect` infers the family and every
component config from the keys and shapes; modules are created without random
initialisation (weights "on meta", then assigned) and filled with diffusers' own
original-layout converters, the same ones ``from_single_file`` uses. Nothing is
fetched: the configs come from the shapes plus the family table, the tokenizer
from the shipped BPE merges.

Pickle files (.ckpt/.pt/.pth/.bin) are only read with ``torch.load(weights_only=True)``,
which cannot run code; a file that needs more is refused.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nodes.checkpoint import detect as det
from nodes.checkpoint.tensors import LazyState, cast_view, dtypes_of, shapes_of
from nodes.checkpoint.tokenizer_memo import folder_tokenizer
from nodes import families, unclip
from nodes.families.base import Family, LatentFormat
from nodes.runtime.precision import resolve

SAFE_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_EXTENSIONS = SAFE_EXTENSIONS + PICKLE_EXTENSIONS


class CheckpointError(ValueError):
    """A file that cannot be loaded; the message says why in the user's terms."""


@dataclass
class Loaded:
    """What the model manager stores for one checkpoint (torch modules are placed by it)."""

    family: Family
    scheduler_config: dict[str, Any]
    latent: LatentFormat
    modules: dict[str, Any]  # unet, vae, text_encoder[, text_encoder_2]
    tokenizers: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def kiln_modules(self) -> dict[str, Any]:
        """The modules the model manager places and offloads (see nodes.runtime.models)."""
        return self.modules


# -- reading tensors ----------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, Any]:
    """All tensors of a file on the CPU; clear errors for corrupt files and unsafe pickles."""
    name = path.name
    if path.suffix.lower() in SAFE_EXTENSIONS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{name} is not a readable .safetensors file (truncated or corrupt?): {exc}") from exc
    if path.suffix.lower() in PICKLE_EXTENSIONS:
        import torch

        from nodes.checkpoint.pickle_file import PickleRefused, load_weights_only

        try:
            data = load_weights_only(path)
        except PickleRefused as exc:
            raise CheckpointError(f"{name} {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise CheckpointError(f"{name} does not hold a state dict of named tensors")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{name}: unsupported file type {path.suffix!r} (use .safetensors or a diffusers folder)")


def file_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's text metadata ({} for other files or none): what some files say beside their
    tensors (an Anima LLLite's version and layout)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def open_state(path: Path) -> Mapping[str, Any]:
    """A checkpoint's tensors for building modules: a .safetensors file as a
    :class:`~nodes.checkpoint.tensors.LazyState` (each tensor read and cast when a
    converter asks for it, so a load never holds two copies), a pickle as a dict."""
    if path.suffix.lower() not in SAFE_EXTENSIONS:
        return read_state_dict(path)
    from safetensors import SafetensorError

    try:
        return LazyState.open(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} is not a readable .safetensors file (truncated or corrupt?): {exc}") from exc


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns a read failure in the middle of a lazy load into the same clear error as one at opening."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise CheckpointError(f"{path.name} is not a readable .safetensors file (truncated or corrupt?): {exc}") from exc


# -- building modules without random initialisation -----------------------------------


def _empty(cls: Any, config: Any) -> Any:
    """A module whose parameters are not initialised (they are assigned from the file next):
    on the meta device, its initialisers skipped (nodes.checkpoint.no_init).

    Without accelerate (a bare torch + diffusers machine) the parameters are allocated,
    uninitialised: briefly one more copy of its weights, but the same result, since every
    weight is then assigned from the file.
    """
    from nodes.checkpoint.no_init import skipped_init

    try:
        from accelerate import init_empty_weights
    except ImportError:
        empty: Any = contextlib.nullcontext()
    else:
        empty = init_empty_weights(include_buffers=False)
    with empty, skipped_init():
        return cls(config) if not isinstance(config, dict) else cls(**config)


def _assign(module: Any, state: dict[str, Any], what: str, dtype: Any,
            file_names: Callable[[list[str]], list[str]] | None = None) -> Any:
    """Load ``state`` into ``module`` strictly (every weight present, none left over), floats cast to
    ``dtype``; ``dtype`` None: the tensors are already as the module holds them
    (nodes.runtime.fp8.keep_linears_as_stored).

    ``file_names`` maps module key names back to the file's own, so an error names
    the keys a user can find in the file."""
    own = module.state_dict()
    # one tensor at a time: each cast replaces its source in the dict, never a second full set
    state = dict(state)
    for k, v in state.items():
        if dtype is not None and v.is_floating_point() and v.dtype != dtype:
            state[k] = v.to(dtype)
            del v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing and file_names is not None:
        try:
            missing = [f"{f} ({m})" for f, m in zip(file_names(missing), missing)]
        except KeyError:  # a name with no original-layout twin: keep the module's
            pass
    if missing or unexpected:
        raise CheckpointError(f"the {what} weights do not fit the detected architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"the {what} weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    module.requires_grad_(False)  # before assigning: an int8 weight cannot be a parameter that wants gradients
    module.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if dtype is not None and buf.is_floating_point() and buf.dtype != dtype:
            buf.data = buf.data.to(dtype)
    module.eval()
    return module


def _text_state(state: dict[str, Any], module: Any) -> dict[str, Any]:
    """Match transformers' key style (CLIPTextModel dropped ``text_model.`` in 5.6) and depth."""
    own = module.state_dict()
    flat = not any(k.startswith("text_model.") for k in own)
    out = {}
    layers = module.config.num_hidden_layers
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        key = k[len("text_model."):] if flat and k.startswith("text_model.") else k
        if ".layers." in key and int(key.split(".layers.")[1].split(".")[0]) >= layers:
            continue  # SD 2.x's unused last OpenCLIP block
        if key == "text_projection.weight" and key not in own:
            continue
        out[key] = v
    return out


def build_text_encoder(state: dict[str, Any], prefix: str, layout: str, spec: Any, config: dict[str, Any],
                       dtype: Any) -> Any:
    """A CLIP text encoder from the keys under ``prefix`` in ``layout`` ("transformers" | "openclip")."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if spec.pooled else CLIPTextModel
    te = _empty(cls, CLIPTextConfig(**config))
    if layout == "transformers":
        state = cast_view(state, dtype)
        sub = {k[len(prefix):]: state[k] for k in state if k.startswith(prefix) and not k.endswith("position_ids")}
        if not any(k.startswith("text_model.") for k in sub):
            sub = {("text_model." + k if k != "text_projection.weight" else k): v for k, v in sub.items()}
    else:
        try:
            sub = sfu.convert_open_clip_checkpoint(te, cast_view(state, dtype), prefix=prefix)
        except KeyError as exc:
            raise CheckpointError(f"the OpenCLIP text encoder is incomplete: {exc} is missing") from None
    if not spec.pooled:
        sub.pop("text_projection.weight", None)
    elif "text_projection.weight" not in sub and getattr(spec, "projection_optional", False):
        import torch

        sub["text_projection.weight"] = torch.eye(te.config.projection_dim, te.config.hidden_size, dtype=dtype)
    return _assign(te, _text_state(sub, te), f"text encoder ({spec.module}) under {prefix}", dtype)


def load_single_file(path: Path, dtype: Any, vae_dtype: Any = None, prediction: str = "auto",
                     offload: Any = None) -> Loaded:
    """A checkpoint file's modules; tensors are read one by one, each cast as it is read.
    ``offload``: see :func:`load_checkpoint`."""
    state = open_state(path)
    shapes = shapes_of(state)
    from nodes.checkpoint import auraflow_load, flux_load, qwen_image21_load, sam3_load, sd3_load

    if sam3_load.is_sam3(shapes):  # SAM 3 / 3.1: a text-prompted detector, not a diffusion model
        with reading(path):
            return sam3_load.load_single_file(state, shapes, resolve(dtype, None), path.name)  # default dtypes
    from nodes.families import flux as flux_family, lumina2 as lumina2_family, sd3 as sd3_family

    if auraflow_load.has_transformer(shapes):  # AuraFlow / Pony V7: an MMDiT, Pile-T5-XL and SDXL's VAE
        return auraflow_load.load_single_file(state, path, dtype, vae_dtype, offload)  # resolves its own dtype
    if sd3_family.is_sd3_transformer(shapes):  # SD3: an MMDiT, up to three text encoders, a 16-channel VAE
        with reading(path):
            return sd3_load.load_single_file(state, path.name, resolve(dtype, sd3_family.FAMILY))
    from nodes.checkpoint import (chroma_load, ernie_image_load, fibo2_load, flux2_load, hidream_load, ideogram4_load,
                                  joyimage_load, kandinsky5_load, krea2_load, longcat_load, lumina2_load, ovis_load,
                                  qwen_image_load, z_image_load)

    if hidream_load.has_transformer(shapes):  # four text encoders: its own loader
        raise CheckpointError(f"{path.name} holds a HiDream-I1 transformer: it is a diffusion model, not a "
                              "checkpoint. Put it in models/diffusion_models and load it with UNETLoader, "
                              "clip_l_hidream, clip_g_hidream, t5xxl and llama_3.1_8b_instruct with "
                              "QuadrupleCLIPLoader and ae.safetensors with VAELoader")

    from nodes.checkpoint import cosmos_load, flux3_load

    for claims, label, text_file, clip_type, vae_file in (  # diffusion models alone: each names its loaders
            (cosmos_load.has_transformer, "Cosmos Predict2", "oldt5_xxl*.safetensors", "cosmos",
             "wan_2.1_vae.safetensors"),
            (cosmos_load.has_anima_transformer, "Anima", "qwen_3_06b_base.safetensors", "stable_diffusion",
             "qwen_image_vae.safetensors"),
            (flux3_load.has_transformer, "FLUX.3", "qwen3vl_4b*.safetensors", "flux3", "flux2-vae.safetensors"),
            (ideogram4_load.has_transformer, "Ideogram 4", "qwen3vl_8b*.safetensors", "ideogram4",
             "flux2-vae.safetensors"),
            (fibo2_load.has_transformer, "FIBO 2", "qwen3vl_4b*.safetensors", "fibo2", "flux2-vae.safetensors"),
            (krea2_load.has_transformer, "Krea 2", "qwen3vl_4b*.safetensors", "krea2", "qwen_image_vae.safetensors"),
            (ernie_image_load.has_transformer, "ERNIE-Image", "ministral-3-3b.safetensors", "flux2",
             "flux2-vae.safetensors"),
            (kandinsky5_load.has_transformer, "Kandinsky 5", "qwen_2.5_vl_7b*.safetensors and clip_l.safetensors",
             "kandinsky5_image", "ae.safetensors"),
            (joyimage_load.has_transformer, "JoyImage", "qwen3vl_8b_joyimage_edit*.safetensors", "joyimage",
             "wan_2.1_vae.safetensors"),
            (ovis_load.has_transformer, "Ovis-Image", "ovis_2.5.safetensors", "ovis", "ae.safetensors"),
            (flux2_load.dev.FAMILY.claims_unet, "FLUX.2 [dev]", "mistral_3_small_flux2*.safetensors", "flux2",
             "flux2-vae.safetensors"),
            (flux2_load.has_flux2_transformer, "FLUX.2", "the Qwen3", "flux2", "flux2-vae.safetensors"),
            (qwen_image_load.has_transformer, "Qwen-Image", "qwen_2.5_vl_7b*.safetensors", "qwen_image",
             "qwen_image_vae.safetensors"),
            (qwen_image21_load.has_transformer, "Qwen-Image 2.1", "qwen3vl_8b*.safetensors", "qwen_image",
             "qwen_image_2.1_vae_bf16.safetensors"),
            (z_image_load.has_z_image_transformer, "Z-Image", "qwen_3_4b", "lumina2", "ae.safetensors"),
            (longcat_load.has_transformer, "LongCat-Image", "qwen_2.5_vl_7b*.safetensors", "longcat_image",
             "ae.safetensors"),
            (chroma_load.has_chroma_transformer, "Chroma", "the T5-XXL", "chroma", "ae.safetensors")):
        if claims(shapes):
            clip_loader = "DualCLIPLoader" if " and " in text_file else "CLIPLoader"  # two encoder files
            raise CheckpointError(f"{path.name} holds a {label} transformer: it is a diffusion model, not a "
                                  "checkpoint. Put it in models/diffusion_models and load it with UNETLoader, "
                                  f"{text_file} with {clip_loader} (type {clip_type}) and {vae_file} with VAELoader")
    from nodes.checkpoint import pixart_load

    if pixart_load.has_transformer(shapes):  # PixArt-α / -Σ: the transformer alone, its own loaders
        raise pixart_load.refuse_checkpoint(path.name)
    if lumina2_load.has_transformer(shapes):  # Lumina 2 (NetaYume's all-in-one): Gemma 2 and a FLUX VAE
        with reading(path):
            return lumina2_load.load_single_file(state, path.name, resolve(dtype, lumina2_family.FAMILY),
                                                 offload=offload)
    if flux_load.has_flux_transformer(shapes):  # FLUX: a transformer, T5 and a 16-channel VAE
        with reading(path):
            return flux_load.load_single_file(state, path.name, resolve(dtype, flux_family.FAMILY), offload=offload)
    with reading(path):
        try:
            found = det.detect(shapes, std_of=lambda k: float(state[k].float().std(unbiased=False)),
                               value_of=lambda k: float(state[k].float().reshape(-1)[0]))
        except det.UnsupportedCheckpoint as exc:
            raise CheckpointError(f"{path.name}: {exc}") from exc
        except (KeyError, IndexError, StopIteration) as exc:
            raise CheckpointError(f"{path.name}: the weights are incomplete or of an unknown layout ({exc})") from exc
        import torch

        dtype = resolve(dtype, found.family)
        vae_dtype = vae_dtype or (torch.float32 if found.vae.get("force_upcast") else dtype)
        pred, why = found.prediction_type, found.prediction_reason
        if prediction != "auto":
            pred, why = prediction, "set on the loader"

        try:
            return _build_single_file(state, found, dtype, vae_dtype, pred, why, offload)
        except CheckpointError as exc:
            raise CheckpointError(f"{path.name}: {exc}") from None


def build_sd_unet(config: dict, state: Mapping[str, Any], dtype: Any, offload: Any, family_name: str,
                  where: str = "", besides: int = 0) -> Any:
    """An SD UNet from original-layout tensors (``model.diffusion_model.`` keys): straight into
    disk blocks when the manager (``offload``, may be None) will page it, else built whole; the
    one path for checkpoints and UNet files. ``where`` prefixes errors (a file's name and ": ");
    ``besides``: the bytes of the same load's other modules."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from nodes.checkpoint.paged import unet_straight
    from nodes.checkpoint.to_original import unet_to_original

    what = f"{where}the {family_name} UNet"
    unet = _empty(UNet2DConditionModel, config)
    paged = unet_straight(unet, state, dtype, offload, what, besides=besides)
    if paged is not None:
        return paged
    try:
        converted = sfu.convert_ldm_unet_checkpoint(cast_view(state, dtype), dict(unet.config))
    except KeyError as exc:
        raise CheckpointError(f"{what} is incomplete: {exc} is missing") from None
    return _assign(unet, converted, f"{family_name} UNet", dtype,
                   lambda keys: list(unet_to_original(dict.fromkeys(keys), dict(unet.config))))


def _build_single_file(state: Mapping[str, Any], found: Any, dtype: Any, vae_dtype: Any, pred: str,
                       why: str, offload: Any = None) -> "Loaded":
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    from nodes.checkpoint.paged import float_bytes
    from nodes.checkpoint.tokenizer import clip_tokenizer

    others = {k: s for k, s in shapes_of(state).items() if not k.startswith(det.UNET)}
    unet = build_sd_unet(found.unet, state, dtype, offload, found.family.name,
                         besides=float_bytes(others, dtypes_of(state), dtype) if offload is not None else 0)
    vae = _empty(AutoencoderKL, found.vae)
    vae = _assign(vae, sfu.convert_ldm_vae_checkpoint(cast_view(state, vae_dtype), dict(vae.config)), "VAE", vae_dtype)
    modules: dict[str, Any] = {"unet": unet, "vae": vae}
    for spec in found.family.text_encoders:
        layout = "transformers" if spec.kind == "openai" else "openclip"
        modules[spec.module] = build_text_encoder(state, spec.prefix, layout, spec, found.text[spec.module], dtype)
    info = {"format": "single_file", "prediction_type": pred, "prediction_reason": why}
    if found.unet.get("class_embed_type") == "projection":  # unCLIP: its image encoder and noise augmentor
        modules["clip_vision"], info["noise_augmentor"] = unclip.image_parts(state, found.unet, dtype)
    del state
    tokenizers = {spec.tokenizer: clip_tokenizer(spec.pad) for spec in found.family.text_encoders}
    return Loaded(
        family=found.family,
        scheduler_config=_scheduler_config(found, pred),
        latent=found.latent or found.family.latent,
        modules=modules,
        tokenizers=tokenizers,
        info=info,
    )


def _scheduler_config(found: Any, pred: str) -> dict[str, Any]:
    """The family's DDPM config, or the continuous-time one the file asks for (CosXL); the loader's
    prediction setting overrides the prediction type of either."""
    if found.sampling is None:
        return found.family.scheduler_config(pred)
    return {**found.sampling, "prediction_type": pred}


def quiet_progress() -> None:
    """No tqdm bars from diffusers/transformers while loading (they would flood a CLI or server log)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# -- diffusers folders ------------------------------------------------------------------


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir()


def load_diffusers_folder(path: Path, dtype: Any, vae_dtype: Any = None, prediction: str = "auto",
                          offload: Any = None) -> Loaded:
    """An SD pipeline folder. ``offload``: see :func:`load_checkpoint` (the UNet, asked last with the other
    components' bytes, may be built straight into disk blocks: nodes.checkpoint.paged.own_layout_straight).
    The SD families share the default dtypes, so a manager's rule is resolved before the family is known."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.tokenizer import clip_tokenizer

    quiet_progress()
    dtype = resolve(dtype, None)
    try:
        index = json.loads((path / "model_index.json").read_text())
        sched_file = path / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(sched_file.read_text()) if sched_file.is_file() else None
        sdxl = "text_encoder_2" in index and (path / "text_encoder_2").is_dir()
        if vae_dtype is None:
            import torch

            vae_config = json.loads((path / "vae" / "config.json").read_text())
            vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else dtype
        vae = folder_component(path / "vae", AutoencoderKL, vae_dtype)
        modules: dict[str, Any] = {"vae": vae}
        te = None
        if (path / "text_encoder").is_dir() or not sdxl:  # SDXL's refiner has only text_encoder_2
            te = modules["text_encoder"] = folder_component(path / "text_encoder", CLIPTextModel, dtype)
        if sdxl:
            modules["text_encoder_2"] = folder_component(path / "text_encoder_2", CLIPTextModelWithProjection, dtype)
        from nodes.runtime.measure import module_bytes

        besides = sum(module_bytes(m) for m in modules.values())
        modules["unet"] = folder_component(path / "unet", UNet2DConditionModel, dtype, offload, besides)
    except (OSError, ValueError, json.JSONDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: not a loadable diffusers folder ({exc})") from exc
    try:
        family = families.for_folder(set(modules), te.config.hidden_act if te is not None else "gelu")
    except KeyError as exc:
        raise CheckpointError(f"{path.name}: {exc.args[0]}") from None
    for name, m in modules.items():
        target = vae_dtype if name == "vae" else dtype
        if m.dtype != target:  # .to() on diffusers models logs a warning even when it changes nothing
            m.to(target)
        m.eval()
        m.requires_grad_(False)
    tokenizers = {}
    for spec in family.text_encoders:
        tokenizers[spec.tokenizer] = folder_tokenizer(path, CLIPTokenizer, lambda: clip_tokenizer(spec.pad),
                                                      spec.tokenizer)
    config = family.scheduler_config()
    if scheduler:
        config.update({k: v for k, v in scheduler.items() if not k.startswith("_diffusers")})
    config = _continuous_folder_config(config)
    if prediction != "auto":
        config["prediction_type"] = prediction
    return Loaded(
        family=family, scheduler_config=config,
        latent=latent_format(family, vae),
        modules=modules, tokenizers=tokenizers,
        info={"format": "diffusers", "prediction_type": config.get("prediction_type", "epsilon"),
              "prediction_reason": "set on the loader" if prediction != "auto" else "the folder's scheduler config"},
    )


def _continuous_folder_config(config: dict[str, Any]) -> dict[str, Any]:
    """A folder whose scheduler is one of diffusers' EDM classes (Playground v2.5's
    EDMDPMSolverMultistepScheduler) samples in continuous time. diffusers' EDM "epsilon" is
    Karras et al.'s F-prediction (their c_out has the EDM sign), Kiln's ``edm``; its network
    time is 0.25 log sigma (nodes.samplers.edm)."""
    from nodes.samplers.edm import edm_config, is_edm

    if not is_edm(config):
        return config
    kind = config.get("prediction_type", "epsilon")
    return edm_config("edm" if kind == "epsilon" else kind, config.get("sigma_min", 0.002),
                      config.get("sigma_max", 80.0), config.get("sigma_data", 0.5))


def latent_format(family: Family, vae: Any) -> LatentFormat:
    """The family's latent format, with the scale a diffusers VAE config states (if any), normalised
    per channel when the config has ``latents_mean`` and ``latents_std`` (Playground v2.5's VAE,
    which diffusers' SDXL pipelines apply the same way)."""
    import dataclasses

    from nodes.families.sdxl import PLAYGROUND_LATENT, ChannelLatentFormat

    scale = getattr(vae.config, "scaling_factor", None)
    latent = dataclasses.replace(family.latent, scale=float(scale)) if scale else family.latent
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None and len(mean) == len(std) == latent.channels:
        fields = {f.name: getattr(latent, f.name) for f in dataclasses.fields(LatentFormat)}
        if latent.channels == PLAYGROUND_LATENT.channels:  # previews: the table fitted to normalised latents
            fields.update(rgb=PLAYGROUND_LATENT.rgb, rgb_bias=PLAYGROUND_LATENT.rgb_bias)
        return ChannelLatentFormat(**fields, mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    return latent


def load_checkpoint(path: Path, dtype: Any, vae_dtype: Any = None, prediction: str = "auto",
                    offload: Any = None) -> Loaded:
    """A checkpoint file or diffusers folder. ``offload``: the model manager's plan for the denoiser,
    asked before building (ModelManager.plan_for_load); a single-file FLUX transformer that will be
    paged to disk is built straight into its blocks (nodes.checkpoint.flux_blocks)."""
    if path.is_dir():
        from nodes.checkpoint.pipeline_folders import load_family_folder

        loaded = load_family_folder(path, dtype, offload)
        if loaded is not None:
            return _vae_in(loaded, vae_dtype)
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path.name} is a folder but not a diffusers pipeline (no model_index.json and unet/)")
        return load_diffusers_folder(path, dtype, vae_dtype, prediction, offload=offload)
    return _vae_in(load_single_file(path, dtype, vae_dtype, prediction, offload=offload), vae_dtype)


def _vae_in(loaded: Loaded, vae_dtype: Any) -> Loaded:
    """``loaded`` with its VAE in ``vae_dtype`` where one is asked: the family loaders build every module in
    the family's dtype, but a VAE follows the VAE rule (nodes.runtime.precision.DtypeRule.for_vae) whichever
    family it came with, as VAELoader's does; a VAE is small, so casting it after the build costs little."""
    import torch

    vae = loaded.modules.get("vae")
    if vae_dtype is not None and isinstance(vae, torch.nn.Module):
        vae.to(dtype=vae_dtype)
    return loaded
