"""What the flow-matching transformer families load alike (Chroma, FLUX.2, Qwen-Image, Z-Image).

Each of them is a lone diffusion model file for UNETLoader (its text encoders and VAE come from
their own loaders) or a diffusers folder whose transformer config names the class; the rules for
the file, the folder test, the folder's reading and the loader's message are the same for all, so
they live here once (FLUX's folder loader reads its components and scheduler by the same rules). A
family whose file FLUX's rule builds declares it once (:class:`TransformerFiles`): its loader module's
``build_transformer``, ``load_transformer_file`` and ``file_layout`` are that declaration's methods.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import Loaded
from nodes.checkpoint.tensors import plain


def flow_info(transformer: Any, fmt: str, label: str) -> dict[str, Any]:
    """The loader's info, as FLUX's: the weights held as stored are named for the loader's message."""
    from nodes.checkpoint.flux_load import _held_note
    from nodes.runtime.fp8 import fp8_bytes

    return {"format": fmt, "prediction_type": "flow", "prediction_reason": f"flow matching ({label})",
            "fp8": fp8_bytes(transformer) > 0, **_held_note(transformer)}


def transformer_file(state: Mapping[str, Any], name: str, dtype: Any, fp8: str, build: Callable[..., Any],
                     family: Any, label: str, offload: Any = None,
                     layout: Callable[[Mapping[str, Any], str], Any] | None = None) -> Loaded:
    """UNETLoader's path for one of these families: ``build(state, name, dtype)`` makes the module;
    ``fp8`` (a torch dtype name) stores the linear weights in that 8-bit float first. ``offload``: the
    manager's plan for the denoiser (nodes.checkpoint.flux_load.OffloadAsk), asked before building; when
    it pages to disk, the module is built straight into its blocks (nodes.checkpoint.paged_files) by
    ``layout(file without its prefix, name)``, the family's nodes.checkpoint.paged_files.FileLayout."""
    transformer = _straight(state, name, dtype, fp8, offload, layout)
    if transformer is None:
        transformer = build(_as_stored(state, fp8), name, dtype)
    return Loaded(family=family, scheduler_config=family.scheduler_config(), latent=family.latent,
                  modules={"unet": transformer}, info=flow_info(transformer, "unet", label))


