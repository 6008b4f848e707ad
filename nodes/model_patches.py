"""ComfyUI's model-patch nodes that change how a model is sampled, not its weights.

Each returns a new MODEL handle with the change recorded on it (the handle it was given
keeps sampling as before, so cached results upstream stay right); the sampler applies it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node


def _with(model, **changes):
    """A new handle whose sampling patches differ by ``changes``."""
    return dataclasses.replace(model, patches=dataclasses.replace(model.patches, **changes))


@define_node("RescaleCFG", category="advanced/model",
             inputs=[Input("model", T.MODEL),
                     Input("multiplier", T.FLOAT, default=0.7, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("MODEL", T.MODEL)])
def rescale_cfg(ctx, model, multiplier: float):
    """Classifier-free guidance rescaled to the conditional prediction's spread (0: plain CFG,
    1: fully rescaled), which keeps high cfg from washing out colours on v-prediction and
    zero-terminal-SNR models (nodes.families.denoiser.rescale_guidance)."""
    from nodes.samplers.model_sampling import FlowSampling, for_model

    if isinstance(for_model(model), FlowSampling):
        raise NodeError("RescaleCFG works on DDPM-trained and EDM models (SD1, SD2, SDXL, CosXL); a flow model "
                        "(FLUX) is guided by its distilled guidance instead", "model")
    if model.prediction_type not in ("epsilon", "v_prediction", "edm"):
        raise NodeError(f"RescaleCFG needs an epsilon, v-prediction or EDM model, not {model.prediction_type}",
                        "model")
    if not 0.0 <= float(multiplier) <= 1.0:
        raise NodeError(f"multiplier must be between 0 and 1, got {multiplier}", "multiplier")
    # ComfyUI keeps one CFG function: this one replaces one that replaced it (RenormCFG, PerpNeg)
    kept = tuple(rule for rule in model.patches.guidance if rule.stage != "combine")
    return (_with(model, cfg_rescale=float(multiplier), guidance=kept, perp_neg=None),)


@define_node("PerturbedAttentionGuidance", category="model_patches/unet",
             inputs=[Input("model", T.MODEL),
                     Input("scale", T.FLOAT, default=3.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("MODEL", T.MODEL)])
def perturbed_attention_guidance(ctx, model, scale: float):
    """Guidance away from the network's own prediction with its middle block's self-attention
    made the identity (Ahn et al. 2024): sharper structure, one more network pass per step.
    UNet families only (nodes.families.perturbed)."""
    from nodes.families.base import ConditioningError
    from nodes.families.perturbed import middle_self_attentions

    if float(scale) < 0:
        raise NodeError(f"scale must be 0 or more, got {scale}", "scale")
    try:
        middle_self_attentions(model.peek())
    except ConditioningError as exc:
        raise NodeError(f"{exc} (a flow transformer such as FLUX has no middle block)", "model") from None
    return (_with(model, pag_scale=float(scale)),)


@define_node("SelfAttentionGuidance", category="_for_testing", display_name="Self-Attention Guidance",
             inputs=[Input("model", T.MODEL),
                     Input("scale", T.FLOAT, default=0.5, min=-2.0, max=5.0, step=0.01),
                     Input("blur_sigma", T.FLOAT, default=2.0, min=0.0, max=10.0, step=0.1)],
             outputs=[Output("MODEL", T.MODEL)])
def self_attention_guidance(ctx, model, scale: float, blur_sigma: float):
    """Guidance away from the prediction with the regions the middle block attends to most
    blurred (Hong et al. 2023): fewer artefacts, two more network passes per step. UNet
    families only (nodes.families.self_attention); scale or blur 0 changes nothing."""
    from nodes.families.base import ConditioningError
    from nodes.families.self_attention import SelfAttentionSettings, middle_self_attention

    if not -2.0 <= float(scale) <= 5.0:
        raise NodeError(f"scale must be within -2..5, got {scale}", "scale")
    if not 0.0 <= float(blur_sigma) <= 10.0:
        raise NodeError(f"blur_sigma must be within 0..10, got {blur_sigma}", "blur_sigma")
    try:
        middle_self_attention(model.peek())
    except ConditioningError as exc:
        raise NodeError(f"{exc} (a flow transformer such as FLUX has no middle block)", "model") from None
    return (_with(model, self_attention=SelfAttentionSettings(float(scale), float(blur_sigma))),)


def _layers_input(name: str) -> Input:
    return Input(name, T.STRING, default="7, 8, 9", tooltip="Block numbers to skip (counting from 0), comma separated")


def skip_layers_patched(model, double_layers: str, single_layers: str, names: tuple[str, str] = ("double_layers",
                        "single_layers"), say: Any = None, **settings) -> tuple:
    """The model with skip-layer guidance set, after checking the blocks exist (ComfyUI ignores
    numbers past the last block; here they are an error naming the input: ``names``). On a family whose
    ComfyUI model never runs the block replacements these nodes set (``dit_blocks_unreached``), nothing
    is skipped, as there: the skipped pass is the conditional one, so only SkipLayerGuidanceDiT's
    rescaling acts (and the extra pass is not run); ``say`` (the node's message) says so."""
    from nodes.families.base import ConditioningError
    from nodes.families.skip_layers import SkipLayers, parse

    scale = settings.get("scale")
    if scale is not None:
        if not 0.0 <= float(scale) <= 10.0:
            raise NodeError(f"scale must be within 0..10, got {scale}", "scale")
        if float(scale) == 0.0:
            return (model,)  # no push: the handle samples as given
    layers = (("double", parse(double_layers)), ("single", parse(single_layers)))
    if not any(numbers for _, numbers in layers):
        return (model,)  # ComfyUI's rule: nothing to skip, nothing changes
    for name in ("start_percent", "end_percent"):
        if not 0.0 <= float(settings[name]) <= 1.0:
            raise NodeError(f"{name} must be within 0..1, got {settings[name]}", name)
    unreached = getattr(model.family, "dit_blocks_unreached", "")
    if unreached:
        acts = bool(settings.get("rescaling_scale"))
        if say is not None:
            say(f"{unreached} runs every block whatever this node sets (as ComfyUI's model does), so nothing is "
                "skipped: " + ("only rescaling_scale acts" if acts else "the node changes nothing"))
        if not acts:
            return (model,)
        return (_with(model, skip_layers=SkipLayers(layers=(("double", ()), ("single", ())), **settings)),)
    try:
        blocks = model.family.dit_blocks(model.peek())
    except ConditioningError as exc:
        raise NodeError(str(exc), "model") from None
    for (kind, numbers), name in zip(layers, names):
        count = len(blocks.get(kind, ()))  # a single-stream transformer (Krea 2, Qwen-Image) lists no double blocks
        past = [n for n in numbers if n >= count]
        if past and not count:
            raise NodeError(f"the model has no {kind} blocks ({model.family.name}); leave {name} empty", name)
        if past:
            raise NodeError(f"block {past[0]} does not exist: the model has {count} {kind} blocks "
                            f"(0..{count - 1})", name)
    return (_with(model, skip_layers=SkipLayers(layers=layers, **settings)),)


@define_node("SkipLayerGuidanceDiT", category="advanced/guidance",
             inputs=[Input("model", T.MODEL), _layers_input("double_layers"), _layers_input("single_layers"),
                     Input("scale", T.FLOAT, default=3.0, min=0.0, max=10.0, step=0.1),
                     Input("start_percent", T.FLOAT, default=0.01, min=0.0, max=1.0, step=0.001),
                     Input("end_percent", T.FLOAT, default=0.15, min=0.0, max=1.0, step=0.001),
                     Input("rescaling_scale", T.FLOAT, default=0.0, min=0.0, max=10.0, step=0.01)],
             outputs=[Output("MODEL", T.MODEL)])
def skip_layer_guidance_dit(ctx, model, double_layers: str, single_layers: str, scale: float,
                            start_percent: float, end_percent: float, rescaling_scale: float):
    """Guide away from the conditional prediction made with some transformer blocks skipped,
    inside a window of the run (nodes.families.skip_layers): one more network pass per step there."""
    return skip_layers_patched(model, double_layers, single_layers, say=ctx.message, start_percent=float(start_percent),
                               end_percent=float(end_percent), scale=float(scale),
                               rescaling_scale=float(rescaling_scale))


@define_node("SkipLayerGuidanceDiTSimple", category="advanced/guidance",
             inputs=[Input("model", T.MODEL), _layers_input("double_layers"), _layers_input("single_layers"),
                     Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
                     Input("end_percent", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
             outputs=[Output("MODEL", T.MODEL)])
def skip_layer_guidance_dit_simple(ctx, model, double_layers: str, single_layers: str, start_percent: float,
                                   end_percent: float):
    """The unconditional pass made with some transformer blocks skipped inside the window, so
    classifier-free guidance pushes away from it (no effect at cfg 1, as in ComfyUI)."""
    return skip_layers_patched(model, double_layers, single_layers, say=ctx.message, start_percent=float(start_percent),
                               end_percent=float(end_percent), simple=True)


@define_node("DifferentialDiffusion", category="_for_testing",
             inputs=[Input("model", T.MODEL),
                     Input("strength", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01, optional=True)],
             outputs=[Output("MODEL", T.MODEL)])
def differential_diffusion(ctx, model, strength: float = 1.0):
    """A soft noise mask becomes a per-step schedule: a pixel masked at m is repainted over
    the last m of the run, so edits fade into the kept image instead of blending a finished
    repaint over it (nodes.samplers.hold). Below strength 1 that schedule is blended with
    the soft mask."""
    if not 0.0 <= float(strength) <= 1.0:
        raise NodeError(f"strength must be between 0 and 1, got {strength}", "strength")
    return (_with(model, differential_diffusion=float(strength)),)


def _freeu_inputs(b1: float, b2: float) -> list[Input]:
    return [Input("model", T.MODEL), Input("b1", T.FLOAT, default=b1, min=0.0, max=10.0, step=0.01),
            Input("b2", T.FLOAT, default=b2, min=0.0, max=10.0, step=0.01),
            Input("s1", T.FLOAT, default=0.9, min=0.0, max=10.0, step=0.01),
            Input("s2", T.FLOAT, default=0.2, min=0.0, max=10.0, step=0.01)]


def _freeu(model, version: str, b1: float, b2: float, s1: float, s2: float):
    from nodes.handles import FreeUSettings
    from nodes.speed_patches import unet_model

    unet_model(model, "FreeU" if version == "v1" else "FreeU_V2")
    return (_with(model, freeu=FreeUSettings(version, float(b1), float(b2), float(s1), float(s2))),)


@define_node("FreeU", category="model_patches/unet", inputs=_freeu_inputs(1.1, 1.2),
             outputs=[Output("MODEL", T.MODEL)])
def freeu(ctx, model, b1: float, b2: float, s1: float, s2: float):
    """FreeU: the UNet decoder's backbone features amplified, its skip features' low
    frequencies damped (nodes.families.freeu)."""
    return _freeu(model, "v1", b1, b2, s1, s2)


@define_node("FreeU_V2", category="model_patches/unet", inputs=_freeu_inputs(1.3, 1.4),
             outputs=[Output("MODEL", T.MODEL)])
def freeu_v2(ctx, model, b1: float, b2: float, s1: float, s2: float):
    """FreeU_V2: FreeU with the backbone boost following the features' own mean map."""
    return _freeu(model, "v2", b1, b2, s1, s2)



#: ComfyUI's resize methods for Deep Shrink (comfy.utils.common_upscale's).
DEEP_SHRINK_METHODS = ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]


def _unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise NodeError(f"{name} must be between 0 and 1, got {value:g}", name)
    return value


@define_node("PatchModelAddDownscale", category="model_patches/unet",
             display_name="PatchModelAddDownscale (Kohya Deep Shrink)",
             inputs=[Input("model", T.MODEL),
                     Input("block_number", T.INT, default=3, min=1, max=32, step=1),
                     Input("downscale_factor", T.FLOAT, default=2.0, min=0.1, max=9.0, step=0.001),
                     Input("start_percent", T.FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
                     Input("end_percent", T.FLOAT, default=0.35, min=0.0, max=1.0, step=0.001),
                     Input("downscale_after_skip", T.BOOLEAN, default=True),
                     Input("downscale_method", T.COMBO, choices=DEEP_SHRINK_METHODS),
                     Input("upscale_method", T.COMBO, choices=DEEP_SHRINK_METHODS)],
             outputs=[Output("MODEL", T.MODEL)])
def patch_model_add_downscale(ctx, model, block_number: int, downscale_factor: float, start_percent: float,
                              end_percent: float, downscale_after_skip: bool, downscale_method: str,
                              upscale_method: str):
    """Kohya's Deep Shrink: over the first part of the run the UNet's deep layers work on
    features shrunk after encoder block ``block_number``, so a large image is composed at the
    size the model knows (no repeated subjects) and detailed at full size. UNet families only
    (nodes.families.deep_shrink)."""
    from nodes.handles import DeepShrinkSettings
    from nodes.samplers.model_sampling import DiscreteSampling, for_model
    from nodes.samplers.schedules import percent_to_sigma
    from nodes.speed_patches import unet_model

    unet_model(model, "PatchModelAddDownscale (Deep Shrink)")
    if not isinstance(for_model(model), DiscreteSampling):
        raise NodeError("PatchModelAddDownscale (Deep Shrink) needs a discrete-time model (its start and end "
                        "percent are read on that schedule)", "model")
    if isinstance(block_number, bool) or not isinstance(block_number, (int, float)) \
            or not 1 <= int(block_number) <= 32 or int(block_number) != block_number:
        raise NodeError(f"block_number must be a whole number from 1 to 32, got {block_number!r}", "block_number")
    factor = float(downscale_factor)
    if not 0.1 <= factor <= 9.0:
        raise NodeError(f"downscale_factor must be between 0.1 and 9, got {factor:g}", "downscale_factor")
    for name, method in (("downscale_method", downscale_method), ("upscale_method", upscale_method)):
        if method not in DEEP_SHRINK_METHODS:
            raise NodeError(f"{name} must be one of {', '.join(DEEP_SHRINK_METHODS)}, got {method!r}", name)
    schedule = for_model(model).schedule
    settings = DeepShrinkSettings(int(block_number), factor, percent_to_sigma(schedule, _unit("start_percent",
                                  start_percent)), percent_to_sigma(schedule, _unit("end_percent", end_percent)),
                                  bool(downscale_after_skip), downscale_method, upscale_method)
    return (_with(model, deep_shrink=settings),)
