"""Loading diffusers' StableDiffusionSafetyChecker offline, and asking it about images.

The checker is a CLIP ViT image encoder plus 17 "concept" and 3 "special care"
embeddings with a threshold each: an image is flagged when its embedding's cosine
similarity to a concept exceeds that concept's threshold. Stable Diffusion 1.x
repositories ship it as ``safety_checker/`` (config.json + weights) beside a
``feature_extractor/`` (CLIP's image preprocessing).

Kiln reads it from ``models/safety_checker/`` as such a folder or as one
``.safetensors`` file holding the same state dict. A single file carries no
config: every size is read from the tensor shapes, and the head count follows
CLIP's rule (64-wide heads, as in every OpenAI CLIP vision tower). The image
preprocessing ships with Kiln (nodes/assets/) unless the folder brings its own
``preprocessor_config.json``; its crop size always follows the encoder's input
size, which the position embeddings fix. Nothing touches a network.

The decision itself is diffusers' (the module's own ``forward``), so Kiln flags
exactly what ``StableDiffusionPipeline.run_safety_checker`` would flag for the
same 8-bit images.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

FOLDER = "safety_checker"
ARCHITECTURE = "StableDiffusionSafetyChecker"
#: The vision tower's keys as today's transformers names them; files written by older
#: versions (every Stable Diffusion repository's) nest them once more ("vision_model.vision_model.").
_PREFIX = "vision_model."
_NESTED = "vision_model.vision_model."
#: Keys only a StableDiffusionSafetyChecker has.
_OWN_KEYS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights",
             "visual_projection.weight")
#: Buffers older transformers saved that today's CLIP rebuilds itself.
_IGNORED = re.compile(r"(^|\.)position_ids$")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ASSET = Path(__file__).resolve().parents[1] / "assets" / "safety_checker_preprocessor.json"
CLIP_HEAD_WIDTH = 64


class CheckerError(Exception):
    """The file is missing, unreadable or not a StableDiffusionSafetyChecker."""


@dataclass(eq=False)
class LoadedChecker:
    """What the model manager holds for one checker file: the module and its preprocessing."""

    module: Any
    processor: Any

    def kiln_modules(self) -> dict[str, Any]:
        return {"checker": self.module}


# -- reading the file ----------------------------------------------------------------------

def _read_state_dict(path: Path, label: str) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nodes.checkpoint.pickle_file import PickleRefused, load_weights_only

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return load_weights_only(path)
    except PickleRefused as exc:
        raise CheckerError(f"{label}: {path.name} {exc}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckerError(f"{label}: cannot read {path.name}: {exc}") from None


def _flat(key: str) -> str:
    return _PREFIX + key[len(_NESTED):] if key.startswith(_NESTED) else key


def _describe_foreign(keys: list[str]) -> str:
    """A hint at what a foreign file is, from its keys."""
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "it looks like a Stable Diffusion checkpoint (put those in models/checkpoints)"
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "decoder.")) for k in keys):
        return "it looks like a UNet or VAE"
    if any(k.startswith("text_model.") or "token_embedding" in k for k in keys):
        return "it looks like a CLIP text encoder"
    if any(k.startswith("vision_model.") for k in keys):
        return "it looks like a plain CLIP vision model without the checker's concept embeddings"
    return f"its {len(keys)} tensors do not match"


def _check_architecture(state: dict[str, "torch.Tensor"], label: str) -> None:
    missing = [k for k in _OWN_KEYS if k not in state]
    if missing or f"{_PREFIX}embeddings.patch_embedding.weight" not in state:
        raise CheckerError(f"{label} is not a {ARCHITECTURE} (no {', '.join(missing) or 'CLIP vision tower'}); "
                           f"{_describe_foreign(sorted(state))}")
    width = int(state["visual_projection.weight"].shape[0])
    expected = {"concept_embeds": (17, width), "special_care_embeds": (3, width),
                "concept_embeds_weights": (17,), "special_care_embeds_weights": (3,)}
    for key, want in expected.items():
        if tuple(state[key].shape) != want:
            raise CheckerError(f"{label} is not a {ARCHITECTURE}: {key} has shape {list(state[key].shape)}, "
                               f"expected {list(want)}")


def config_from_shapes(state: dict[str, "torch.Tensor"], label: str) -> Any:
    """The CLIPConfig of a single-file checker, read from its tensor shapes."""
    from transformers import CLIPConfig

    patch = state[f"{_PREFIX}embeddings.patch_embedding.weight"].shape  # [hidden, 3, p, p]
    positions = state[f"{_PREFIX}embeddings.position_embedding.weight"].shape[0]  # grid^2 + class token
    hidden, patch_size = int(patch[0]), int(patch[2])
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckerError(f"{label}: {positions} position embeddings is not a square grid plus a class token")
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(_PREFIX) + r"encoder\.layers\.(\d+)\.", k))}
    if not layers or hidden % CLIP_HEAD_WIDTH:
        raise CheckerError(f"{label}: cannot infer the vision tower's layers and heads from its shapes "
                           f"(hidden size {hidden}); use a diffusers folder with its config.json")
    projection = int(state["visual_projection.weight"].shape[0])
    vision = {"hidden_size": hidden, "patch_size": patch_size, "image_size": grid * patch_size,
              "num_hidden_layers": max(layers) + 1, "num_attention_heads": hidden // CLIP_HEAD_WIDTH,
              "intermediate_size": int(state[f"{_PREFIX}encoder.layers.0.mlp.fc1.weight"].shape[0]),
              "projection_dim": projection}
    return CLIPConfig(vision_config=vision, projection_dim=projection)


def _folder_config(folder: Path, label: str) -> Any:
    from transformers import CLIPConfig

    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckerError(f"{label}: cannot read config.json: {exc}") from None
    architectures = raw.get("architectures") or []
    if architectures and ARCHITECTURE not in architectures:
        raise CheckerError(f"{label} is not a {ARCHITECTURE}: its config.json declares {', '.join(architectures)}")
    if raw.get("model_type", "clip") != "clip":
        raise CheckerError(f"{label} is not a {ARCHITECTURE}: its config.json is a '{raw.get('model_type')}' model")
    try:
        return CLIPConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckerError(f"{label}: config.json is not a CLIP config: {exc}") from None


def _processor(folder: Path | None, image_size: int) -> Any:
    """CLIP's preprocessing: the folder's own config if it has one, else Kiln's, at the encoder's size."""
    from transformers import CLIPImageProcessorPil  # the PIL backend: no torchvision needed

    own = folder / "preprocessor_config.json" if folder is not None else None
    raw = json.loads((own if own is not None and own.is_file() else _ASSET).read_text())
    raw["size"] = {"shortest_edge": image_size}
    raw["crop_size"] = {"height": image_size, "width": image_size}
    return CLIPImageProcessorPil.from_dict(raw)  # also reads the older CLIPFeatureExtractor files


def load_checker(path: Path, dtype: Any, label: str | None = None) -> LoadedChecker:
    """Build the checker from a diffusers folder or a single .safetensors file, strictly."""
    from accelerate import init_empty_weights
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    # Its forward logs "a black image will be returned" for every flag: not what Kiln does.
    logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)
    label = label or path.name
    if path.is_dir():
        weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if not (path / "config.json").is_file() or weights is None:
            raise CheckerError(f"{label}: a checker folder needs config.json and one of {', '.join(_WEIGHT_FILES)}")
        config = _folder_config(path, label)
        state = _read_state_dict(weights, label)
    elif path.suffix.lower() == ".safetensors":
        state = _read_state_dict(path, label)
        config = None
    else:
        raise CheckerError(f"{label}: a checker is a diffusers folder or a .safetensors file")
    state = {_flat(k): v for k, v in state.items() if not _IGNORED.search(k)}
    _check_architecture(state, label)
    config = config or config_from_shapes(state, label)
    with init_empty_weights(include_buffers=False):  # no random init of ~300 M parameters
        module = StableDiffusionSafetyChecker(config)
    expected = set(module.state_dict())
    state = {_NESTED + k[len(_PREFIX):] if k not in expected and k.startswith(_PREFIX) else k: v
             for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckerError(f"{label}: its tensors do not fit its config: {str(exc).splitlines()[0]}") from None
    module = module.to(dtype=dtype).eval()
    image_size = int(config.vision_config.image_size)
    return LoadedChecker(module, _processor(path if path.is_dir() else None, image_size))


# -- asking it --------------------------------------------------------------------------------

@dataclass(eq=False)
class SafetyCheckerHandle:
    """SAFETY_CHECKER: a loaded checker; the weights belong to the model manager."""

    name: str
    processor: Any
    #: Returns a context manager yielding the module on the compute device.
    _use: Callable[[], contextlib.AbstractContextManager] | None = None

    @contextlib.contextmanager
    def module(self) -> Iterator[Any]:
        assert self._use is not None, "safety checker handle has no loader"
        with self._use() as module:
            yield module

    def flags(self, images: "torch.Tensor") -> list[bool]:
        """One flag per image of an IMAGE batch [B,H,W,C] in 0..1."""
        import numpy as np
        import torch

        from nodes.image_io import to_pil

        if images.shape[0] == 0:
            return []
        rgb = images[..., :3] if images.shape[-1] >= 3 else images[..., :1].expand(*images.shape[:-1], 3)
        # 8-bit, as a pipeline hands its images to the checker (numpy_to_pil rounds the same way).
        clip_input = self.processor([to_pil(im) for im in rgb], return_tensors="pt").pixel_values
        with torch.inference_mode(), self.module() as module:
            # diffusers' own decision rule; it blackens the list it is given, so give it placeholders
            _, flagged = module(clip_input=clip_input.to(module.device, module.dtype),
                                images=[np.zeros(1) for _ in range(len(rgb))])
        return [bool(f) for f in flagged]

    def __kiln_nbytes__(self) -> int:
        return 0
