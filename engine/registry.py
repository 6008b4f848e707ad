"""The node registry.

The engine never imports the node library: built-in nodes arrive the same way
third-party ones do, through the ``kiln.nodes`` entry-point group (Kiln's own
``pyproject.toml`` declares ``builtin = "nodes:register"``). An entry point names
either a ``register(registry)`` function or a module whose :class:`NodeSpec`
objects are all registered.
"""
from __future__ import annotations

import logging
import types as pytypes
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Iterator

from engine.node import NodeSpec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kiln.nodes"


class RegistryError(Exception):
    pass


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, NodeSpec] = {}
        self._aliases: dict[str, str] = {}
        #: Entry points that failed to load, with the reason: a broken plugin is
        #: reported (``kiln nodes``, the server log) instead of taking Kiln down.
        self.load_errors: dict[str, str] = {}
        #: Builds the model manager for a device (None = the best one); set by the node
        #: library that owns model placement, so the engine never imports torch.
        #: Called as ``factory(device)`` or ``factory(device, settings)`` (engine.context.Settings).
        self.model_host_factory: Callable[..., Any] | None = None
        #: Builds the output guard ``(env, mode, checker_name) -> guard`` (see engine.guard);
        #: set by the node library that can classify images.
        self.output_guard_factory: Callable[[Any, str, str], Any] | None = None
        #: Imports what a model job needs (the model libraries behind the node library's loaders):
        #: ``kiln serve`` calls it once it listens, so its start stays fast and its first job does
        #: not wait seconds for imports; set by the node library.
        self.warm_up: Callable[[], None] | None = None
        #: The model folders the node library's loaders read (listed by the model routes
        #: even while empty); what each holds is engine.model_files' one listing.
        self.model_folders: tuple[str, ...] = ()
        #: Folders one loader reads together (ComfyUI's aliases, e.g. "unet" and
        #: "diffusion_models"): a route listing one of them lists them all, as the loader does.
        self.model_folder_aliases: dict[str, tuple[str, ...]] = {}

    def make_model_host(self, device: str | None = None, settings: Any = None) -> Any:
        """A fresh model manager from the node library, or None if none registered one."""
        if self.model_host_factory is None:
            return None
        if settings is None or not _takes_two(self.model_host_factory):  # older factories take the device only
            return self.model_host_factory(device)
        return self.model_host_factory(device, settings)

    def make_output_guard(self, env: Any, mode: str, checker: str) -> Any:
        """The node library's output guard; raises GuardRefused when none can be built."""
        from engine.guard import GuardRefused

        if self.output_guard_factory is None:
            raise GuardRefused("no installed node library provides a safety filter")
        return self.output_guard_factory(env, mode, checker)

    # -- adding -------------------------------------------------------------------

    def add(self, spec: NodeSpec) -> NodeSpec:
        for name in (spec.type, *spec.aliases):
            if name in self._specs or name in self._aliases:
                raise RegistryError(f"node type '{name}' is registered twice")
        self._specs[spec.type] = spec
        for alias in spec.aliases:
            self._aliases[alias] = spec.type
        return spec

    def add_all(self, specs: Iterable[NodeSpec]) -> None:
        for spec in specs:
            self.add(spec)

    def add_module(self, module: pytypes.ModuleType) -> None:
        """Register every NodeSpec defined at a module's top level, in source order."""
        self.add_all(v for v in vars(module).values() if isinstance(v, NodeSpec))

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in sorted(entry_points(group=group), key=lambda e: (e.name != "builtin", e.name)):
            try:
                target = ep.load()
                self._register_target(target)
            except Exception as exc:  # a plugin must not break the engine
                log.warning("node plugin %s failed to load: %s", ep.name, exc)
                self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"

    def _register_target(self, target: Any) -> None:
        if isinstance(target, pytypes.ModuleType):
            self.add_module(target)
        elif isinstance(target, NodeSpec):
            self.add(target)
        elif callable(target):
            target(self)
        else:
            raise RegistryError(f"entry point target {target!r} is not a module, node or register function")

    # -- reading ------------------------------------------------------------------

    def get(self, type_name: str) -> NodeSpec | None:
        return self._specs.get(self._aliases.get(type_name, type_name))

    def __contains__(self, type_name: object) -> bool:
        return isinstance(type_name, str) and self.get(type_name) is not None

    def __iter__(self) -> Iterator[NodeSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        """Every name a workflow may use, aliases included."""
        return [*self._specs, *self._aliases]

    def schemas(self, env: Any = None) -> dict[str, dict[str, Any]]:
        """Kiln schemas; ``env`` fills choices that depend on folders (checkpoints, images)."""
        return {spec.type: spec.schema(env) for spec in self}

    def object_info(self, env: Any = None) -> dict[str, dict[str, Any]]:
        """ComfyUI's ``/object_info``: aliases appear as nodes of their own."""
        info = {}
        for spec in self:
            info[spec.type] = spec.object_info(env=env)
            for alias in spec.aliases:
                info[alias] = spec.object_info(alias, env=env)
        return info


_default: Registry | None = None


def _takes_two(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def default_registry(loader: Callable[[Registry], None] | None = None) -> Registry:
    """The process-wide registry holding the installed nodes, built on first use."""
    global _default
    if _default is None:
        registry = Registry()
        (loader or Registry.load_entry_points)(registry)
        _default = registry
    return _default
