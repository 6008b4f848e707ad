"""Loader nodes: CheckpointLoader (alias CheckpointLoaderSimple), DiffusersLoader and VAELoader.

They return light handles (nodes.handles); the weights live in the model manager
(``ctx.env.models``), keyed by the file's real path, mtime and size, so two loader
nodes naming the same file share one copy, and cache entries never hold weights.
A handle reloads through the manager if the model was unloaded meanwhile.

torch/diffusers are imported only when a model is actually loaded.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Mapping

from engine import types as T
from engine.context import Environment, NodeError
from engine.model_files import Marker, is_marked, marker_for, model_names
from nodes.runtime.models import ModelManager, file_key
from engine.node import Input, Output, define_node
from engine.paths import PathRefused
from nodes.handles import ClipHandle, ModelHandle, VaeHandle

CHECKPOINT_FOLDER = "checkpoints"
#: ComfyUI's folder of diffusers pipelines (DiffusersLoader): folders only, no loose files.
DIFFUSERS_FOLDER = "diffusers"
VAE_FOLDER = "vae"
PREDICTIONS = ["auto", "epsilon", "v_prediction"]

_fallback: ModelManager | None = None


def model_manager(env: Environment) -> ModelManager:
    """The environment's model manager (a process-wide one if the caller built none)."""
    global _fallback
    if env.models is not None:
        return env.models
    if _fallback is None:
        _fallback = ModelManager()
    return _fallback


#: A models subfolder, or several that one loader reads (ComfyUI's aliases: the first
#: is the current name, e.g. ("diffusion_models", "unet")).
Folders = str | tuple[str, ...]


def _folders(folder: Folders) -> tuple[str, ...]:
    return (folder,) if isinstance(folder, str) else tuple(folder)


def list_models(env: Environment | None, folder: Folders, diffusers_marker: Marker) -> list[str]:
    """Model files under ``<models>/<folder>`` (each alias) and diffusers folders (holding ``diffusers_marker``).

    The listing itself is engine.model_files.model_names, which the model routes
    serve too, so a route never offers a name a loader refuses.
    """
    if env is None:
        return []
    names = {n for f in _folders(folder) for n in model_names(Path(env.paths.models.root) / f, diffusers_marker)}
    return sorted(names)


def _checkpoints(env: Environment | None) -> list[str]:
    return list_models(env, CHECKPOINT_FOLDER, marker_for(CHECKPOINT_FOLDER))


def _pipelines(env: Environment | None) -> list[str]:
    if env is None:
        return []
    return model_names(Path(env.paths.models.root) / DIFFUSERS_FOLDER, marker_for(DIFFUSERS_FOLDER), files=False)


def _vaes(env: Environment | None) -> list[str]:
    return list_models(env, VAE_FOLDER, marker_for(VAE_FOLDER))


def locate(env: Environment, folder: Folders, name: Any, input_name: str) -> Path:
    """The model ``name`` in the first of the folders that has it; errors name the input."""
    folders = _folders(folder)
    if not isinstance(name, str) or not name:
        raise NodeError(f"{input_name} must be a file name in models/{folders[0]}", input_name=input_name)
    for sub in folders:
        try:
            path = env.paths.models.resolve(name, sub)
        except PathRefused as exc:
            raise NodeError(f"{input_name}: {exc}", input_name=input_name) from exc
        if path.exists():
            return path
    where = " or ".join(f"models/{f}" for f in folders)
    raise NodeError(f"no model named {name!r} in {where}", input_name=input_name)


