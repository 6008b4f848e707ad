"""ComfyUI's attention-multiply nodes: UNetSelfAttentionMultiply, UNetCrossAttentionMultiply and
CLIPAttentionMultiply scale the query, key, value and output projections (weights and biases)
of every self-attention (``attn1``) or cross-attention (``attn2``) layer of a UNet, or of every
self-attention layer of the text encoders (transformers' ``self_attn.q_proj`` ...).

Each returns the handle with one entry on its patch stack (nodes.runtime.patches.Scale per
parameter), applied while the model is in use and undone afterwards, as a LoRA is. A factor of
1 patches nothing; a model without such layers (a FLUX transformer names its attention
``attn``, T5 ``SelfAttention``) is an error naming the input, where ComfyUI changes nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ClipHandle, ModelHandle

CATEGORY = "_for_testing/attention_experiments"
#: The projection each factor scales, by its name's ending in diffusers' and transformers' layouts.
UNET_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
CLIP_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


def scale_table(network: Any, layer: str, projections: dict[str, str], factors: dict[str, float]) -> dict:
    """``Scale`` patches for the weights and biases of ``layer``'s projections whose factor is not 1."""
    from nodes.runtime.patches import Scale

    endings = {f"{layer}.{name}.{kind}": float(factors[key]) for key, name in projections.items()
               for kind in ("weight", "bias") if float(factors[key]) != 1.0}
    return {name: Scale(endings[ending]) for name, _ in network.named_parameters()
            for ending in endings if name.endswith(ending)}


def _factors() -> list[Input]:
    return [Input(name, T.FLOAT, default=1.0, min=0.0, max=10.0, step=0.01) for name in ("q", "k", "v", "out")]


def _unet(ctx, model, layer: str, label: str, factors: dict[str, float]):
    from nodes.runtime.patches import LoraEntry

    if not isinstance(model, ModelHandle):
        raise NodeError(f"model must come from a model loader, got {type(model).__name__}", "model")
    if all(float(f) == 1.0 for f in factors.values()):
        return (model,)
    table = scale_table(model.peek(), layer, UNET_PROJECTIONS, factors)
    if not table:
        raise NodeError(f"this {model.family.name} model has no {layer} attention layers (a UNet's) to scale",
                        "model")
    ctx.message(f"{label}: {len(table)} projection weights and biases scaled")
    return (dataclasses.replace(model, loras=(*model.loras, LoraEntry(label, 1.0, {"unet": table}))),)


@define_node("UNetSelfAttentionMultiply", category=CATEGORY, inputs=[Input("model", T.MODEL), *_factors()],
             outputs=[Output("MODEL", T.MODEL)])
def unet_self_attention_multiply(ctx, model, q: float, k: float, v: float, out: float):
    """Scale the UNet's self-attention (attn1) query, key, value and output projections."""
    return _unet(ctx, model, "attn1", "UNetSelfAttentionMultiply", dict(q=q, k=k, v=v, out=out))


@define_node("UNetCrossAttentionMultiply", category=CATEGORY, inputs=[Input("model", T.MODEL), *_factors()],
             outputs=[Output("MODEL", T.MODEL)])
def unet_cross_attention_multiply(ctx, model, q: float, k: float, v: float, out: float):
    """Scale the UNet's cross-attention (attn2: the prompt's) query, key, value and output projections."""
    return _unet(ctx, model, "attn2", "UNetCrossAttentionMultiply", dict(q=q, k=k, v=v, out=out))


@define_node("CLIPAttentionMultiply", category=CATEGORY, inputs=[Input("clip", T.CLIP), *_factors()],
             outputs=[Output("CLIP", T.CLIP)])
def clip_attention_multiply(ctx, clip, q: float, k: float, v: float, out: float):
    """Scale the text encoders' self-attention query, key, value and output projections."""
    from nodes.runtime.patches import LoraEntry

    if not isinstance(clip, ClipHandle):
        raise NodeError(f"clip must come from a checkpoint or CLIP loader, got {type(clip).__name__}", "clip")
    factors = dict(q=q, k=k, v=v, out=out)
    if all(float(f) == 1.0 for f in factors.values()):
        return (clip,)
    tables = {spec.module: scale_table(clip.peek(spec.module), "self_attn", CLIP_PROJECTIONS, factors)
              for spec in clip.family.text_encoders}
    tables = {module: table for module, table in tables.items() if table}
    if not tables:
        raise NodeError(f"this {clip.family.name} CLIP has no CLIP-style self-attention layers to scale", "clip")
    ctx.message("CLIPAttentionMultiply: " + ", ".join(f"{len(t)} in {m}" for m, t in tables.items()) + " scaled")
    return (dataclasses.replace(clip, loras=(*clip.loras, LoraEntry("CLIPAttentionMultiply", 1.0, tables))),)
