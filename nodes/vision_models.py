"""Image encoders (``models/clip_vision``) and style models (``models/style_models``): reading
the files ComfyUI users have, and encoding an image the way ComfyUI's CLIPVisionEncode does.

What runs today is FLUX.1 Redux: SigLIP (``sigclip_vision_patch14_384.safetensors``,
transformers' key layout) encodes the image, and the Redux projector
(``flux1-redux-dev.safetensors``: ``redux_up``/``redux_down``) turns its tokens into
T5-sized tokens that StyleModelApply appends to the prompt. The modules are
transformers' ``SiglipVisionModel`` and diffusers' ``ReduxImageEncoder``, built from the
file's shapes (no config is fetched); the parts a file lacks or cannot say (the head
count: every released CLIP and SigLIP vision tower has 16) follow ComfyUI's configs.
CLIP ViT towers (unCLIP's image encoders) are nodes/clip_vit.py; T2I style adapters are
refused by name, since no Kiln node consumes them yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import CheckpointError, _assign, _empty, read_state_dict

#: transformers' layout of a SigLIP vision tower, as ComfyUI's clip_vision files keep it
#: (under ``vision_model.``, which transformers 5 no longer puts on the module's own names).
PREFIX = "vision_model."
SIGLIP_LAYER = "encoder.layers.{}.layer_norm1.weight"
POSITIONS = "embeddings.position_embedding.weight"
PATCHES = "embeddings.patch_embedding.weight"
#: Every released CLIP / SigLIP vision tower has 16 attention heads (ComfyUI's configs say so).
HEADS = 16
#: SigLIP normalises pixels to -1..1.
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class LoadedVision:
    """What the model manager stores for an image encoder: the module and how it wants pixels."""

    model: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kind: str = "SigLIP"

    def kiln_modules(self) -> dict[str, Any]:
        return {"encoder": self.model}


@dataclass
class LoadedStyleModel:
    model: Any

    def kiln_modules(self) -> dict[str, Any]:
        return {"style": self.model}


@dataclass(eq=False)
class VisionOutput:
    """CLIP_VISION_OUTPUT: an image encoder's token states for each image (float32, CPU),
    under ComfyUI's names."""

    last_hidden_state: Any
    penultimate_hidden_states: Any
    image_embeds: Any
    #: which encoder made it (LoadedVision.kind): unCLIP takes CLIP ViT embeddings only
    kind: str = "SigLIP"
    #: inner layers' token states by ComfyUI's index into its ``all_hidden_states`` (counted from the end:
    #: -20 is the output of the 20th layer from the last), for the layers a node reads (:data:`KEPT_LAYERS`);
    #: not all of them, which for SigLIP so400m would be 27 x 729 x 1152 floats per image
    layers: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:  # ComfyUI's outputs are read by key too
        return getattr(self, key)

    def __kiln_nbytes__(self) -> int:
        tensors = (self.last_hidden_state, self.penultimate_hidden_states, self.image_embeds, *self.layers.values())
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())


#: the inner layers CLIPVisionEncode keeps (VisionOutput.layers): USOStyleReference's low and middle
#: features (nodes.uso); the penultimate layer is kept anyway
KEPT_LAYERS = (-20, -11)


def _layers(state: Any) -> int:
    n = 0
    while SIGLIP_LAYER.format(n) in state:
        n += 1
    return n