@dataclass(frozen=True)
class TransformerFiles:
    """One family's UNETLoader file, declared once: its whole build (:meth:`build`, FLUX's rule
    nodes.checkpoint.flux_load.transformer_from_file), its loader (:meth:`load`, :func:`transformer_file`)
    and its build straight into disk blocks (:meth:`layout`, nodes.checkpoint.paged_files.FileLayout)
    all read these fields, so the two builds cannot drift apart (a refusal or a last touch in one only).

    ``model_class``: the diffusers class name; ``keys``: the family's key module (``strip``,
    ``transformer_config``, ``original_to_diffusers``, ``diffusers_to_original``, ``KeyMismatch``,
    ``is_diffusers``); ``family``: the module name under nodes.families (its ``FAMILY``); ``label``: the
    messages' name. ``is_diffusers(state)``: the file holds diffusers' layout (default the key module's);
    ``own_names``: the file holds the module's own names, no conversion either way; ``refuse(state,
    what)``: a variant Kiln does not run, a CheckpointError in both builds; ``after(model, state)``: the
    last touch of both builds (the block build runs it before each block is written), ``in_compute`` the
    module names it holds in the compute dtype; ``stacks``: a module tensor may stack several file
    tensors' rows (Ovis-Image's gated MLP; nodes.checkpoint.paged_files.FileLayout's ``stacks``);
    ``family_of(state)``: the family module a file loads as where one declaration serves two (FLUX.2
    [klein] and [dev], told by the guidance embedder); default ``family``."""

    model_class: str
    keys: Any
    family: str
    label: str
    is_diffusers: Callable[[Any], bool] | None = None
    own_names: bool = False
    refuse: Callable[[Any, str], None] | None = None
    after: Callable[[Any, Mapping[str, Any]], Any] | None = None
    in_compute: tuple[str, ...] = ()
    stacks: bool = False
    family_of: Callable[[Any], str] | None = None

    def _class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.model_class)

    def _diffusers(self, state: Any) -> bool:
        return (self.is_diffusers or self.keys.is_diffusers)(state)

    def build(self, state: Mapping[str, Any], what: str, dtype: Any) -> Any:
        """The module from a file's tensors in either layout (linear weights held as stored)."""
        from nodes.checkpoint.flux_load import transformer_from_file

        refuse, keys = self.refuse, self.keys
        to_diffusers, from_diffusers = (_own, _own) if self.own_names else (keys.original_to_diffusers,
                                                                           keys.diffusers_to_original)
        model = transformer_from_file(state, what, dtype, self._class(), self.label, keys, to_diffusers,
                                      from_diffusers, self._diffusers,
                                      None if refuse is None else lambda s: refuse(s, what))
        return model if self.after is None else self.after(model, state)

    def load(self, state: Mapping[str, Any], name: str, dtype: Any, fp8: str = "", offload: Any = None) -> Loaded:
        """UNETLoader's path for the family (:func:`transformer_file`); ``offload`` as FLUX's."""
        import importlib

        module = self.family if self.family_of is None else self.family_of(state)
        family = importlib.import_module(f"nodes.families.{module}").FAMILY
        return transformer_file(state, name, dtype, fp8, self.build, family, self.label, offload, self.layout)

    def layout(self, state: Mapping[str, Any], what: str) -> Any:
        """How a file (prefix stripped) becomes the module, for a build straight into disk blocks."""
        from nodes.checkpoint.paged_files import FileLayout, keyed_layout

        if self.refuse is not None:
            self.refuse(state, what)
        after, extra = self.after, {"stacks": True} if self.stacks else {}
        if after is not None:
            extra |= {"after": lambda model: after(model, state), "in_compute": self.in_compute}
        if self.own_names:
            return FileLayout(self._class(), self.label, self.keys.transformer_config, **extra)
        return keyed_layout(self._class(), self.label, self.keys, self._diffusers(state), **extra)


#: What an all-in-one checkpoint holds beside the diffusion model (ComfyUI's prefixes).
OTHER_PARTS = ("text_encoders.", "vae.", "first_stage_model.")


