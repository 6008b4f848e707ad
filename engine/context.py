"""What a node may touch: a narrow context instead of globals.

:class:`Environment` is shared by every job of one process (folders, the model
manager, the device, settings). :class:`NodeContext` is made per node per job:
progress reporting and the interruption check are bound to that job, so two jobs
can never see each other's state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from engine.budget import DEFAULT_IMAGE_PIXELS, Budget
from engine.paths import SafeRoot


class Interrupted(Exception):
    """Raised inside a node when its job was asked to stop."""


class NodeError(Exception):
    """A failure a user can act on: names the input at fault and why.

    Nodes raise it for bad input ("strength must be within 0..1") so the error event
    carries the input name next to the node id instead of a bare traceback.
    """

    def __init__(self, message: str, input_name: str | None = None) -> None:
        super().__init__(message)
        self.input_name = input_name


@dataclass
class Paths:
    """The folders a process works in; every one is a :class:`SafeRoot`."""

    input: SafeRoot
    output: SafeRoot
    temp: SafeRoot
    models: SafeRoot
    workflows: SafeRoot

    def scrub(self, text: str) -> str:
        """``text`` with each folder's absolute path replaced by its name (``/srv/kiln/data/input/cat.png``
        becomes ``input/cat.png``), so messages shown to clients never reveal where the server keeps files."""
        roots = sorted(((str(getattr(self, name).root), name) for name in ("input", "output", "temp", "models",
                                                                           "workflows")),
                       key=lambda item: -len(item[0]))
        for root, name in roots:
            text = text.replace(root + os.sep, name + "/").replace(root, name)
        return text

    @classmethod
    def under(cls, base: str | Path, models: str | Path | None = None,
              workflows: str | Path | None = None) -> "Paths":
        base = Path(base)
        return cls(
            input=SafeRoot(base / "input", create=True),
            output=SafeRoot(base / "output", create=True),
            temp=SafeRoot(base / "temp", create=True),
            models=SafeRoot(Path(models) if models else base / "models", create=True),
            workflows=SafeRoot(Path(workflows) if workflows else base / "workflows", create=True),
        )


@dataclass
class Settings:
    #: LoadImage may fetch http(s) URLs (the CLI allows it; the server only when enabled).
    allow_url_images: bool = False
    url_max_bytes: int = 20 * 1024 * 1024
    #: One deadline for a whole download, however slowly the sender trickles.
    url_timeout_s: float = 20.0
    #: Hosts or networks ("images.lan", "10.1.0.0/16") URL images may reach although
    #: their addresses are loopback, private or link-local (``--allow-url-host``).
    url_allow_hosts: tuple[str, ...] = ()
    #: Largest image, in pixels, a node will decode (guards against decompression bombs)
    #: or make (the resource budget checks every declared size against it).
    max_image_pixels: int = DEFAULT_IMAGE_PIXELS
    #: Estimated bytes of a job's images and latents; 0 means half of this host's memory.
    max_job_bytes: int = 0
    #: Embed the workflow in saved PNGs (users may turn it off for privacy).
    embed_workflow: bool = True
    #: LoadImage may read any path on disk (the CLI, run by the file's owner); the
    #: server keeps every name inside its input folder.
    allow_absolute_paths: bool = False
    #: Compiled mode of the model host (``--compile``): "auto", "on" or "off"; the node
    #: library defines what each means (nodes.runtime.compiled).
    compile: str = "auto"
    #: Where compiled artefacts are kept across processes (the data folder's ``compiled/``).
    compile_cache: str | None = None
    #: Block-by-block offloading of a denoiser that does not fit (``--offload``): "auto",
    #: "on" or "off"; the node library defines what each means (nodes.runtime.offload).
    offload: str = "auto"
    #: The dtype models compute in (``--precision``): "auto", "fp32", "fp16" or "bf16"; the node library
    #: defines auto (nodes.runtime.precision: float16 on a GPU, float32 on a CPU).
    precision: str = "auto"

    def budget(self) -> Budget:
        return Budget(max_image_pixels=self.max_image_pixels, max_job_bytes=self.max_job_bytes)


class ModelHost(Protocol):
    """What the engine and the server ask of the node library's model manager.

    The engine never builds one (it does not know torch): the node library
    registers a factory (:attr:`engine.registry.Registry.model_host_factory`) and
    the CLI and server call it. The routes that free memory and report what is
    loaded use only this surface.
    """

    @property
    def device(self) -> str: ...

    def unload_all(self) -> int: ...

    def free(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    # Optional: ``visible_devices() -> list[str]``, every device a lane could use
    # (one per GPU); the server's worker asks it once, at the first job, when no
    # devices were given, and runs one lane per device it lists.


@dataclass
class Environment:
    paths: Paths
    #: The node library's model manager (see :class:`ModelHost`), or None when no
    #: node library provides one (a pure image workflow needs none).
    models: ModelHost | None = None
    device: str = "cpu"
    settings: Settings = field(default_factory=Settings)
    #: Checks every image before it leaves a job (see :mod:`engine.guard`); None: no checks.
    output_guard: Any = None

    @classmethod
    def for_folder(cls, base: str | Path, **kwargs: Any) -> "Environment":
        return cls(paths=Paths.under(base), **kwargs)


@dataclass
class JobInfo:
    """What a job carries that some nodes record (SaveImage embeds it in PNGs)."""

    id: str
    workflow: dict[str, Any] = field(default_factory=dict)  # ComfyUI API format
    kiln_workflow: dict[str, Any] = field(default_factory=dict)
    extra_pnginfo: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    #: Whether anyone will see live previews of this job. Nodes skip making them when
    #: not (a sampler's preview costs a latent-to-RGB projection and a JPEG per step).
    previews: bool = True


@dataclass
class NodeContext:
    env: Environment
    job: JobInfo
    node_id: str
    node_type: str
    _progress: Callable[[int, int, Any], None]
    _is_interrupted: Callable[[], bool]
    _message: Callable[[str], None]

    @property
    def device(self) -> str:
        """The compute device, asked of the model host only when a node wants it (asking imports torch)."""
        return str(self.env.models.device) if self.env.models is not None else self.env.device

    @property
    def models(self) -> Any:
        return self.env.models

    @property
    def paths(self) -> Paths:
        return self.env.paths

    @property
    def wants_previews(self) -> bool:
        """True when a preview passed to :meth:`progress` would reach someone; else make none."""
        return getattr(self.job, "previews", True)  # a bare context (tests, scripts) without a job: yes

    def check_interrupted(self) -> None:
        """Raise :class:`Interrupted` if this job was asked to stop."""
        if self._is_interrupted():
            raise Interrupted()

    def progress(self, value: int, maximum: int, preview: Any = None) -> None:
        """Report progress (e.g. a sampler step); also an interruption point.

        A node's ``Batch.run`` (several jobs in one call) may pass a list of previews, one
        per item in the items' order, so each job sees its own image (engine.batching)."""
        self.check_interrupted()
        self._progress(value, maximum, preview)

    def message(self, text: str) -> None:
        """Tell the user something about this node's work (e.g. "resized to 512x512")."""
        self._message(text)


def build_env(paths: Paths, settings: Settings | None = None, registry: Any = None,
              device: str | None = None) -> Environment:
    """The one way a front door (``kiln run``, ``kiln serve``) makes its environment.

    The folders and settings are the caller's; the model manager comes from the
    node library through the registry (the engine knows no torch). Building it is
    cheap: finding the best device imports torch, which happens at the first job.
    """
    env = Environment(paths=paths, settings=settings or Settings())
    env.models = registry.make_model_host(device, env.settings) if registry is not None else None
    return env


def default_data_dir() -> Path:
    return Path(os.environ.get("KILN_DATA", Path.cwd() / "data"))