def load_vision(path: Path, dtype: Any) -> LoadedVision:
    """An image encoder from ``path``: a CLIP ViT (nodes.clip_vit) or a SigLIP tower (strictly: every
    weight used, the pooling head optional)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from nodes import clip_vit

    raw = read_state_dict(path)
    if clip_vit.is_clip_vit(raw):
        return clip_vit.load(raw, path.name, dtype)
    state = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    del raw
    layers = _layers(state)
    if not layers or POSITIONS not in state or PATCHES not in state:
        raise CheckpointError(f"{path.name} is not a SigLIP image encoder in transformers' layout (no "
                              f"'{PREFIX}{SIGLIP_LAYER.format(0)}' or '{PREFIX}{POSITIONS}')")
    width = int(state[SIGLIP_LAYER.format(0)].shape[0])
    patch = int(state[PATCHES].shape[-1])
    side = math.isqrt(int(state[POSITIONS].shape[0]))
    if side * side != state[POSITIONS].shape[0] or width % HEADS:
        raise CheckpointError(f"{path.name}: a SigLIP tower of {state[POSITIONS].shape[0]} positions and width "
                              f"{width} is not a square grid of {HEADS} heads")
    has_head = any(k.startswith("head.") for k in state)
    config = SiglipVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=HEADS,
                                intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                                patch_size=patch, image_size=side * patch, hidden_act="gelu_pytorch_tanh",
                                vision_use_head=has_head)
    model = _empty(SiglipVisionModel, config)
    own = PREFIX if any(k.startswith(PREFIX) for k in model.state_dict()) else ""
    state = {own + k: v for k, v in state.items() if not k.endswith("position_ids")}
    _assign(model, state, "SigLIP image encoder", dtype)
    return LoadedVision(model, side * patch, SIGLIP_MEAN, SIGLIP_STD)


def load_style_model(path: Path, dtype: Any) -> LoadedStyleModel:
    """FLUX.1 Redux's projector from ``path``; its sizes come from the weights."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    state = read_state_dict(path)
    if "style_embedding" in state:
        raise CheckpointError(f"{path.name} is a T2I-Adapter style model (SD 1.x); Kiln reads FLUX.1 Redux style "
                              "models only so far")
    if "redux_up.weight" not in state or "redux_down.weight" not in state:
        raise CheckpointError(f"{path.name} is not a style model Kiln knows (expected FLUX.1 Redux's "
                              "'redux_up.weight' and 'redux_down.weight')")
    up, down = state["redux_up.weight"], state["redux_down.weight"]
    model = _empty(ReduxImageEncoder, dict(redux_dim=int(up.shape[1]), txt_in_features=int(down.shape[0])))
    _assign(model, state, "FLUX.1 Redux", dtype)
    return LoadedStyleModel(model)


def preprocess(image: Any, size: int, mean: tuple, std: tuple, crop: bool) -> Any:
    """IMAGE [B, H, W, C] in 0..1 -> the encoder's pixels [B, 3, size, size], ComfyUI's rule:
    scale the shorter side to ``size`` and cut the centre (``crop``), or squash to a square;
    bicubic with antialiasing; values rounded to 8 bits; normalised. An image already
    ``size`` square is used as it is."""
    import torch

    x = image[..., :3].movedim(-1, 1).to(torch.float32)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if crop:
            scale = size / min(h, w)
            target = (round(scale * h), round(scale * w))
        else:
            target = (size, size)
        x = torch.nn.functional.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = (x * 255.0).clamp(0, 255).round() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def encode(loaded: LoadedVision, model: Any, image: Any, crop: bool) -> VisionOutput:
    """Run the encoder (``model``, placed by the manager) on ``image``."""
    import torch

    from nodes.runtime.fp8 import compute_dtype
    from nodes.runtime.offload import compute_device

    pixels = preprocess(image, loaded.image_size, loaded.mean, loaded.std, crop)
    with torch.inference_mode():
        out = model(pixel_values=pixels.to(compute_device(model), compute_dtype(model)), output_hidden_states=True)
    last = out.last_hidden_state.to("cpu", torch.float32)
    # CLIP's projected class token; SigLIP's pooling head, or its tokens when it has none
    pooled = next((p for p in (getattr(out, "image_embeds", None), getattr(out, "pooler_output", None))
                   if p is not None), out.last_hidden_state)
    # transformers' hidden_states start with the embeddings; ComfyUI's list holds layer outputs only, so
    # both count the same from the end
    layers = {i: out.hidden_states[i].to("cpu", torch.float32) for i in KEPT_LAYERS
              if len(out.hidden_states) - 1 >= -i}
    return VisionOutput(last_hidden_state=last, penultimate_hidden_states=out.hidden_states[-2].to("cpu", torch.float32),
                        image_embeds=pooled.to("cpu", torch.float32), kind=loaded.kind, layers=layers)