def diffusion_model_part(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` without an all-in-one checkpoint's text encoders and VAE (a LazyState stays lazy): ComfyUI's
    UNETLoader reads a checkpoint's diffusion model alone, and so does Kiln's (Lumina 2's, AuraFlow's)."""
    from nodes.checkpoint.tensors import renamed_view

    if not any(k.startswith(OTHER_PARTS) for k in state):
        return state
    return renamed_view(state, {k: k for k in state if not k.startswith(OTHER_PARTS)})


def _own(state: dict[str, Any]) -> dict[str, Any]:
    """A file that holds the module's own names, as it is."""
    return dict(state)


def _as_stored(state: Mapping[str, Any], fp8: str) -> dict[str, Any]:
    """The file's tensors read, linear weights in UNETLoader's ``fp8`` (a torch dtype name) if given."""
    from nodes.checkpoint.scaled_fp8 import is_scaled

    state = plain(state)
    if fp8 and not is_scaled(state):  # as ComfyUI: a scaled file keeps its own storage
        import torch

        target = getattr(torch, fp8)
        state = {k: v.to(target) if v.ndim == 2 and k.endswith(".weight") and v.is_floating_point() else v
                 for k, v in state.items()}
    return state


def _straight(state: Mapping[str, Any], name: str, dtype: Any, fp8: str, offload: Any,
              layout: Callable[[Mapping[str, Any], str], Any] | None) -> Any:
    """The module built straight into disk blocks when ``offload`` pages it there, else None."""
    if offload is None or layout is None:
        return None
    from nodes.checkpoint import paged_files

    return paged_files.file_straight(state, name, dtype, fp8, offload, layout(paged_files.strip(state), name))


def is_pipeline_folder(path: Path, transformer_class: str) -> bool:
    """A diffusers pipeline folder (a pipeline's ``model_index.json`` or a modular pipeline's
    ``modular_model_index.json``) whose transformer config names ``transformer_class``."""
    config = path / "transformer" / "config.json"
    from engine.model_files import PIPELINE_INDEXES, is_marked

    if not (path.is_dir() and is_marked(path, PIPELINE_INDEXES) and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == transformer_class
    except (OSError, ValueError):
        return False


def folder_modules(path: Path, label: str, others: Callable[[], dict[str, Any]], transformer_class: Any, dtype: Any,
                   offload: Any = None, ready: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """A diffusers folder's modules, frozen: ``others()`` (VAE, text encoders), then ``transformer/``
    as ``unet``, its linear weights held as stored and asked of the manager (``offload``) with the
    others' bytes, as nodes.checkpoint.folders.folder_component does (``ready``: run inside a build
    straight into disk blocks, before each block is written). A component that cannot be
    read (OSError, ValueError, RuntimeError) is the folder's CheckpointError, naming ``label``."""
    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.load import CheckpointError, quiet_progress
    from nodes.runtime.measure import module_bytes

    quiet_progress()
    try:
        modules = others()
        besides = sum(module_bytes(m) for m in modules.values())
        modules["unet"] = folder_component(path / "transformer", transformer_class, dtype, offload, besides,
                                           as_stored=True, ready=ready)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: not a loadable diffusers {label} folder ({exc})") from exc
    for m in modules.values():
        m.eval()
        m.requires_grad_(False)
    return modules


def folder_scheduler_config(path: Path, family: Any) -> dict[str, Any]:
    """The family's scheduler config with the folder's ``scheduler/scheduler_config.json`` over it
    (its private ``_`` keys left out)."""
    config = family.scheduler_config()
    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        config.update({k: v for k, v in json.loads(sched_file.read_text()).items() if not k.startswith("_")})
    return config


def vae_latent(family: Any, vae: Any) -> Any:
    """The family's latent with the scale and shift the folder's VAE config states (as diffusers
    reads them: a VAE without ``shift_factor`` shifts by 0)."""
    import dataclasses

    config = vae.config
    return dataclasses.replace(family.latent, scale=float(config.scaling_factor),
                               shift=float(getattr(config, "shift_factor", None) or 0.0))


def load_pipeline_folder(path: Path, dtype: Any, offload: Any, family: Any, label: str, transformer_class: Any,
                         others: Callable[[], dict[str, Any]], tokenizer: Callable[[], Any], *,
                         latent_from_vae: bool = True,
                         ready: Callable[[Any], Any] | None = None, ready_in_blocks: bool = False) -> Loaded:
    """A diffusers pipeline folder of one of these families: :func:`folder_modules` (``others()`` and
    the transformer), ``ready(transformer)`` (a family's check or fix-up, before the loader's info is
    taken), ``tokenizer()`` and the folder's scheduler config; the latent takes the VAE config's scale
    and shift when ``latent_from_vae`` (a VAE that normalises its own latent keeps the family's).
    ``ready_in_blocks``: ``ready`` is a fix-up the block files must hold, so a build straight into disk
    blocks runs it before each block is written too (Z-Image's timestep embedder: once the offload hooks
    hold a layer, changing it breaks the forward)."""
    modules = folder_modules(path, label, others, transformer_class, dtype, offload,
                             ready if ready_in_blocks else None)
    if ready is not None:
        ready(modules["unet"])
    tokenizers = {"tokenizer": tokenizer()}
    latent = vae_latent(family, modules["vae"]) if latent_from_vae else family.latent
    return Loaded(family=family, scheduler_config=folder_scheduler_config(path, family), latent=latent,
                  modules=modules, tokenizers=tokenizers, info=flow_info(modules["unet"], "diffusers", label))
