"""CLIP ViT image encoders (OpenAI's ViT-L/14, OpenCLIP's ViT-H/14 and ViT-bigG/14): the towers
ComfyUI's unCLIP and IP-Adapter graphs load from ``models/clip_vision`` or find inside an unCLIP
checkpoint (``embedder.model.visual.``).

Two layouts reach Kiln: transformers' (``vision_model.*`` + ``visual_projection.weight``, how
ComfyUI stores its clip_vision files) and OpenCLIP's (``visual.conv1``, fused ``in_proj`` q/k/v,
``proj`` as a [width, dim] matrix, how unCLIP checkpoints carry the tower). OpenCLIP's is
renamed into transformers' so one module class, ``CLIPVisionModelWithProjection``, built from
the file's shapes, serves both. What the shapes cannot say follows ComfyUI's configs: 16 heads,
and the activation (OpenAI's quick GELU for ViT-L and narrower, exact GELU for OpenCLIP's
wider ViT-H and bigG).
"""
from __future__ import annotations

import math
from typing import Any

from nodes.checkpoint.load import CheckpointError, _assign, _empty

#: CLIP's pixel statistics (OpenAI's and OpenCLIP's towers were trained with the same ones).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION = "vision_model."
PROJECTION = "visual_projection.weight"
#: keys that mark a CLIP ViT (SigLIP has neither a class token nor a pre-norm)
MARKERS = (VISION + "embeddings.class_embedding", VISION + "pre_layrnorm.weight", "visual.class_embedding")
#: OpenAI's ViT-L/14 is 1024 wide and uses quick GELU; OpenCLIP's wider towers use exact GELU.
QUICK_GELU_MAX_WIDTH = 1024
HEADS = 16

_OPENCLIP_TOP = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def is_clip_vit(state: Any) -> bool:
    """Whether ``state`` (transformers' or OpenCLIP's layout, unprefixed) holds a CLIP ViT tower."""
    return any(k in state for k in MARKERS)


def openclip_to_transformers(state: Any, prefix: str) -> dict[str, Any]:
    """The OpenCLIP visual tower under ``prefix`` renamed into transformers' layout; the fused
    q/k/v projections are split in three, the projection matrix transposed."""
    out: dict[str, Any] = {}
    for key in [k for k in state if k.startswith(prefix)]:
        name, value = key[len(prefix):], state[key]
        if name in _OPENCLIP_TOP:
            out[VISION + _OPENCLIP_TOP[name]] = value
        elif name == "proj":
            out[PROJECTION] = value.t().contiguous()
        elif name.startswith("transformer.resblocks."):
            index, rest = name[len("transformer.resblocks."):].split(".", 1)
            layer = f"{VISION}encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight | bias
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            else:
                block, leaf = rest.rsplit(".", 1)
                if block not in _OPENCLIP_BLOCK:
                    raise CheckpointError(f"unknown key {key!r} in the OpenCLIP image encoder")
                out[f"{layer}{_OPENCLIP_BLOCK[block]}.{leaf}"] = value
        else:
            raise CheckpointError(f"unknown key {key!r} in the OpenCLIP image encoder")
    return out


def _layers(state: Any) -> int:
    n = 0
    while f"{VISION}encoder.layers.{n}.layer_norm1.weight" in state:
        n += 1
    return n


def vision_config(shapes: dict[str, tuple[int, ...]], what: str) -> Any:
    """The ``CLIPVisionConfig`` of a transformers-layout tower from its tensor shapes alone."""
    from transformers import CLIPVisionConfig

    layers = _layers(shapes)
    positions = shapes.get(VISION + "embeddings.position_embedding.weight")
    patches = shapes.get(VISION + "embeddings.patch_embedding.weight")
    if not layers or positions is None or patches is None or PROJECTION not in shapes:
        raise CheckpointError(f"{what} is not a complete CLIP ViT image encoder (needs '{VISION}encoder.layers.0.*', "
                              f"its embeddings and '{PROJECTION}')")
    width, patch = int(patches[0]), int(patches[-1])
    side = math.isqrt(int(positions[0]) - 1)
    if side * side + 1 != positions[0] or width % HEADS:
        raise CheckpointError(f"{what}: {positions[0]} positions and width {width} are not a class token plus "
                              f"a square grid of {HEADS} heads")
    return CLIPVisionConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=HEADS,
        intermediate_size=int(shapes[f"{VISION}encoder.layers.0.mlp.fc1.weight"][0]),
        patch_size=patch, image_size=side * patch, projection_dim=int(shapes[PROJECTION][0]),
        hidden_act="quick_gelu" if width <= QUICK_GELU_MAX_WIDTH else "gelu", layer_norm_eps=1e-5)


def build(state: dict[str, Any], what: str, dtype: Any) -> Any:
    """``CLIPVisionModelWithProjection`` from transformers-layout tensors (``vision_model.*`` and
    ``visual_projection.weight``), strictly: every weight used and none missing."""
    from transformers import CLIPVisionModelWithProjection

    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    config = vision_config({k: tuple(v.shape) for k, v in state.items()}, what)
    model = _empty(CLIPVisionModelWithProjection, config)
    return _assign(model, state, f"CLIP ViT image encoder ({what})", dtype)


def load(state: dict[str, Any], what: str, dtype: Any) -> Any:
    """A CLIP ViT tower and its pixel rule (a LoadedVision) from a clip_vision file's tensors, in
    either layout."""
    from nodes.vision_models import LoadedVision

    if "visual.class_embedding" in state:
        state = openclip_to_transformers(state, "visual.")
    # a whole CLIP model saved as its vision tower's file: the text side is not this encoder's
    state = {k: v for k, v in state.items() if k.startswith(VISION) or k == PROJECTION}
    model = build(state, what, dtype)
    return LoadedVision(model, int(model.config.image_size), CLIP_MEAN, CLIP_STD, "CLIP ViT")