def validator(folder: Folders, input_name: str):
    def validate(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        try:
            locate(env, folder, inputs.get(input_name), input_name)
        except NodeError as exc:
            return [(input_name, str(exc))]
        return []
    return validate


def fingerprinter(folder: Folders, input_name: str):
    def fingerprint(env: Environment, inputs: Mapping[str, Any]) -> Any:
        # The file's identity, not a hash of gigabytes: replacing or touching it reloads.
        try:
            return list(file_key(locate(env, folder, inputs.get(input_name), input_name)))
        except (NodeError, OSError):
            return None
    return fingerprint


def prefetcher(folder: Folders, input_name: str, kind: str, load: Callable[[Path, ModelManager], Any]):
    """A loader node's prefetch hook: the same key and load its run uses, started before it runs."""
    def prefetch(env: Environment, inputs: Mapping[str, Any]) -> None:
        path = locate(env, folder, inputs.get(input_name), input_name)
        model_manager(env).acquire(file_key(path, kind), functools.partial(load, path))
    return prefetch


# -- CheckpointLoader -------------------------------------------------------------------------


def _load_checkpoint(path: Path, manager: ModelManager) -> Any:
    from nodes.checkpoint.load import load_checkpoint

    rule = manager.dtype_rule
    return widened(load_checkpoint(path, rule, vae_dtype=rule.for_vae(), offload=manager.plan_for_load), manager)


def widened(loaded: Any, manager: ModelManager) -> Any:
    """``loaded`` with its denoiser's narrow-kept weights upcast where the RAM budget allows
    (ModelManager.widen_if_room), its ``info["held"]`` note saying so."""
    note = manager.widen_if_room(loaded.modules)
    if note:
        loaded.info["held"] = note
    return loaded


def dtype_note(loaded: Any) -> str:
    """" in <dtype>" for a loader's message: the dtype the denoiser computes in, which ``--precision auto``
    chooses per family on a GPU (nodes.runtime.precision)."""
    from nodes.runtime.fp8 import compute_dtype

    unet = loaded.modules.get("unet")
    return f" in {str(compute_dtype(unet)).replace('torch.', '')}" if unet is not None else ""


def held_note(info: dict[str, Any]) -> str:
    """", <how the weights are held>" for a loader's message, when the loader said (FLUX on a CPU)."""
    return f", {info['held']}" if info.get("held") else ""


def peek_module(manager: ModelManager, key: tuple, loader: Any, name: str) -> Any:
    """Module ``name`` of a loaded entry wherever it is (to read names and shapes, not to run)."""
    return manager.acquire(key, loader).kiln_modules()[name]


def _acquire(manager: ModelManager, key: tuple, loader: Any, input_name: str, name: str) -> Any:
    from nodes.checkpoint.load import CheckpointError

    try:
        return manager.acquire(key, loader)
    except CheckpointError as exc:
        raise NodeError(str(exc), input_name=input_name) from exc
    except MemoryError as exc:
        raise NodeError(f"not enough memory to load {name}", input_name=input_name) from exc


@define_node(
    "CheckpointLoader",
    category="loaders",
    display_name="Load Checkpoint",
    aliases=["CheckpointLoaderSimple"],
    inputs=[
        Input("ckpt_name", T.COMBO, choices=_checkpoints,
              tooltip="A .safetensors checkpoint (SD 1.x, SD 2.x, SDXL base or refiner) or a diffusers folder "
                      "in models/checkpoints."),
        Input("prediction", T.COMBO, default="auto", choices=PREDICTIONS, optional=True,
              tooltip="What the UNet predicts. 'auto': a 'v_pred' key means v-prediction; SD 2.x files "
                      "without it use ComfyUI's rule (a v-model's last output norm bias has std > 0.09); "
                      "diffusers folders use their scheduler config; otherwise epsilon."),
    ],
    outputs=[Output("MODEL", T.MODEL), Output("CLIP", T.CLIP), Output("VAE", T.VAE)],
    validate=validator(CHECKPOINT_FOLDER, "ckpt_name"),
    fingerprint=fingerprinter(CHECKPOINT_FOLDER, "ckpt_name"),
    prefetch=prefetcher(CHECKPOINT_FOLDER, "ckpt_name", "checkpoint", _load_checkpoint),
)
def checkpoint_loader(ctx, ckpt_name: str, prediction: str = "auto"):
    """Load a Stable Diffusion checkpoint once; outputs handles to its UNet, text encoder(s) and VAE.

    The family is detected from the keys and every size from the tensor shapes,
    with nothing fetched from a hub. Pickle files (.ckpt/.pt) load only if
    ``torch.load(weights_only=True)`` accepts them; convert others to .safetensors.
    """
    if prediction not in PREDICTIONS:
        raise NodeError(f"prediction must be one of {', '.join(PREDICTIONS)}", input_name="prediction")
    path = locate(ctx.env, CHECKPOINT_FOLDER, ckpt_name, "ckpt_name")
    return _checkpoint_handles(ctx, path, ckpt_name, "ckpt_name", prediction)


def _checkpoint_handles(ctx, path: Path, name: str, input_name: str, prediction: str = "auto") -> tuple:
    """(MODEL, CLIP, VAE) handles over the checkpoint file or diffusers pipeline at ``path``,
    loaded once by the model manager; errors name ``input_name``."""
    manager = model_manager(ctx.env)
    key = file_key(path, "checkpoint")
    loader = functools.partial(_load_checkpoint, path)
    loaded = _acquire(manager, key, loader, input_name, name)
    use = functools.partial(manager.use, key)
    info = dict(loaded.info)
    if loaded.family.name == "sam3":
        return _sam3_handles(ctx, manager, key, loader, loaded, name)
    scheduler_config = dict(loaded.scheduler_config)
    if prediction != "auto":  # one loaded copy whatever the override; only the handle differs
        scheduler_config["prediction_type"] = prediction
        info.update(prediction_type=prediction, prediction_reason="set on the loader")
    peek = functools.partial(peek_module, manager, key, loader)
    model = ModelHandle(family=loaded.family, scheduler_config=scheduler_config,
                        latent=loaded.latent, _use_unet=lambda: use("unet", loader),
                        name=name, extra=info, _peek=lambda: peek("unet"),
                        _compile_note=lambda: manager.compile_pending(key, "unet"))
    clip = ClipHandle(family=loaded.family, tokenizers=loaded.tokenizers,
                      _use=lambda which, parts=(): use(which, loader, parts), name=name, _peek=peek,
                      _use_head=functools.partial(_folder_head, manager, key, path, loaded.family)
                      if path.is_dir() else None)
    vae = VaeHandle(latent_scale=loaded.latent.scale, _use_vae=lambda: use("vae", loader), name=name,
                    latent_channels=int(loaded.modules["vae"].config.latent_channels),
                    downscale=int(getattr(loaded.modules["vae"], "kiln_downscale", 8)),
                    _compile_note=lambda: manager.compile_pending(key, "vae"))
    ctx.message(f"{name}: {loaded.family.name}, {info.get('prediction_type')} ({info.get('prediction_reason')}), "
                f"{info.get('format')}, on {manager.device}{dtype_note(loaded)}{held_note(info)}"
                f"{manager.precision_note(loaded.family)}")
    if info.get("missing_text"):
        ctx.message(f"{name} holds no {', '.join(info['missing_text'])}: its CLIP gives zeros in their place "
                    "(ComfyUI's rule); load the encoders with TripleCLIPLoader for the full prompt")
    return (model, clip, vae)


def _folder_head(manager: ModelManager, key: tuple, folder: Path, family: Any,
                 module: str) -> contextlib.AbstractContextManager:
    """A diffusers folder's output head for encoder ``module``, from the weights of its subfolder (named as
    the module: ``text_encoder/``); None for a tied head (TextGenerate then scores against the token
    embedding, which is that head)."""
    from nodes.checkpoint.lm_head import folder_state_with_head, head_from_state

    state = folder_state_with_head(folder / module, manager.dtype_rule.for_family(family))
    build = None if state is None else functools.partial(head_from_state, state, f"{folder.name}/{module}")
    return use_head(manager, key, module, family, build)


@contextlib.contextmanager
def use_head(manager: ModelManager, key: tuple, module: str, family: Any,
             build: Callable[[Any], Any] | None) -> Iterator[Any]:
    """Encoder ``module``'s output head, ``build(dtype)``, on the device, held by the manager as
    ``<module>.lm_head`` under a key of its own (built on first use, never with the encoder, so a
    workflow that only encodes prompts never pays for it); None when there is no ``build``."""
    if build is None:
        yield None
        return
    name = f"{module}.lm_head"
    with manager.use((*key, name), name, lambda m: {name: build(m.dtype_rule.for_family(family))}) as head:
        yield head


def _sam3_handles(ctx, manager: ModelManager, key: tuple, loader: Any, loaded: Any, name: str) -> tuple:
    """A SAM 3 file's (MODEL, CLIP, None): the detector for SAM3_Detect, its text tower for
    CLIPTextEncode, and no VAE (ComfyUI's CheckpointLoaderSimple gives none for it either)."""
    use = functools.partial(manager.use, key)
    peek = functools.partial(peek_module, manager, key, loader)
    model = ModelHandle(family=loaded.family, scheduler_config={}, latent=loaded.latent,
                        _use_unet=lambda: use("sam3", loader), name=name, extra=dict(loaded.info),
                        _peek=lambda: peek("sam3"))
    clip = ClipHandle(family=loaded.family, tokenizers=loaded.tokenizers,
                      _use=lambda which, parts=(): use(which, loader, parts), name=name, _peek=peek)
    decoder = ("with its interactive decoder for refine_iterations and points" if loaded.info.get("interactive_decoder")
               else "without an interactive decoder in the file: refine_iterations and points are unavailable")
    ctx.message(f"{name}: {loaded.info.get('sam3_version')} detector on {manager.device}, {decoder} "
                f"({loaded.info.get('unused_keys')} weights outside the detector); no VAE")
    return (model, clip, None)


# -- DiffusersLoader --------------------------------------------------------------------------


def _locate_pipeline(env: Environment, name: Any) -> Path:
    """The diffusers pipeline folder ``name`` in models/diffusers; errors name ``model_path``."""
    path = locate(env, DIFFUSERS_FOLDER, name, "model_path")
    if not is_marked(path, marker_for(DIFFUSERS_FOLDER)):
        raise NodeError(f"{name!r} is not a diffusers pipeline folder (no model_index.json in it)", "model_path")
    return path


def _validate_pipeline(env: Environment, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    try:
        _locate_pipeline(env, inputs.get("model_path"))
    except NodeError as exc:
        return [("model_path", str(exc))]
    return []


@define_node(
    "DiffusersLoader",
    category="advanced/loaders/deprecated",
    inputs=[Input("model_path", T.COMBO, choices=_pipelines,
                  tooltip="A diffusers pipeline folder (with model_index.json) in models/diffusers.")],
    outputs=[Output("MODEL", T.MODEL), Output("CLIP", T.CLIP), Output("VAE", T.VAE)],
    validate=_validate_pipeline,
    fingerprint=fingerprinter(DIFFUSERS_FOLDER, "model_path"),
    prefetch=prefetcher(DIFFUSERS_FOLDER, "model_path", "checkpoint", _load_checkpoint),
)
def diffusers_loader(ctx, model_path: str):
    """Load a diffusers pipeline folder from models/diffusers, as CheckpointLoader loads one from
    models/checkpoints (ComfyUI keeps this node for old workflows)."""
    return _checkpoint_handles(ctx, _locate_pipeline(ctx.env, model_path), model_path, "model_path")


# -- VAELoader --------------------------------------------------------------------------------


def _vae_choices(env: Environment | None) -> list[str]:
    """The VAE files, then ComfyUI's ``pixel_space`` (nodes.checkpoint.pixel_space), as its VAELoader lists it."""
    from nodes.checkpoint.pixel_space import NAME

    return _vaes(env) + [NAME]


def _pass_through(hook: Callable[[Environment, Mapping[str, Any]], Any], none: Any) -> Callable:
    """A VAELoader file hook that answers ``none`` for ``pixel_space``, which names no file."""
    from nodes.checkpoint.pixel_space import NAME

    def hooked(env: Environment, inputs: Mapping[str, Any]) -> Any:
        return none if inputs.get("vae_name") == NAME else hook(env, inputs)
    return hooked


def _load_vae(path: Path, manager: ModelManager) -> Any:
    from nodes.checkpoint.vae_file import load_vae_file

    return load_vae_file(path, manager.dtype_rule.for_vae() or manager.dtype)


@define_node(
    "VAELoader",
    category="loaders",
    display_name="Load VAE",
    inputs=[Input("vae_name", T.COMBO, choices=_vae_choices,
                  tooltip="A VAE .safetensors file or diffusers AutoencoderKL folder in models/vae, or "
                          "pixel_space (the pass-through of pixel-space models: Chroma1-Radiance).")],
    outputs=[Output("VAE", T.VAE)],
    validate=_pass_through(validator(VAE_FOLDER, "vae_name"), []),
    fingerprint=_pass_through(fingerprinter(VAE_FOLDER, "vae_name"), "pixel_space"),
    prefetch=_pass_through(prefetcher(VAE_FOLDER, "vae_name", "vae", _load_vae), None),
)
def vae_loader(ctx, vae_name: str):
    """Load a standalone VAE (original or diffusers layout), e.g. to replace a checkpoint's own.

    Latents stay unscaled on the wire, so the VAE needs no scale of its own; its
    ``latent_scale`` (0.13025 when the name contains "xl", else 0.18215, or the
    folder's config) is informational.
    """
    from nodes.checkpoint import pixel_space

    if vae_name == pixel_space.NAME:  # no file: the pixels are the latent
        return (pixel_space.handle(),)
    path = locate(ctx.env, VAE_FOLDER, vae_name, "vae_name")
    manager = model_manager(ctx.env)
    key = file_key(path, "vae")
    loader = functools.partial(_load_vae, path)
    module = _acquire(manager, key, loader, "vae_name", vae_name)
    scale = getattr(module.config, "scaling_factor", None) \
        if path.is_dir() or getattr(module.config, "shift_factor", None) else None
    if scale is None:
        scale = 0.13025 if "xl" in Path(vae_name).name.lower() else 0.18215
    return (VaeHandle(latent_scale=float(scale), _use_vae=lambda: manager.use(key, "", loader), name=vae_name,
                      latent_channels=int(module.config.latent_channels),
                      downscale=int(getattr(module, "kiln_downscale", 8))),)
