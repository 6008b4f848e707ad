"""GLIGENLoader and GLIGENTextBoxApply, with ComfyUI's names, inputs and defaults: phrases drawn
inside boxes by an SD 1.x model with GLIGEN's text-box weights (models/gligen, e.g.
gligen_sd14_textbox_pruned.safetensors).

The file holds, in the original layout, one gated self-attention "fuser" per UNet transformer
block (``input_blocks.1.1.transformer_blocks.0.fuser.*``, ...) and the position net that turns
a phrase's pooled text and its box into a grounding token (``position_net.*``). How the boxes act
during sampling is nodes/families/grounding.py; whether the file fits the UNet is checked there,
where the UNet is known.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.conditioning_nodes import COND, _entries
from nodes.families import grounding
from nodes.loaders import fingerprinter, list_models, validator
from nodes.managed_modules import ModuleHandle, acquire_module

GLIGEN_FOLDER = "gligen"
GLIGEN = "GLIGEN"
MAX_RESOLUTION = 16384
_FUSER = ".fuser."
_FUSER_KEYS = {"linear.weight", "linear.bias", "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight",
               "attn.to_out.0.weight", "attn.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
               "ff.net.2.weight", "ff.net.2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
               "alpha_attn", "alpha_dense"}
#: The position net's Fourier features: 8 frequencies, sine and cosine, of 4 coordinates.
_POSITION_DIM = 8 * 2 * 4


def _module_class():
    import torch

    class Gligen(torch.nn.Module):
        """The fusers (in the order of ``blocks``, original-layout block names) and the position net."""

        def __init__(self, blocks: list[str], fusers: list[Any], position_net: Any) -> None:
            super().__init__()
            self.blocks = tuple(blocks)
            self.fusers = torch.nn.ModuleList(fusers)
            self.position_net = position_net

        @property
        def phrase_width(self) -> int:
            return int(self.position_net.null_positive_feature.shape[0])

        @property
        def token_width(self) -> int:
            return int(self.position_net.linears[4].out_features)

    return Gligen


@dataclass
class LoadedGligen:
    model: Any

    def kiln_modules(self) -> dict[str, Any]:
        return {"gligen": self.model}


def _split(state: dict[str, Any], name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(fuser weights by original block name, position-net weights) from a file's keys."""
    from nodes.checkpoint.load import CheckpointError

    prefix = "model.diffusion_model."
    fusers: dict[str, dict[str, Any]] = {}
    position: dict[str, Any] = {}
    for key, value in state.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if _FUSER in key:
            block, rest = key.split(_FUSER, 1)
            fusers.setdefault(block, {})[rest] = value
        elif key.startswith("position_net."):
            position[key[len("position_net."):]] = value
    if not fusers or "null_positive_feature" not in position:
        sample = ", ".join(sorted(state)[:4]) or "no keys"
        raise CheckpointError(f"{name} is not a GLIGEN file (expected '<block>.fuser.*' and 'position_net.*' keys, "
                              f"as gligen_sd14_textbox_pruned.safetensors has; found {sample}, ...)")
    for block, weights in fusers.items():
        if set(weights) != _FUSER_KEYS:
            missing = sorted(_FUSER_KEYS - set(weights)) or sorted(set(weights) - _FUSER_KEYS)
            raise CheckpointError(f"{name}: the fuser of {block} is not GLIGEN's gated self-attention "
                                  f"(keys {', '.join(missing[:4])} differ)")
    first = position.get("linears.0.weight")
    phrase = int(position["null_positive_feature"].shape[0])
    if first is None or "linears.4.weight" not in position or first.shape[1] != phrase + _POSITION_DIM:
        raise CheckpointError(f"{name} is not a text-box GLIGEN file: its position net does not take a phrase and a "
                              "box (Kiln reads the text-box GLIGEN, not the image-grounded or inpainting ones)")
    return fusers, position


