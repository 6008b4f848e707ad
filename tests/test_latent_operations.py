"""ComfyUI's latent operations (nodes/latent_operations.py) and LatentApplyOperationCFG
(nodes/guidance_patches.py, rule in nodes/families/guidance_rules.py).

Each operation must equal its formula written out here (ComfyUI's steps: mirror-pad, convolve
with the zero padding, crop; Reinhard on the channel lengths); applied to guidance it must
rebuild the conditional side from the operated difference; Sharpen at alpha 0 gives the
unpatched bytes; bad input is named; a ComfyUI API prompt with the nodes validates and runs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.context import NodeError
from nodes import guidance_patches as gp
from nodes import latent_operations as lo
from nodes.sampling import ksampler
from test_guidance_patches import _eps_x0, _evaluate
from test_sampling import Recorder, sd1  # noqa: F401 (fixtures)


def _latent(h=16, w=16, seed=2):
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(seed)) * 2


def _op(node, *args):
    (operation,) = node(Recorder().ctx, *args)
    return operation


def _sharpen_by_hand(latent, radius, sigma, alpha):
    size = 2 * radius + 1
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    g = torch.exp(-(xs ** 2 + ys ** 2) / (2 * sigma ** 2))
    kernel = g / g.sum() * (-10 * alpha)
    kernel[radius, radius] = kernel[radius, radius] - kernel.sum() + 1.0
    lum = latent.norm(dim=1, keepdim=True) + 1e-6
    padded = F.pad(latent / lum, (radius,) * 4, mode="reflect")
    c = latent.shape[1]
    out = F.conv2d(padded, kernel.repeat(c, 1, 1).unsqueeze(1), padding=radius, groups=c)
    return lum * out[:, :, radius:-radius, radius:-radius]


def _reinhard_by_hand(latent, multiplier):
    m = latent.norm(dim=1, keepdim=True) + 1e-10
    top = (m.std(dim=(1, 2, 3), keepdim=True) * 5 + m.mean(dim=(1, 2, 3), keepdim=True)) * multiplier
    scaled = m / top
    return latent / m * (scaled / (scaled + 1) * top)


# -- (a) the formulas -------------------------------------------------------------------------------

def test_sharpen_is_comfyui_s_steps():
    latent = _latent()
    ours = _op(lo.latent_operation_sharpen, 3, 1.5, 0.4)(latent)
    assert torch.allclose(ours, _sharpen_by_hand(latent, 3, 1.5, 0.4), atol=1e-5)
    assert (ours - latent).abs().max() > 0.1
    flat = torch.ones(1, 4, 12, 12) * 0.5  # the kernel sums to 1: a constant latent is unchanged
    assert torch.allclose(_op(lo.latent_operation_sharpen, 3, 1.5, 0.4)(flat), flat, atol=1e-5)


def test_sharpen_on_a_latent_no_larger_than_the_radius_clamps_its_edges():
    """ComfyUI cannot mirror an 8x8 latent by 9 cells and fails; Kiln clamps the edges there."""
    latent = _latent(8, 8)
    out = _op(lo.latent_operation_sharpen, 9, 1.0, 0.1)(latent)
    assert out.shape == latent.shape and torch.isfinite(out).all() and (out - latent).abs().max() > 1e-3


def test_tonemap_reinhard_is_the_tone_curve_on_channel_lengths():
    latent = _latent()
    for multiplier in (0.3, 1.0, 4.0):
        ours = _op(lo.latent_operation_tonemap_reinhard, multiplier)(latent)
        assert torch.allclose(ours, _reinhard_by_hand(latent, multiplier), atol=1e-5, rtol=1e-5)
    gentle = _op(lo.latent_operation_tonemap_reinhard, 100.0)(latent)  # a high ceiling: nearly untouched
    assert torch.allclose(gentle, latent, rtol=2e-2, atol=1e-3) and not torch.equal(gentle, latent)
    assert torch.equal(_op(lo.latent_operation_tonemap_reinhard, 0.0)(latent), torch.zeros_like(latent))


def test_apply_operation_runs_it_on_the_samples_and_keeps_the_rest():
    latent = {"samples": _latent(), "batch_index": [3, 4], "noise_mask": torch.ones(1, 1, 16, 16)}
    operation = _op(lo.latent_operation_tonemap_reinhard, 0.5)
    (out,) = lo.latent_apply_operation(Recorder().ctx, latent, operation)
    assert torch.equal(out["samples"], operation(latent["samples"]))
    assert out["batch_index"] == [3, 4] and out["noise_mask"] is latent["noise_mask"]
    assert latent["samples"] is not out["samples"]


def test_apply_operation_cfg_rebuilds_the_conditional_side(sd1):
    operation = _op(lo.latent_operation_tonemap_reinhard, 0.5)
    (model,) = gp.latent_apply_operation_cfg(Recorder().ctx, sd1.model, operation)
    out, cond, uncond, z, sigma = _evaluate(sd1, model)
    x, c0 = _eps_x0(z, sigma, cond)
    _, u0 = _eps_x0(z, sigma, uncond)
    expected_x0 = u0 + 7.0 * _reinhard_by_hand(c0 - u0, 0.5)
    assert torch.allclose(out, (x - expected_x0) / sigma, atol=2e-4, rtol=1e-4)
    assert (out - (uncond + 7.0 * (cond - uncond))).abs().max() > 1e-2


def test_apply_operation_cfg_at_cfg_1_operates_on_the_conditional_prediction(sd1):
    """ComfyUI's unevaluated negative is zeros, so the operation sees the prediction itself."""
    operation = _op(lo.latent_operation_tonemap_reinhard, 0.5)
    (model,) = gp.latent_apply_operation_cfg(Recorder().ctx, sd1.model, operation)
    out, cond, _, z, sigma = _evaluate(sd1, model, cfg=1.0)
    x, c0 = _eps_x0(z, sigma, cond)
    assert torch.allclose(out, (x - _reinhard_by_hand(c0, 0.5)) / sigma, atol=2e-4, rtol=1e-4)


