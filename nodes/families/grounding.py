"""GLIGEN's grounding (Li et al. 2023, "GLIGEN: Open-Set Grounded Text-to-Image Generation"):
phrases placed in boxes, fed to an SD 1.x UNet through gated self-attention layers ("fusers").

A CONDITIONING entry carries its boxes under ComfyUI's key ``gligen`` as a :class:`Grounding`
(GLIGENTextBoxApply adds them; several boxes accumulate, at most :data:`MAX_OBJECTS`). At each
network call :func:`applied` turns an entry's boxes into grounding tokens (the GLIGEN file's
position net over each phrase's pooled text and its box, normalised by the latent's size) and,
while the call runs, inserts the fuser of each transformer block right after that block's
self-attention residual: ``x = fuser(x + attn1(norm1(x)), tokens)`` (ComfyUI's "middle patch",
diffusers' ``BasicTransformerBlock.fuser``). Only the rows of entries that carry boxes are fused,
at every step: a negative without boxes is the plain UNet's prediction, as in ComfyUI, where
conditions with other patches are never batched together. The fusers are forward hooks added
for the call and removed after it, so the UNet the model manager caches is left as it was (a
compiled one runs such calls eagerly).

The fuser attends with the head count of the UNet block it serves (SD 1.x: 8), which is
ComfyUI's rule for a 768-wide GLIGEN file; the weights' shapes do not depend on it.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from nodes.families.base import ConditioningError
from nodes.runtime.compiled import eager_while_hooked

if TYPE_CHECKING:
    import torch

#: The conditioning key (ComfyUI's).
KEY = "gligen"
#: Grounding tokens per image: the position net always sees this many (unused ones masked).
MAX_OBJECTS = 30
_ATTN1 = ".attn1.to_q.weight"


@dataclass(frozen=True)
class Box:
    """One phrase in one box, in latent units (ComfyUI's ``(pooled, height, width, y, x)``, each //8)."""

    pooled: Any  # [1, width] float32 CPU: the phrase's unprojected pooled CLIP output
    height: int
    width: int
    y: int
    x: int


@dataclass(frozen=True, eq=False)
class Grounding:
    """The boxes on one conditioning entry and the GLIGEN model (a handle with ``module()``,
    ``name`` and ``loaded``) that places them."""

    model: Any
    boxes: tuple[Box, ...]

    def __kiln_nbytes__(self) -> int:
        return int(sum(b.pooled.nbytes for b in self.boxes))


def box_tensors(boxes: tuple[Box, ...], h: int, w: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(boxes [30, 4] as x1, y1, x2, y2 fractions of the latent, masks [30], phrases [30, width]):
    the position net's inputs, unused slots zero (ComfyUI's set_position)."""
    import torch

    width = boxes[0].pooled.shape[-1]
    xyxy, masks, phrases = torch.zeros(MAX_OBJECTS, 4), torch.zeros(MAX_OBJECTS), torch.zeros(MAX_OBJECTS, width)
    for i, b in enumerate(boxes):
        xyxy[i] = torch.tensor((b.x / w, b.y / h, (b.x + b.width) / w, (b.y + b.height) / h))
        masks[i] = 1.0
        phrases[i] = b.pooled.reshape(-1).to(torch.float32)
    return xyxy, masks, phrases


def fuse(fuser: Any, x: "torch.Tensor", tokens: "torch.Tensor", heads: int) -> "torch.Tensor":
    """Gated self-attention over the image tokens and the grounding tokens, then a gated
    feed-forward; ``fuser`` holds the file's weights (diffusers' GatedSelfAttentionDense layout)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[1]
    both = fuser.norm1(torch.cat([x, fuser.linear(tokens)], dim=1))
    attn = fuser.attn
    b, length, _ = both.shape

    def split(t: "torch.Tensor") -> "torch.Tensor":
        return t.view(b, length, heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(attn.to_q(both)), split(attn.to_k(both)), split(attn.to_v(both)))
    out = attn.to_out[0](out.transpose(1, 2).reshape(b, length, -1))[:, :n]
    x = x + torch.tanh(fuser.alpha_attn) * out
    return x + torch.tanh(fuser.alpha_dense) * fuser.ff(fuser.norm2(x))


_BLOCKS: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def transformer_blocks(network: Any, family: Any) -> dict[str, Any]:
    """The network's transformer blocks by their original-layout name
    (``input_blocks.1.1.transformer_blocks.0``), which GLIGEN files use; made once per network."""
    if network not in _BLOCKS:
        try:
            names = family.original_names(network)
        except Exception:  # a transformer family has no UNet layout
            names = {}
        modules = dict(network.named_modules())
        found = {}
        for param, original in names.items():
            if param.endswith(_ATTN1) and original.endswith(_ATTN1):
                found[original[:-len(_ATTN1)]] = modules[param[:-len(_ATTN1)]]
        _BLOCKS[network] = found
    return _BLOCKS[network]


