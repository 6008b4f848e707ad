"""SkipLayerGuidanceDiT and SkipLayerGuidanceDiTSimple on the tiny FLUX (one double and one single
block): skipping a block means the network as if that block were not there, so the reference for
each evaluation is a copy of the transformer with the block removed from its list.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import tiny_flux
from engine.context import NodeError
from nodes.families import flux
from nodes.families.denoiser import Denoiser
from nodes.families.skip_layers import SkipLayers
from nodes.handles import ModelHandle
from nodes.model_patches import skip_layer_guidance_dit, skip_layer_guidance_dit_simple
from nodes.samplers.schedules import training_schedule
from nodes.sampling import ksampler
from test_flux import Recorder, _embeds

X = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
T = torch.tensor(700.0)


def _transformer():
    return tiny_flux.components("dev")["transformer"]


def _without(kind: str):
    """The tiny transformer with its only block of ``kind`` removed (what skipping it means)."""
    net = copy.deepcopy(_transformer())
    if kind == "double":
        net.transformer_blocks = torch.nn.ModuleList()
    else:
        net.single_transformer_blocks = torch.nn.ModuleList()
    return net


def _conds():
    embeds, pooled = _embeds("dev")
    return ([[embeds, {"pooled_output": pooled, "guidance": 3.5}]],
            [[embeds * 0.5, {"pooled_output": pooled, "guidance": 3.5}]])


def _output(net, positive, negative=None, cfg=1.0, skip=None):
    schedule = training_schedule(flux.FAMILY.scheduler_config())
    with torch.inference_mode():
        return Denoiser(net, flux.FAMILY, positive=positive, negative=negative, cfg=cfg, image_size=(64, 64),
                        batch=1, schedule=schedule, skip_layers=skip).model_output(X, T)


def _settings(kind: str, **kw) -> SkipLayers:
    layers = (("double", (0,) if kind == "double" else ()), ("single", (0,) if kind == "single" else ()))
    return SkipLayers(layers=layers, **{"start_percent": 0.0, "end_percent": 1.0, **kw})


@pytest.mark.parametrize("kind", ["double", "single"])
def test_one_evaluation_follows_comfyuis_formula(kind):
    """Flow outputs are affine in the clean prediction, so the x0 formula reads v + s (v - v_skipped)."""
    positive, negative = _conds()
    plain = _output(_transformer(), positive)
    skipped = _output(_without(kind), positive)
    guided = _output(_transformer(), positive, skip=_settings(kind, scale=2.0))
    assert (guided - (plain + 2.0 * (plain - skipped))).abs().max() <= 1e-5
    assert (plain - skipped).abs().max() > 1e-3  # the block matters
    # under CFG it moves the guided result by the same term
    cfg = _output(_transformer(), positive, negative, cfg=3.0)
    both = _output(_transformer(), positive, negative, cfg=3.0, skip=_settings(kind, scale=2.0))
    assert (both - (cfg + 2.0 * (plain - skipped))).abs().max() <= 1e-5


def test_outside_its_window_and_at_scale_zero_it_changes_nothing():
    positive, _ = _conds()
    plain = _output(_transformer(), positive)
    assert torch.equal(_output(_transformer(), positive, skip=_settings("double", scale=2.0, start_percent=0.9,
                                                                         end_percent=1.0)), plain)
    assert torch.equal(_output(_transformer(), positive, skip=_settings("double", scale=0.0)), plain)


def test_simple_skips_the_blocks_in_the_unconditional_pass():
    positive, negative = _conds()
    guided = _output(_transformer(), positive, negative, cfg=2.0, skip=_settings("single", simple=True))
    cond = _output(_transformer(), positive)
    uncond = _output(_without("single"), negative)
    assert (guided - (uncond + 2.0 * (cond - uncond))).abs().max() <= 1e-5
    assert torch.equal(_output(_transformer(), positive, skip=_settings("single", simple=True)), cond)  # cfg 1


def _model() -> ModelHandle:
    net = _transformer()
    return ModelHandle(flux.FAMILY, scheduler_config=flux.FAMILY.scheduler_config(), latent=flux.FAMILY.latent,
                       _use_unet=lambda: contextlib.nullcontext(net), _peek=lambda: net)


def _sample(model) -> torch.Tensor:
    positive, negative = _conds()
    (out,) = ksampler(Recorder().ctx, model, 3, 4, 1.0, "euler", "simple", positive, negative,
                      {"samples": torch.zeros(1, 16, 8, 8)})
    return out["samples"]


def test_through_ksampler_the_nodes_change_the_image_and_rescaling_counts():
    plain = _sample(_model())
    (slg,) = skip_layer_guidance_dit(Recorder().ctx, _model(), "0", "", 3.0, 0.0, 1.0, 0.0)
    (rescaled,) = skip_layer_guidance_dit(Recorder().ctx, _model(), "0", "", 3.0, 0.0, 1.0, 0.7)
    a, b = _sample(slg), _sample(rescaled)
    assert (a - plain).abs().max() > 1e-3 and (a - b).abs().max() > 1e-4
    model = _model()
    assert skip_layer_guidance_dit(Recorder().ctx, model, "", "none", 3.0, 0.0, 1.0, 0.0)[0] is model


def test_refusals_name_their_input():
    from test_sampling import Tiny

    with pytest.raises(NodeError) as err:
        skip_layer_guidance_dit(Recorder().ctx, Tiny("sd1").model, "0", "", 3.0, 0.0, 1.0, 0.0)
    assert err.value.input_name == "model" and "UNet" in str(err.value)
    with pytest.raises(NodeError) as err:
        skip_layer_guidance_dit_simple(Recorder().ctx, _model(), "0", "7", 0.0, 1.0)
    assert err.value.input_name == "single_layers" and "1 single blocks" in str(err.value)


def test_a_guider_of_several_denoisers_refuses_it_naming_the_model():
    """DualCFGGuider guides with two denoisers, which skip-layer guidance does not reach: refused
    by name rather than dropped. A scale of 0 or past 10 is settled by the node."""
    from nodes import custom_sampling as cs

    positive, negative = _conds()
    (slg,) = skip_layer_guidance_dit(Recorder().ctx, _model(), "0", "", 3.0, 0.0, 1.0, 0.0)
    ctx = Recorder().ctx
    (guider,) = cs.dual_cfg_guider(ctx, slg, positive, negative, negative, 2.0, 1.5, "regular")
    (sigmas,) = cs.basic_scheduler(ctx, slg, "simple", 2, 1.0)
    with pytest.raises(NodeError) as err:
        cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, 1)[0], guider, cs.ksampler_select(ctx, "euler")[0],
                                   sigmas, {"samples": torch.zeros(1, 16, 8, 8)})
    assert err.value.input_name == "guider" and "DualCFGGuider" in str(err.value)
    model = _model()
    assert skip_layer_guidance_dit(Recorder().ctx, model, "0", "", 0.0, 0.0, 1.0, 0.0)[0] is model
    with pytest.raises(NodeError) as err:
        skip_layer_guidance_dit(Recorder().ctx, model, "0", "", 11.0, 0.0, 1.0, 0.0)
    assert err.value.input_name == "scale"


def test_a_single_stream_transformer_skips_its_blocks_and_refuses_double_ones_by_name():
    """Krea 2 lists only single blocks: its double_layers must be empty, and its single ones are skipped."""
    import tiny_krea2
    from nodes.families import krea2

    net = krea2.FAMILY.wrap_network(tiny_krea2.components()["transformer"])
    model = ModelHandle(krea2.FAMILY, scheduler_config=krea2.FAMILY.scheduler_config(), latent=krea2.FAMILY.latent,
                        _use_unet=lambda: contextlib.nullcontext(net), _peek=lambda: net)
    (slg,) = skip_layer_guidance_dit(Recorder().ctx, model, "", "0", 3.0, 0.0, 1.0, 0.0)
    assert slg.patches.skip_layers.layers == (("double", ()), ("single", (0,)))
    with pytest.raises(NodeError) as err:
        skip_layer_guidance_dit(Recorder().ctx, model, "7", "0", 3.0, 0.0, 1.0, 0.0)
    assert err.value.input_name == "double_layers" and "no double blocks" in str(err.value)
