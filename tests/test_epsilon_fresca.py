"""ComfyUI's Epsilon Scaling and FreSca guidance patches (nodes/guidance_patches.py, rules in
nodes/families/guidance_rules.py).

At one evaluation each must equal its formula written out here on the clean-latent
predictions; at its identity setting KSampler must give the unpatched model's bytes, and at
another setting another image; bad input is refused by name; a ComfyUI API prompt using the
node validates and runs.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes import guidance_patches as gp
from nodes.sampling import ksampler
from test_guidance_patches import _eps_x0, _evaluate, _patched
from test_sampling import Recorder, sd1, sd2v  # noqa: F401 (fixtures)


def _txt2img(tiny, model, cfg=6.0):
    (out,) = ksampler(Recorder().ctx, model, 5, 4, cfg, "euler", "normal", tiny.pos, tiny.neg,
                      {"samples": torch.zeros_like(tiny.init)})
    return out["samples"]


def _band_filter(g, low, high, cutoff):
    """FreSca's filter by hand, without fftshift: a frequency bin is "low" when its signed index
    k (bins n/2.. count as k - n) lies in [-f, f), f = min(cutoff, n // 2), on both axes."""
    def low_bins(n):
        k = torch.arange(n)
        signed = torch.where(k < n - n // 2, k, k - n)
        f = min(cutoff, n // 2)
        return (signed >= -f) & (signed < f)

    box = low_bins(g.shape[-2])[:, None] & low_bins(g.shape[-1])[None, :]
    weights = torch.where(box, torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64))
    return torch.fft.ifft2(torch.fft.fft2(g.double()) * weights).real.float()


# -- (a) one evaluation is the formula -------------------------------------------------------------

def test_epsilon_scaling_divides_the_guided_noise(sd1):
    out, cond, uncond, z, sigma = _evaluate(sd1, _patched(sd1, gp.epsilon_scaling, 1.2))
    x, c0 = _eps_x0(z, sigma, cond)
    _, u0 = _eps_x0(z, sigma, uncond)
    guided = u0 + 7.0 * (c0 - u0)
    expected_x0 = x - (x - guided) / 1.2
    assert torch.allclose(out, (x - expected_x0) / sigma, atol=2e-4, rtol=1e-4)
    plain = uncond + 7.0 * (cond - uncond)
    assert torch.allclose(out, plain / 1.2, atol=2e-4, rtol=1e-4)  # for an epsilon model: eps / factor
    assert (out - plain).abs().max() > 1e-2


def test_epsilon_scaling_runs_at_cfg_1_on_the_conditional_side(sd1):
    """A post-CFG rule: ComfyUI runs it with no unconditional pass too."""
    out, cond, _, _, _ = _evaluate(sd1, _patched(sd1, gp.epsilon_scaling, 0.8), cfg=1.0)
    assert torch.allclose(out, cond / 0.8, atol=2e-4, rtol=1e-4)


def test_epsilon_scaling_on_v_prediction_scales_the_implied_noise(sd2v):
    out, cond, uncond, z, sigma = _evaluate(sd2v, _patched(sd2v, gp.epsilon_scaling, 1.1))
    scale = math.sqrt(1 + sigma ** 2)
    x = z * scale
    to_x0 = lambda v: (z - sigma * v) / scale  # noqa: E731
    guided = to_x0(uncond) + 7.0 * (to_x0(cond) - to_x0(uncond))
    x0 = x - (x - guided) / 1.1
    assert torch.allclose(out, (z - x0 * scale) / sigma, atol=2e-4, rtol=1e-4)


def test_fresca_scales_the_guidance_by_frequency_band(sd1):
    out, cond, uncond, z, sigma = _evaluate(sd1, _patched(sd1, gp.fresca, 0.7, 1.6, 2))
    x, c0 = _eps_x0(z, sigma, cond)
    _, u0 = _eps_x0(z, sigma, uncond)
    new_cond = u0 + _band_filter(c0 - u0, 0.7, 1.6, 2)
    expected_x0 = u0 + 7.0 * (new_cond - u0)
    assert torch.allclose(out, (x - expected_x0) / sigma, atol=2e-4, rtol=1e-4)
    assert (out - (uncond + 7.0 * (cond - uncond))).abs().max() > 1e-2


def test_fresca_with_one_scale_everywhere_is_that_scale_on_the_guidance(sd1):
    """A cutoff past half the latent makes every bin low: FreSca is then CFG at cfg * scale_low."""
    out, cond, uncond, *_ = _evaluate(sd1, _patched(sd1, gp.fresca, 0.5, 3.0, 20))  # 8x8 latent
    assert torch.allclose(out, uncond + 3.5 * (cond - uncond), atol=2e-4, rtol=1e-4)


def test_fresca_needs_a_negative_side(sd1):
    out, cond, *_ = _evaluate(sd1, _patched(sd1, gp.fresca, 0.5, 3.0, 2), cfg=1.0)
    assert torch.allclose(out, cond, atol=2e-5)


# -- (b) identity and (c) not vacuous, through KSampler --------------------------------------------

@pytest.mark.parametrize("node,identity,other", [
    (gp.epsilon_scaling, (1.0,), (1.05,)),
    (gp.fresca, (1.0, 1.0, 2), (1.0, 1.5, 2))])
def test_identity_settings_give_the_unpatched_bytes_and_others_do_not(sd1, node, identity, other):
    plain = _txt2img(sd1, sd1.model)
    same = _txt2img(sd1, _patched(sd1, node, *identity))
    assert same.numpy().tobytes() == plain.numpy().tobytes()
    changed = _txt2img(sd1, _patched(sd1, node, *other))
    assert (changed - plain).abs().max() > 1e-2
    assert sd1.model.patches.guidance == ()  # the handle it was given samples as before


def test_fresca_defaults_on_a_small_latent_are_a_global_gain_not_identity(sd1):
    """At the default cutoff (20) an 8x8 latent is all low band: the default scale_low 1 leaves
    the run as plain CFG up to the filter's rounding."""
    plain = _txt2img(sd1, sd1.model)
    assert torch.allclose(_txt2img(sd1, _patched(sd1, gp.fresca, 1.0, 1.25, 20)), plain, atol=1e-4)


def test_stacked_with_another_rule_in_order(sd1):
    (model,) = gp.cfg_norm(Recorder().ctx, sd1.model, 1.0)
    (model,) = gp.epsilon_scaling(Recorder().ctx, model, 1.01)
    (model,) = gp.fresca(Recorder().ctx, model, 1.0, 1.2, 2)
    assert [type(r).__name__ for r in model.patches.guidance] == ["CFGNorm", "EpsilonScaling", "FreSca"]


# -- (d) bad input is named ------------------------------------------------------------------------

@pytest.mark.parametrize("node,args,bad", [
    (gp.epsilon_scaling, (0.4,), "scaling_factor"), (gp.epsilon_scaling, (1.6,), "scaling_factor"),
    (gp.fresca, (-0.1, 1.0, 20), "scale_low"), (gp.fresca, (1.0, 10.5, 20), "scale_high"),
    (gp.fresca, (1.0, 1.0, 0), "freq_cutoff")])
def test_out_of_range_is_refused_by_name(sd1, node, args, bad):
    with pytest.raises(NodeError) as err:
        node(Recorder().ctx, sd1.model, *args)
    assert err.value.input_name == bad


@pytest.mark.parametrize("node,args", [(gp.epsilon_scaling, (1.0,)), (gp.fresca, (1.0, 1.25, 20))])
def test_a_non_model_is_refused_naming_model(node, args):
    with pytest.raises(NodeError) as err:
        node(Recorder().ctx, "not a model", *args)
    assert err.value.input_name == "model"


# -- schema and (e) a ComfyUI API prompt ------------------------------------------------------------

def test_the_nodes_have_comfyui_s_schema():
    from engine.registry import default_registry

    registry = default_registry()
    eps = registry.get("Epsilon Scaling")
    assert eps.category == "model_patches/unet" and [o.type for o in eps.outputs] == ["MODEL"]
    factor = eps.input("scaling_factor")
    assert (factor.default, factor.min, factor.max, factor.step) == (1.005, 0.5, 1.5, 0.001)
    fresca = registry.get("FreSca")
    assert fresca.category == "_for_testing" and [o.type for o in fresca.outputs] == ["MODEL"]
    numbers = [(i.name, i.type, i.default, i.min, i.max) for i in fresca.inputs[1:]]
    assert numbers == [("scale_low", "FLOAT", 1.0, 0.0, 10.0), ("scale_high", "FLOAT", 1.25, 0.0, 10.0),
                       ("freq_cutoff", "INT", 20, 1, 10000)]


def test_a_comfyui_prompt_with_both_nodes_validates_and_runs(tiny_env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.validate import WorkflowInvalid
    from engine.workflow import parse
    from test_custom_sampling import _ksampler_prompt

    executor = Executor(default_registry(), tiny_env)
    plain = executor.run(parse(_ksampler_prompt(8)))
    assert plain.status == "succeeded", plain.error and plain.error.message
    prompt = _ksampler_prompt(8)
    prompt["30"] = {"class_type": "Epsilon Scaling", "inputs": {"model": ["4", 0], "scaling_factor": 1.3}}
    prompt["31"] = {"class_type": "FreSca", "inputs": {"model": ["30", 0], "scale_low": 1.0, "scale_high": 1.25,
                                                        "freq_cutoff": 20}}
    prompt["3"]["inputs"]["model"] = ["31", 0]
    patched = executor.run(parse(prompt))
    assert patched.status == "succeeded", patched.error and patched.error.message
    assert (patched.results["8"][0] - plain.results["8"][0]).abs().max().item() > 3e-3
    prompt["30"]["inputs"]["scaling_factor"] = 2.0
    with pytest.raises(WorkflowInvalid, match="scaling_factor"):  # ComfyUI's range, checked before running
        executor.run(parse(prompt))