def _order(block: str) -> tuple[int, int, str]:
    """Blocks in the order the UNet runs them: input, middle, output, by number."""
    kind, number = block.split(".")[:2]
    return ({"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(kind, 3), int(number), block)


def load_gligen(path: Path, dtype: Any) -> LoadedGligen:
    """The GLIGEN module from a file in ComfyUI's layout; sizes come from the weights."""
    import torch
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    from nodes.checkpoint.load import CheckpointError, read_state_dict

    fusers, position = _split(read_state_dict(path), path.name)
    blocks = sorted(fusers, key=_order)
    modules = []
    for block in blocks:
        weights = fusers[block]
        query, context = (int(s) for s in weights["linear.weight"].shape)
        # one head of the full width: the weights' shapes are the same for any split into heads, and
        # the fuser attends with the head count of the UNet block it serves (grounding.fuse)
        fuser = GatedSelfAttentionDense(query, context, 1, query)
        modules.append(fuser)
        try:
            fuser.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path.name}: the fuser of {block} does not fit GLIGEN's shapes ({exc})") from None
    phrase, tokens = int(position["null_positive_feature"].shape[0]), int(position["linears.4.weight"].shape[0])
    net = GLIGENTextBoundingboxProjection(positive_len=phrase, out_dim=tokens, feature_type="text-only")
    try:
        net.load_state_dict(position, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path.name}: its position net does not fit GLIGEN's text-box shapes ({exc})") from None
    model = _module_class()(blocks, modules, net).to(dtype if dtype is not None else torch.float32).eval()
    model.requires_grad_(False)
    return LoadedGligen(model)


@define_node(
    "GLIGENLoader",
    category="loaders",
    inputs=[Input("gligen_name", T.COMBO, choices=lambda env: list_models(env, GLIGEN_FOLDER, diffusers_marker=None),
                  tooltip="GLIGEN's text-box weights in models/gligen (gligen_sd14_textbox_pruned.safetensors), "
                          "for SD 1.x models")],
    outputs=[Output("GLIGEN", GLIGEN)],
    validate=validator(GLIGEN_FOLDER, "gligen_name"),
    fingerprint=fingerprinter(GLIGEN_FOLDER, "gligen_name"),
)
def gligen_loader(ctx, gligen_name: str):
    """Load GLIGEN's fusers and position net; which UNet they fit is checked when sampling."""
    from nodes.checkpoint.load import CheckpointError

    handle = acquire_module(ctx, GLIGEN_FOLDER, gligen_name, "gligen_name", "gligen", load_gligen, (CheckpointError,))
    return (handle,)


@define_node(
    "GLIGENTextBoxApply",
    category="conditioning/gligen",
    inputs=[Input("conditioning_to", T.CONDITIONING), Input("clip", T.CLIP), Input("gligen_textbox_model", GLIGEN),
            Input("text", T.STRING, default="", multiline=True, tooltip="What to draw inside the box"),
            Input("width", T.INT, default=64, min=8, max=MAX_RESOLUTION, step=8),
            Input("height", T.INT, default=64, min=8, max=MAX_RESOLUTION, step=8),
            Input("x", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("y", T.INT, default=0, min=0, max=MAX_RESOLUTION, step=8)],
    outputs=COND,
)
def gligen_textbox_apply(ctx, conditioning_to: Any, clip: Any, gligen_textbox_model: Any, text: str, width: int,
                         height: int, x: int, y: int):
    """Add a box (pixels; kept in latent units, each //8, as ComfyUI keeps it) with ``text``'s pooled
    CLIP output to every entry; boxes already on an entry stay, up to GLIGEN's 30."""
    from nodes.families.text import pooled_text
    from nodes.handles import ClipHandle

    if not isinstance(gligen_textbox_model, ModuleHandle) or not isinstance(gligen_textbox_model.loaded, LoadedGligen):
        raise NodeError(f"must come from GLIGENLoader, got {type(gligen_textbox_model).__name__}",
                        "gligen_textbox_model")
    if not isinstance(clip, ClipHandle):
        raise NodeError(f"must come from a checkpoint or CLIP loader, got {type(clip).__name__}", "clip")
    for value, name, low in ((width, "width", 8), (height, "height", 8), (x, "x", 0), (y, "y", 0)):
        if not low <= int(value) <= MAX_RESOLUTION:
            raise NodeError(f"must be within {low}..{MAX_RESOLUTION}, got {value}", name)
    try:
        pooled = pooled_text(clip, text)
    except ValueError as exc:
        raise NodeError(str(exc), "clip") from None
    wanted = gligen_textbox_model.loaded.model.phrase_width
    if pooled.shape[-1] != wanted:
        raise NodeError(f"gives {pooled.shape[-1]}-wide pooled text but {gligen_textbox_model.name} places "
                        f"{wanted}-wide phrases: GLIGEN needs the SD 1.x checkpoint's CLIP", "clip")
    box = grounding.Box(pooled, int(height) // 8, int(width) // 8, int(y) // 8, int(x) // 8)
    out = []
    for embeds, extra in _entries(conditioning_to, "conditioning_to"):
        previous = extra.get(grounding.KEY)
        boxes = previous.boxes if isinstance(previous, grounding.Grounding) else ()
        if len(boxes) >= grounding.MAX_OBJECTS:
            raise NodeError(f"already carries {len(boxes)} GLIGEN boxes, the most GLIGEN places in one image",
                            "conditioning_to")
        extra[grounding.KEY] = grounding.Grounding(gligen_textbox_model, boxes + (box,))
        out.append([embeds, extra])
    return (out,)
