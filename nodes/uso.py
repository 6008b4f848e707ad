"""ByteDance's USO style reference for FLUX.1 [dev]: ComfyUI's USOStyleReference, fed by ModelPatchLoader.

USO turns a style picture into extra prompt tokens. SigLIP (CLIPVisionEncode) encodes the picture; its
projector (``uso-flux1-projector-v1.safetensors`` in ``models/model_patches``, keys under
``feature_embedder.``) reads three of the encoder's layers (ComfyUI's ``all_hidden_states`` -20 and -11
and the penultimate), mixes each layer's tokens down to a few style tokens, normalises them and projects
them to the transformer's width. Those tokens go in front of the prompt's tokens *after* the
transformer's text embedder, at text position 0, on every network call (both sides of guidance), as
ComfyUI's post-input patch does; two references put the later one's tokens first. USO's own LoRA
(``uso-flux1-dit-lora-v1``, XLabs' layout) loads through LoraLoaderModelOnly (nodes.lora_keys).

The prompt's own encoding is untouched, so the hooks live only while a sampler runs (:func:`applied`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.checkpoint.load import CheckpointError
from nodes.families.base import ConditioningError
from nodes.model_patch_nodes import MODEL_PATCH
from nodes.style_model import CLIP_VISION_OUTPUT

#: the projector's key prefix in USO's file, and one key only it has
PREFIX = "feature_embedder."
MARKER = PREFIX + "mid_layer_norm.bias"
#: the three feature levels, in the order their tokens are joined, with the encoder layer each reads
#: (ComfyUI's all_hidden_states index; -2 is the penultimate layer)
LEVELS = (("high", -2), ("mid", -11), ("low", -20))
KIND = "uso-projector"


def is_uso_projector(state: dict[str, Any]) -> bool:
    return MARKER in state


def _projector_class() -> Any:
    import torch
    from torch import nn

    class UsoProjector(nn.Module):
        """Per level: a token mix (the encoder's tokens -> ``style_tokens``, SiLU), a LayerNorm over the
        features and a projection to the transformer's width; the levels' tokens joined high, mid, low.
        Attribute names are the file's (after ``feature_embedder.``)."""

        def __init__(self, tokens: int, style_tokens: int, features: int, width: int) -> None:
            super().__init__()
            for level, _ in LEVELS:
                setattr(self, f"{level}_embedding_linear", nn.Sequential(nn.Linear(tokens, style_tokens), nn.SiLU()))
                setattr(self, f"{level}_layer_norm", nn.LayerNorm(features))
                setattr(self, f"{level}_projection", nn.Linear(features, width))
            self.config = {"kind": KIND, "tokens": tokens, "style_tokens": style_tokens, "features": features,
                           "width": width}

        def forward(self, layers: dict[int, "torch.Tensor"]) -> "torch.Tensor":
            out = []
            for level, layer in LEVELS:
                x = layers[layer].to(self.high_projection.weight.dtype)  # [B, tokens, features]
                x = getattr(self, f"{level}_embedding_linear")(x.transpose(1, 2)).transpose(1, 2)
                out.append(getattr(self, f"{level}_projection")(getattr(self, f"{level}_layer_norm")(x)))
            return torch.cat(out, dim=1)

    return UsoProjector


def load(state: dict[str, Any], name: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """(the projector, what it is for the loader's message); its sizes come from the file's shapes."""
    own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    try:
        style_tokens, tokens = own["high_embedding_linear.0.weight"].shape
        width, features = own["high_projection.weight"].shape
    except KeyError as exc:
        raise CheckpointError(f"{name}: not a complete USO style projector ({PREFIX}{exc.args[0]} is missing)") \
            from None
    projector = _projector_class()(tokens, style_tokens, features, width)
    try:
        projector.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: its keys do not fit a USO style projector ({exc})") from None
    projector.to(dtype)
    return projector, {"format": f"USO style projector for FLUX.1 ({tokens} image tokens -> "
                                 f"{len(LEVELS) * style_tokens} style tokens, width {width})"}


@dataclasses.dataclass(frozen=True, eq=False)
class StyleReference:
    """One USOStyleReference: the projector (a model patch handle) and the encoder's three layers."""

    projector: Any
    layers: dict


@contextlib.contextmanager
def applied(network: Any, references: tuple) -> Iterator[None]:
    """While a sampling run goes on: each reference's style tokens in front of the embedded prompt, at
    text position 0 (the transformer's text ids and any attention mask grow to match); nothing without
    references."""
    if not references:
        yield
        return
    import torch

    from nodes.runtime.compiled import eager_while_hooked

    transformer = getattr(network, "kiln_network", network)
    embedder = transformer.context_embedder
    prefix = None
    for reference in references:  # each prepends: the last applied comes first, as in ComfyUI
        with reference.projector.use() as projector:
            if projector.config["width"] != embedder.out_features:
                raise ConditioningError(f"the USO projector {reference.projector.name!r} makes tokens "
                                        f"{projector.config['width']} wide and this FLUX model's text tokens are "
                                        f"{embedder.out_features}", "model")
            with torch.no_grad():
                tokens = projector({k: v.to(projector.high_projection.weight.device)
                                    for k, v in reference.layers.items()})
        if prefix is not None and tokens.shape[0] != prefix.shape[0]:
            if 1 not in (tokens.shape[0], prefix.shape[0]):
                raise ConditioningError(f"two USOStyleReference nodes were given {prefix.shape[0]} and "
                                        f"{tokens.shape[0]} pictures: give each one picture, or the same number",
                                        "model")
            rows = max(tokens.shape[0], prefix.shape[0])
            tokens, prefix = tokens.expand(rows, -1, -1), prefix.expand(rows, -1, -1)
        prefix = tokens if prefix is None else torch.cat([tokens, prefix], dim=1)
    count = prefix.shape[1]

    def prepend(module: Any, args: Any, out: "torch.Tensor") -> "torch.Tensor":
        # one picture serves every row; several go row by row, repeated for each side of guidance
        if out.shape[0] % prefix.shape[0]:
            raise ConditioningError(f"USOStyleReference was given {prefix.shape[0]} pictures and the sampler runs "
                                    f"{out.shape[0]} rows: give one picture, or one per image of the batch", "model")
        tokens = prefix.to(out.device, out.dtype).repeat(out.shape[0] // prefix.shape[0], 1, 1)
        return torch.cat([tokens, out], dim=1)

    def lengthen(module: Any, args: Any, kwargs: dict) -> tuple:
        ids = kwargs["txt_ids"]
        kwargs["txt_ids"] = torch.cat([ids.new_zeros(*ids.shape[:-2], count, ids.shape[-1]), ids], dim=-2)
        mask = (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask")
        if mask is not None:  # StyleModelApply's bias: the style tokens are seen by all, unbiased
            kwargs["joint_attention_kwargs"] = {**kwargs["joint_attention_kwargs"],
                                                "attention_mask": torch.nn.functional.pad(mask, (count, 0, count, 0))}
        return args, kwargs

    with contextlib.ExitStack() as stack:
        stack.callback(embedder.register_forward_hook(prepend).remove)
        stack.callback(transformer.register_forward_pre_hook(lengthen, with_kwargs=True).remove)
        stack.enter_context(eager_while_hooked())
        yield


@define_node(
    "USOStyleReference",
    category="advanced/model_patches/flux",
    inputs=[Input("model", T.MODEL),
            Input("model_patch", MODEL_PATCH, tooltip="USO's style projector (ModelPatchLoader)"),
            Input("clip_vision_output", CLIP_VISION_OUTPUT,
                  tooltip="The style picture through SigLIP (CLIPVisionEncode)")],
    outputs=[Output("MODEL", T.MODEL)],
)
def uso_style_reference(ctx, model, model_patch, clip_vision_output):
    """The FLUX.1 model with the picture's style tokens before its prompt on every call while it samples
    (stacked before those of a reference already on it)."""
    from nodes.control.apply import ControlNetHandle
    from nodes.families.flux import Flux
    from nodes.handles import ModelHandle
    from nodes.vision_models import VisionOutput

    if not isinstance(model, ModelHandle) or not isinstance(model.family, Flux):
        what = model.family.name if isinstance(model, ModelHandle) else type(model).__name__
        raise NodeError(f"USO's style reference works on FLUX.1 models, got {what}", "model")
    if not isinstance(model_patch, ControlNetHandle) or model_patch.config.get("kind") != KIND:
        raise NodeError("must be USO's style projector (uso-flux1-projector-v1.safetensors through "
                        "ModelPatchLoader)", "model_patch")
    if not isinstance(clip_vision_output, VisionOutput):
        raise NodeError(f"must come from CLIPVisionEncode, got {type(clip_vision_output).__name__}",
                        "clip_vision_output")
    layers = {**clip_vision_output.layers, -2: clip_vision_output.penultimate_hidden_states}
    missing = [layer for _, layer in LEVELS if layer not in layers]
    if missing:
        raise NodeError(f"USO reads the image encoder's layers {[layer for _, layer in LEVELS]} from the end; this "
                        f"{clip_vision_output.kind} encoder has fewer than {-min(missing)} layers (use SigLIP, "
                        "sigclip_vision_patch14_384)", "clip_vision_output")
    tokens, features = layers[-2].shape[1:]
    if (tokens, features) != (model_patch.config["tokens"], model_patch.config["features"]):
        raise NodeError(f"the projector reads {model_patch.config['tokens']} image tokens "
                        f"{model_patch.config['features']} wide and the picture was encoded into {tokens} tokens "
                        f"{features} wide: encode it with the SigLIP USO was made for "
                        "(sigclip_vision_patch14_384)", "clip_vision_output")
    reference = StyleReference(model_patch, {layer: layers[layer] for _, layer in LEVELS})
    patches = model.patches
    return (dataclasses.replace(model, patches=dataclasses.replace(
        patches, style_references=(*patches.style_references, reference))),)