def mismatch(gligen: Any, blocks: dict[str, Any], network: Any) -> str:
    """Why the GLIGEN module cannot drive this network ('' when it can)."""
    if not blocks:
        return "GLIGEN drives an SD 1.x UNet's transformer blocks, and this model has none"
    missing = sorted(set(gligen.blocks) - set(blocks))
    extra = sorted(set(blocks) - set(gligen.blocks))
    if missing or extra:
        return (f"it has fusers for {len(gligen.blocks)} transformer blocks, this UNet has {len(blocks)} "
                f"({_some(missing, 'without a block here')}; {_some(extra, 'without a fuser')})")
    width = getattr(getattr(network, "config", None), "cross_attention_dim", None)
    if isinstance(width, int) and width != gligen.token_width:
        return f"its grounding tokens are {gligen.token_width} wide but this UNet's prompts are {width} (SD 1.x: 768)"
    for name, fuser in zip(gligen.blocks, gligen.fusers):
        dim = blocks[name].norm1.normalized_shape[0]
        if fuser.linear.out_features != dim:
            return f"its fuser for {name} is {fuser.linear.out_features} wide but that UNet block is {dim}"
    return ""


def _some(names: list[str], what: str) -> str:
    if not names:
        return f"none {what}"
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more} {what}"


@contextlib.contextmanager
def applied(denoiser: Any, x: "torch.Tensor", extras: list[dict]) -> Iterator[None]:
    """The denoiser's network with the fusers of every entry that carries boxes hooked in, for
    one call over ``extras`` (each ``x.shape[0] // len(extras)`` rows of ``x``)."""
    groundings = [e.get(KEY) for e in extras]
    if all(g is None for g in groundings):
        yield
        return
    import torch

    network = getattr(denoiser.network, "kiln_network", denoiser.network)
    blocks = transformer_blocks(network, denoiser.family)
    per = x.shape[0] // len(extras)
    h, w = int(x.shape[2]), int(x.shape[3])
    # rows of the batch and their grounding tokens, per GLIGEN model: [(gligen module, rows, tokens)]
    jobs: list[tuple[Any, "torch.Tensor", "torch.Tensor"]] = []
    with contextlib.ExitStack() as stack:
        by_model: dict[int, tuple[Any, list[int], list["torch.Tensor"]]] = {}
        for i, grounding in enumerate(groundings):
            if grounding is None:
                continue
            name = extras[i].get("_input", "positive")
            if not isinstance(grounding, Grounding):
                raise ConditioningError("the conditioning's 'gligen' is not boxes placed by GLIGENTextBoxApply", name)
            if id(grounding.model) not in by_model:
                gligen = stack.enter_context(grounding.model.module())
                why = mismatch(gligen, blocks, network)
                if why:
                    raise ConditioningError(f"the GLIGEN model {grounding.model.name!r} (GLIGENLoader) cannot drive "
                                            f"this {denoiser.family.name} model (GLIGEN's text-box files are for "
                                            f"SD 1.x): {why}", name)
                by_model[id(grounding.model)] = (gligen, [], [])
            gligen, rows, tokens = by_model[id(grounding.model)]
            param = next(gligen.parameters())
            xyxy, masks, phrases = (t.to(param.device, param.dtype).unsqueeze(0)
                                    for t in box_tensors(grounding.boxes, h, w))
            with torch.inference_mode():
                objs = gligen.position_net(boxes=xyxy, masks=masks, positive_embeddings=phrases)
            rows += range(i * per, (i + 1) * per)
            tokens.append(objs.expand(per, -1, -1))
        for gligen, rows, tokens in by_model.values():
            jobs.append((gligen, torch.tensor(rows, device=x.device), torch.cat(tokens)))
        # a compiled UNet (compiled mode, nodes.runtime.compiled) runs this call eagerly: dynamo does not
        # guard on module hooks (skip_nnmodule_hook_guards), so a graph traced without the fusers would
        # ignore them and one traced with them would fuse later plain calls (tests/test_gligen.py)
        with _hooked(blocks, jobs), eager_while_hooked():
            yield


@contextlib.contextmanager
def _hooked(blocks: dict[str, Any], jobs: list) -> Iterator[None]:
    """Forward hooks: each block's input is kept, and its self-attention's output ``a`` becomes
    ``fuser(x + a) - x`` on the grounded rows, so the block's residual sum is the fused state."""
    handles = []
    try:
        for name, block in blocks.items():
            seen: dict[str, Any] = {}

            def keep(module: Any, args: tuple, kwargs: dict, seen: dict = seen) -> None:
                seen["x"] = args[0] if args else kwargs["hidden_states"]

            def patch(module: Any, args: tuple, output: Any, seen: dict = seen, name: str = name) -> Any:
                x = seen.pop("x")
                out = output.clone()
                for gligen, rows, tokens in jobs:
                    fuser = gligen.fusers[gligen.blocks.index(name)]
                    param = next(fuser.parameters())
                    state = (x[rows] + output[rows]).to(param.dtype)
                    fused = fuse(fuser, state, tokens.to(param.dtype), module.heads).to(output.dtype)
                    out[rows] = fused - x[rows]
                return out

            handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
            handles.append(block.attn1.register_forward_hook(patch))
        yield
    finally:
        for handle in handles:
            handle.remove()
