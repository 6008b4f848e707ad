"""FluxDisableGuidance: the distilled guidance left out of FLUX [dev]'s conditioning vector.

The reference is the same transformer with its guidance embedder's last layer zeroed, which
embeds every guidance value as nothing: sampling it with any guidance must equal sampling the
original with the guidance disabled. Guidance 0 is not "disabled" (0 is itself embedded), so
the disabled run must differ from it and from 3.5.
"""
from __future__ import annotations

import contextlib
import copy

import torch

import tiny_flux
from nodes import flux_nodes
from nodes.families import flux
from nodes.handles import ModelHandle
from nodes.sampling import ksampler
from test_flux import Recorder, _embeds


def _model(transformer) -> ModelHandle:
    return ModelHandle(flux.FAMILY, scheduler_config=flux.FAMILY.scheduler_config(), latent=flux.FAMILY.latent,
                       _use_unet=lambda: contextlib.nullcontext(transformer))


def _sample(model: ModelHandle, cond: list, cfg: float = 1.0, negative: list | None = None) -> torch.Tensor:
    empty = {"samples": torch.zeros(1, 16, 8, 8)}
    (out,) = ksampler(Recorder().ctx, model, 4, 3, cfg, "euler", "normal", cond, negative or cond, empty)
    return out["samples"]


def _cond(guidance: float) -> list:
    embeds, pooled = _embeds("dev")
    return [[embeds, {"pooled_output": pooled, "guidance": guidance}]]


def _transformers():
    """The tiny [dev] transformer and a copy whose guidance embedder outputs zeros for any guidance."""
    original = tiny_flux.components("dev")["transformer"]
    blind = copy.deepcopy(original)
    with torch.no_grad():
        blind.time_text_embed.guidance_embedder.linear_2.weight.zero_()
        blind.time_text_embed.guidance_embedder.linear_2.bias.zero_()
    return original, blind


def test_disabled_guidance_equals_a_model_whose_guidance_embedding_is_zero():
    original, blind = _transformers()
    (disabled,) = flux_nodes.flux_disable_guidance(Recorder().ctx, _cond(3.5))
    assert disabled[0][1]["guidance"] is None
    ours = _sample(_model(original), disabled)
    assert (ours - _sample(_model(blind), _cond(3.5))).abs().max() <= 1e-5
    assert (ours - _sample(_model(original), _cond(0.0))).abs().max() > 1e-3
    assert (ours - _sample(_model(original), _cond(3.5))).abs().max() > 1e-3
    # the hook is gone afterwards: the original samples as before
    assert torch.equal(_sample(_model(original), _cond(3.5)), _sample(_model(original), _cond(3.5)))


def test_one_side_disabled_under_guidance_disables_that_side_only():
    """cfg 2, a disabled positive and a guided negative in one batch: at one evaluation the result
    is CFG of the positive through the blind model and the negative through the original."""
    from nodes.families.denoiser import Denoiser

    original, blind = _transformers()
    (disabled,) = flux_nodes.flux_disable_guidance(Recorder().ctx, _cond(3.5))
    negative = [[t * 0.5, extra] for t, extra in _cond(3.5)]
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor(600.0)

    def output(net, positive, neg, cfg):
        return Denoiser(net, flux.FAMILY, positive=positive, negative=neg, cfg=cfg, image_size=(64, 64),
                        batch=1).model_output(x, t)

    with torch.inference_mode():
        mixed = output(original, disabled, negative, 2.0)
        cond, uncond = output(blind, _cond(3.5), None, 1.0), output(original, negative, None, 1.0)
    assert (mixed - (uncond + 2.0 * (cond - uncond))).abs().max() <= 1e-5
    assert (cond - output(original, _cond(3.5), None, 1.0)).abs().max() > 1e-3  # not vacuous