# -- (b) identity and (c) not vacuous ------------------------------------------------------------

def _txt2img(tiny, model):
    (out,) = ksampler(Recorder().ctx, model, 5, 4, 6.0, "euler", "normal", tiny.pos, tiny.neg,
                      {"samples": torch.zeros_like(tiny.init)})
    return out["samples"]


def test_sharpen_at_alpha_0_gives_the_same_bytes():
    latent = {"samples": _latent()}
    (out,) = lo.latent_apply_operation(Recorder().ctx, latent, _op(lo.latent_operation_sharpen, 9, 1.0, 0.0))
    assert out["samples"].numpy().tobytes() == latent["samples"].numpy().tobytes()


def test_through_ksampler_identity_is_bytes_and_the_operations_change_the_image(sd1):
    plain = _txt2img(sd1, sd1.model)
    (same,) = gp.latent_apply_operation_cfg(Recorder().ctx, sd1.model, _op(lo.latent_operation_sharpen, 1, 1.0, 0.0))
    assert _txt2img(sd1, same).numpy().tobytes() == plain.numpy().tobytes()
    for operation in (_op(lo.latent_operation_sharpen, 1, 1.0, 0.5), _op(lo.latent_operation_tonemap_reinhard, 0.5)):
        (model,) = gp.latent_apply_operation_cfg(Recorder().ctx, sd1.model, operation)
        assert (_txt2img(sd1, model) - plain).abs().max() > 1e-2
    assert sd1.model.patches.guidance == ()


# -- (d) bad input is named -------------------------------------------------------------------------

@pytest.mark.parametrize("node,args,bad", [
    (lo.latent_operation_sharpen, (0, 1.0, 0.1), "sharpen_radius"), (lo.latent_operation_sharpen, (32, 1.0, 0.1),
                                                                      "sharpen_radius"),
    (lo.latent_operation_sharpen, (9, 0.05, 0.1), "sigma"), (lo.latent_operation_sharpen, (9, 1.0, 5.5), "alpha"),
    (lo.latent_operation_sharpen, ("wide", 1.0, 0.1), "sharpen_radius"),
    (lo.latent_operation_tonemap_reinhard, (-1.0,), "multiplier"),
    (lo.latent_operation_tonemap_reinhard, (100.5,), "multiplier")])
def test_operation_settings_out_of_range_are_named(node, args, bad):
    with pytest.raises(NodeError) as err:
        node(Recorder().ctx, *args)
    assert err.value.input_name == bad


def test_apply_nodes_name_what_is_wrong(sd1):
    sharpen = _op(lo.latent_operation_sharpen, 1, 1.0, 0.1)
    cases = [(lambda: lo.latent_apply_operation(Recorder().ctx, {"samples": _latent()}, "sharpen"), "operation"),
             (lambda: lo.latent_apply_operation(Recorder().ctx, _latent(), sharpen), "samples"),
             (lambda: lo.latent_apply_operation(Recorder().ctx, {"samples": torch.zeros(4, 8, 8)}, sharpen), "samples"),
             (lambda: gp.latent_apply_operation_cfg(Recorder().ctx, "model", sharpen), "model"),
             (lambda: gp.latent_apply_operation_cfg(Recorder().ctx, sd1.model, len), "operation")]
    for call, bad in cases:
        with pytest.raises(NodeError) as err:
            call()
        assert err.value.input_name == bad


# -- schema and (e) a ComfyUI API prompt -------------------------------------------------------------

def test_the_nodes_have_comfyui_s_schema():
    from engine.registry import default_registry

    registry = default_registry()
    expected = {  # node: (inputs as (name, type, default, min, max), outputs)
        "LatentApplyOperation": ([("samples", "LATENT"), ("operation", "LATENT_OPERATION")], ["LATENT"]),
        "LatentApplyOperationCFG": ([("model", "MODEL"), ("operation", "LATENT_OPERATION")], ["MODEL"]),
        "LatentOperationSharpen": ([("sharpen_radius", "INT", 9, 1, 31), ("sigma", "FLOAT", 1.0, 0.1, 10.0),
                                    ("alpha", "FLOAT", 0.1, 0.0, 5.0)], ["LATENT_OPERATION"]),
        "LatentOperationTonemapReinhard": ([("multiplier", "FLOAT", 1.0, 0.0, 100.0)], ["LATENT_OPERATION"]),
    }
    for name, (inputs, outputs) in expected.items():
        spec = registry.get(name)
        assert spec.category == "latent/advanced/operations", name
        got = [(i.name, i.type, i.default, i.min, i.max)[:len(want)] for i, want in zip(spec.inputs, inputs)]
        assert got == inputs and len(spec.inputs) == len(inputs), name
        assert [o.type for o in spec.outputs] == outputs, name
        assert registry.get(name).object_info(None)["output"] == outputs


def test_a_comfyui_prompt_with_the_operations_validates_and_runs(tiny_env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.validate import WorkflowInvalid
    from engine.workflow import parse
    from test_custom_sampling import _ksampler_prompt

    executor = Executor(default_registry(), tiny_env)
    plain = executor.run(parse(_ksampler_prompt(8)))
    prompt = _ksampler_prompt(8)
    prompt["40"] = {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 0.5}}
    prompt["41"] = {"class_type": "LatentApplyOperationCFG", "inputs": {"model": ["4", 0], "operation": ["40", 0]}}
    prompt["42"] = {"class_type": "LatentOperationSharpen", "inputs": {"sharpen_radius": 9, "sigma": 1.0,
                                                                       "alpha": 0.1}}
    prompt["43"] = {"class_type": "LatentApplyOperation", "inputs": {"samples": ["3", 0], "operation": ["42", 0]}}
    prompt["3"]["inputs"]["model"] = ["41", 0]
    prompt["8"]["inputs"]["samples"] = ["43", 0]
    run = executor.run(parse(prompt))
    assert run.status == "succeeded", run.error and run.error.message
    assert (run.results["8"][0] - plain.results["8"][0]).abs().max().item() > 3e-3
    prompt["43"]["inputs"]["operation"] = ["4", 0]  # a MODEL where an operation goes
    with pytest.raises(WorkflowInvalid, match="operation"):
        executor.run(parse(prompt))
