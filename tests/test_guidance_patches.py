"""ComfyUI's CFG-changing model patches and Perp-Neg (nodes/guidance_patches.py,
nodes/families/guidance_rules.py, nodes/families/perp_neg.py).

At one evaluation each patch's combination must equal its formula written out here on the
clean-latent predictions (as ComfyUI states them), from the denoiser's own cond and uncond
outputs; through KSampler each must reduce to plain CFG where its definition says so, and
change the image where it does not; APG's running state starts fresh for each run; the
nodes carry ComfyUI's schemas and refuse bad input by name.
"""
from __future__ import annotations

import math

import pytest
import tiny_models
import torch

from engine.context import NodeError
from nodes import guidance_patches as gp
from nodes.latent import empty_latent_image
from nodes.sampling import ksampler
from test_sampling import Recorder, sd1, sd2v  # noqa: F401 (fixtures)

T = 600.0  # the timestep of the one-evaluation checks


def _patched(tiny, node, *args):
    (model,) = node(Recorder().ctx, tiny.model, *args)
    return model


def _evaluate(tiny, model, cfg=7.0, z=None, denoiser=None):
    """(guided output, cond output, uncond output, model input, sigma) at timestep T, batch 2."""
    from nodes.families.denoiser import Denoiser
    from nodes.samplers.schedules import TrainingSchedule

    schedule = TrainingSchedule(model.scheduler_config)
    if z is None:
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    if denoiser is None:
        denoiser = Denoiser(tiny.parts["unet"], model.family, positive=tiny.pos, negative=tiny.neg, cfg=cfg,
                            image_size=(64, 64), batch=2, schedule=schedule,
                            prediction_type=model.prediction_type, guidance=model.patches.guidance)
    with torch.no_grad():
        out = denoiser.model_output(z, torch.tensor(T))
    return out, denoiser.last_cond, denoiser.last_uncond, z, float(schedule.sigma(T))


def _eps_x0(z, sigma, eps):
    """k-diffusion's x and an epsilon output's clean-latent prediction."""
    x = z * math.sqrt(1 + sigma ** 2)
    return x, x - sigma * eps


def _norm(t, dims=(1, 2, 3)):
    return t.pow(2).sum(dim=dims, keepdim=True).sqrt()


# -- each formula, by hand, on the clean-latent predictions -------------------------------------

def _zero_star(x, c, u, s, sigma):
    a = ((x - c) * (x - u)).sum(dim=(1, 2, 3), keepdim=True) / ((x - u).pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    return u + s * (c - u) + (a - 1) * u + s * (1 - a) * u


def _apg(eta, threshold):
    def formula(x, c, u, s, sigma):
        g = c - u
        g = g * torch.clamp(threshold / _norm(g), max=1.0)
        unit = c / _norm(c)
        along = (g * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
        new_cond = u + (g - along + eta * along) + (c - u) / s
        return u + s * (new_cond - u)
    return formula


def _cfg_norm(strength):
    def formula(x, c, u, s, sigma):
        g = u + s * (c - u)
        ratio = torch.clamp(_norm(c, (1,)) / (_norm(g, (1,)) + 1e-8), 0, 1)
        return g * ratio * strength
    return formula


def _tcfg(x, c, u, s, sigma):
    damped = []
    for xi, ci, ui in zip(x, c, u):
        rows = torch.stack([(xi - ui).flatten(), (xi - ci).flatten()]).double()
        _, vectors = torch.linalg.eigh(rows @ rows.T)  # the Gram matrix's top eigenvector gives
        lead = rows.T @ vectors[:, -1]  # the leading right-singular vector of the rows
        lead = lead / lead.norm()
        damped.append(xi - ((rows[0] @ lead) * lead).reshape(xi.shape).float())
    u = torch.stack(damped)
    return u + s * (c - u)


def _mahiro(x, c, u, s, sigma):
    g = u + s * (c - u)
    root = lambda t: t.abs().sqrt() * t.sign()  # noqa: E731
    a, b = root(u * s), root((c * s + g) / 2)
    cos = (a * b).sum(1) / (_norm(a, (1,)).squeeze(1).clamp(min=1e-8) * _norm(b, (1,)).squeeze(1).clamp(min=1e-8))
    w = 2 * (cos.mean() + 1)
    return (w * g + (4 - w) * c * s) / 4


def _renorm(trunc, renorm):
    def formula(x, c, u, s, sigma):
        if sigma >= trunc:
            return c
        g = u + s * (c - u)
        cap = renorm * _norm(c)
        return torch.where(_norm(g) >= cap, g * cap / _norm(g), g)
    return formula


CASES = {
    "CFGZeroStar": (gp.cfg_zero_star, (), _zero_star),
    "APG": (gp.apg, (0.3, 2.0, 0.0), _apg(0.3, 2.0)),
    "CFGNorm": (gp.cfg_norm, (0.8,), _cfg_norm(0.8)),
    "TCFG": (gp.tcfg, (), _tcfg),
    "Mahiro": (gp.mahiro, (), _mahiro),
    "RenormCFG": (gp.renorm_cfg, (100.0, 0.9), _renorm(100.0, 0.9)),
    "RenormCFG-truncated": (gp.renorm_cfg, (1.0, 0.9), _renorm(1.0, 0.9)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_evaluation_is_the_formula_on_clean_predictions(sd1, name):
    node, args, formula = CASES[name]
    out, cond, uncond, z, sigma = _evaluate(sd1, _patched(sd1, node, *args))
    x, c0 = _eps_x0(z, sigma, cond)
    _, u0 = _eps_x0(z, sigma, uncond)
    expected = (x - formula(x, c0, u0, 7.0, sigma)) / sigma  # back to epsilon
    assert torch.allclose(out, expected, atol=2e-4, rtol=1e-4)
    plain = uncond + 7.0 * (cond - uncond)
    assert (out - plain).abs().max() > 1e-3  # the patch did something at this evaluation


def test_on_v_prediction_the_rule_sees_the_same_clean_predictions(sd2v):
    out, cond, uncond, z, sigma = _evaluate(sd2v, _patched(sd2v, gp.cfg_zero_star))
    scale = math.sqrt(1 + sigma ** 2)
    to_x0 = lambda v: (z - sigma * v) / scale  # noqa: E731
    x = z * scale
    guided = _zero_star(x, to_x0(cond), to_x0(uncond), 7.0, sigma)
    assert torch.allclose(out, (z - guided * scale) / sigma, atol=2e-4, rtol=1e-4)


def test_flow_outputs_convert_through_the_flow_state():
    from nodes.families.guidance_rules import Parametrisation

    z, v = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    space = Parametrisation("flow", z, 0.7)
    assert torch.equal(space.x, z)  # a flow model sees its state unscaled
    assert torch.allclose(space.to_x0(v), z - 0.7 * v)
    assert torch.allclose(space.from_x0(space.to_x0(v)), v, atol=1e-6)


def test_at_cfg_1_rules_see_an_unconditional_of_zeros(sd1):
    out, cond, _, z, sigma = _evaluate(sd1, _patched(sd1, gp.cfg_norm, 0.5), cfg=1.0)
    x, c0 = _eps_x0(z, sigma, cond)
    assert torch.allclose(out, (x - 0.5 * c0) / sigma, atol=2e-4)  # ComfyUI: cond * |c|/|c| * strength


def test_apg_momentum_runs_across_steps_and_each_run_starts_fresh(sd1):
    model = _patched(sd1, gp.apg, 1.0, 0.0, 0.5)
    first, cond, uncond, z, sigma = _evaluate(sd1, model)
    again, *_ = _evaluate(sd1, model)
    assert torch.equal(first, again)  # a new run: no momentum carried over
    # one run, two evaluations at the same sigma: the second guidance is 0.5 * g + g
    from nodes.families.denoiser import Denoiser
    from nodes.samplers.schedules import TrainingSchedule

    den = Denoiser(sd1.parts["unet"], model.family, positive=sd1.pos, negative=sd1.neg, cfg=7.0, image_size=(64, 64),
                   batch=2, schedule=TrainingSchedule(model.scheduler_config), guidance=model.patches.guidance)
    _evaluate(sd1, model, denoiser=den)
    second, *_ = _evaluate(sd1, model, denoiser=den)
    x, c0 = _eps_x0(z, sigma, cond)
    _, u0 = _eps_x0(z, sigma, uncond)
    g = 1.5 * (c0 - u0)
    expected_x0 = u0 + 7.0 * g + (c0 - u0)
    assert torch.allclose(second, (x - expected_x0) / sigma, atol=2e-4, rtol=1e-4)


# -- through KSampler ---------------------------------------------------------------------------

def _txt2img(tiny, model, cfg=6.0, negative=None, steps=4):
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, 5, steps, cfg, "euler", "normal", tiny.pos,
                    tiny.neg if negative is None else negative, empty)
    return out["samples"]


def test_apg_with_eta_1_and_no_cap_or_momentum_is_cfg_one_higher(sd1):
    patched = _txt2img(sd1, _patched(sd1, gp.apg, 1.0, 0.0, 0.0), cfg=5.0)
    assert torch.allclose(patched, _txt2img(sd1, sd1.model, cfg=6.0), atol=1e-4)


def test_renorm_cfg_uncapped_is_plain_cfg(sd1):
    assert torch.allclose(_txt2img(sd1, _patched(sd1, gp.renorm_cfg, 100.0, 0.0)), _txt2img(sd1, sd1.model), atol=1e-4)


@pytest.mark.parametrize("name", ["CFGZeroStar", "CFGNorm", "TCFG", "Mahiro"])
def test_with_the_same_prompt_on_both_sides_it_is_plain_cfg(sd1, name):
    node, args, _ = CASES[name]
    args = (1.0,) if name == "CFGNorm" else args
    same = _txt2img(sd1, _patched(sd1, node, *args), negative=sd1.pos)
    assert torch.allclose(same, _txt2img(sd1, sd1.model, negative=sd1.pos), atol=1e-3)


@pytest.mark.parametrize("name", list(CASES)[:-1])
def test_through_ksampler_it_changes_the_image(sd1, name):
    node, args, _ = CASES[name]
    model = _patched(sd1, node, *args)
    assert (_txt2img(sd1, model) - _txt2img(sd1, sd1.model)).abs().max() > 1e-2
    assert sd1.model.patches.guidance == ()  # the handle it was given samples as before


def test_two_identical_apg_runs_give_equal_bytes(sd1):
    model = _patched(sd1, gp.apg, 0.5, 3.0, 0.6)
    first, second = _txt2img(sd1, model), _txt2img(sd1, model)
    assert first.numpy().tobytes() == second.numpy().tobytes()


def test_rules_stack_in_order_and_renorm_and_rescale_replace_each_other(sd1):
    from nodes.model_patches import rescale_cfg

    (model,) = gp.cfg_zero_star(Recorder().ctx, sd1.model)
    (model,) = gp.apg(Recorder().ctx, model, 0.5, 2.0, 0.0)
    assert [type(r).__name__ for r in model.patches.guidance] == ["CFGZeroStar", "APG"]
    (rescaled,) = rescale_cfg(Recorder().ctx, model, 0.7)
    (renormed,) = gp.renorm_cfg(Recorder().ctx, rescaled, 100.0, 1.0)
    assert renormed.patches.cfg_rescale == 0.0 and type(renormed.patches.guidance[-1]).__name__ == "RenormCFG"
    (back,) = rescale_cfg(Recorder().ctx, renormed, 0.7)
    assert back.patches.cfg_rescale == 0.7 and "RenormCFG" not in [type(r).__name__ for r in back.patches.guidance]


def test_a_flow_model_takes_cfg_zero_star_in_flow_space():
    """On the tiny FLUX at cfg 2: the rule changes the run, and with the same prompt on both
    sides (alpha 1) it is plain CFG, so the flow conversions round-trip inside a real run."""
    from test_flux import _embeds, _model

    embeds, pooled = _embeds("dev")
    positive = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[embeds * 0.5, {"pooled_output": pooled, "guidance": 1.0}]]
    plain_model = _model("dev")
    (model,) = gp.cfg_zero_star(Recorder().ctx, plain_model)
    assert type(model.patches.guidance[0]).__name__ == "CFGZeroStar"

    def run(m, neg):
        (out,) = ksampler(Recorder().ctx, m, 5, 3, 2.0, "euler", "normal", positive, neg,
                          {"samples": torch.zeros(1, 16, 8, 8)})
        return out["samples"]

    assert (run(model, negative) - run(plain_model, negative)).abs().max() > 1e-2
    assert torch.allclose(run(model, positive), run(plain_model, positive), atol=1e-4)


@pytest.mark.parametrize("node,args,bad", [
    (gp.apg, (11.0, 5.0, 0.0), "eta"), (gp.apg, (1.0, -1.0, 0.0), "norm_threshold"),
    (gp.apg, (1.0, 5.0, 1.5), "momentum"), (gp.cfg_norm, (101.0,), "strength"),
    (gp.renorm_cfg, (101.0, 1.0), "cfg_trunc"), (gp.renorm_cfg, (100.0, -0.1), "renorm_cfg")])
def test_a_value_out_of_range_is_refused_by_name(sd1, node, args, bad):
    with pytest.raises(NodeError) as err:
        node(Recorder().ctx, sd1.model, *args)
    assert err.value.input_name == bad


@pytest.mark.parametrize("node,args", [(gp.cfg_zero_star, ()), (gp.apg, (1.0, 5.0, 0.0)), (gp.cfg_norm, (1.0,)),
                                       (gp.tcfg, ()), (gp.mahiro, ()), (gp.renorm_cfg, (100.0, 1.0))])
def test_a_non_model_is_refused_naming_model(node, args):
    with pytest.raises(NodeError) as err:
        node(Recorder().ctx, "not a model", *args)
    assert err.value.input_name == "model"


# -- PerpNegGuider --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def empty(sd1):
    """A third prompt standing in for the empty one, encoded as the fixture's two are."""
    return tiny_models.encoded_prompts("sd1", "", "a blue car on a wet road")[0]


def _guided_run(tiny, guider, seed=4, steps=4):
    from nodes import custom_sampling as cs

    ctx = Recorder().ctx
    sigmas, = cs.basic_scheduler(ctx, tiny.model, "normal", steps, 1.0)
    out, _ = cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, seed)[0], guider, cs.ksampler_select(ctx, "euler")[0],
                                        sigmas, {"samples": torch.zeros_like(tiny.init)})
    return out["samples"]


def test_perp_neg_one_evaluation_is_its_formula(sd1, empty):
    from nodes.samplers.schedules import TrainingSchedule

    (guider,) = gp.perp_neg_guider(Recorder().ctx, sd1.model, sd1.pos, sd1.neg, empty, 5.0, 0.7)
    schedule = TrainingSchedule(sd1.model.scheduler_config)
    den = guider.dual.denoiser(sd1.parts["unet"], sd1.model.family, positive=sd1.pos, negative=sd1.neg, cfg=5.0,
                               image_size=(64, 64), batch=2, schedule=schedule)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = den.model_output(z, torch.tensor(T))
    sigma = float(schedule.sigma(T))
    x, pos = _eps_x0(z, sigma, den.pair.last_cond)
    _, neg = _eps_x0(z, sigma, den.pair.last_uncond)
    _, nothing = _eps_x0(z, sigma, den.empty.model_output(z, torch.tensor(T)))
    p, n = pos - nothing, neg - nothing
    perp = n - (n * p).sum() / p.norm() ** 2 * p  # over the whole batch, as ComfyUI
    expected = nothing + 5.0 * (p - 0.7 * perp)
    assert torch.allclose(out, (x - expected) / sigma, atol=2e-4, rtol=1e-4)


def test_perp_neg_with_the_empty_prompt_as_negative_is_cfg_from_the_empty_prompt(sd1, empty):
    from nodes import custom_sampling as cs

    (perp,) = gp.perp_neg_guider(Recorder().ctx, sd1.model, sd1.pos, empty, empty, 5.0, 1.0)
    (plain,) = cs.cfg_guider(Recorder().ctx, sd1.model, sd1.pos, empty, 5.0)
    assert torch.allclose(_guided_run(sd1, perp), _guided_run(sd1, plain), atol=1e-3)
    (unscaled,) = gp.perp_neg_guider(Recorder().ctx, sd1.model, sd1.pos, sd1.neg, empty, 5.0, 0.0)
    assert torch.allclose(_guided_run(sd1, unscaled), _guided_run(sd1, plain), atol=1e-3)  # neg_scale 0: same


def test_perp_neg_changes_the_image_and_takes_the_models_rules(sd1, empty):
    from nodes import custom_sampling as cs

    (perp,) = gp.perp_neg_guider(Recorder().ctx, sd1.model, sd1.pos, sd1.neg, empty, 5.0, 1.0)
    (plain,) = cs.cfg_guider(Recorder().ctx, sd1.model, sd1.pos, sd1.neg, 5.0)
    ours = _guided_run(sd1, perp)
    assert (ours - _guided_run(sd1, plain)).abs().max() > 0.5
    (with_norm,) = gp.perp_neg_guider(Recorder().ctx, _patched(sd1, gp.cfg_norm, 0.5), sd1.pos, sd1.neg, empty,
                                      5.0, 1.0)
    assert (_guided_run(sd1, with_norm) - ours).abs().max() > 0.5  # CFGNorm's post stage ran on the result


@pytest.mark.parametrize("change,bad", [({"model": "not a model"}, "model"), ({"cfg": 101.0}, "cfg"),
                                        ({"neg_scale": -1.0}, "neg_scale"),
                                        ({"empty_conditioning": "text"}, "empty_conditioning")])
def test_perp_neg_bad_input_is_named(sd1, empty, change, bad):
    args = dict(model=sd1.model, positive=sd1.pos, negative=sd1.neg, empty_conditioning=empty, cfg=5.0,
                neg_scale=1.0)
    args.update(change)
    with pytest.raises(NodeError) as err:
        gp.perp_neg_guider(Recorder().ctx, **args)
    assert err.value.input_name == bad


# -- PerpNeg, the deprecated MODEL patch ----------------------------------------------------------

def test_perp_neg_patch_through_ksampler_equals_the_guider(sd1, empty):
    (patched,) = gp.perp_neg(Recorder().ctx, sd1.model, empty, 0.8)
    (guider,) = gp.perp_neg_guider(Recorder().ctx, sd1.model, sd1.pos, sd1.neg, empty, 5.0, 0.8)
    rec = Recorder()
    (out,) = ksampler(rec.ctx, patched, 4, 4, 5.0, "euler", "normal", sd1.pos, sd1.neg,
                      {"samples": torch.zeros_like(sd1.init)})
    assert torch.allclose(out["samples"], _guided_run(sd1, guider), atol=1e-3)
    assert (out["samples"] - _txt2img_at(sd1, sd1.model, 5.0)).abs().max() > 0.5  # not plain CFG
    assert sd1.model.patches.perp_neg is None  # the handle it was given samples as before


def _txt2img_at(tiny, model, cfg):
    (out,) = ksampler(Recorder().ctx, model, 4, 4, cfg, "euler", "normal", tiny.pos, tiny.neg,
                      {"samples": torch.zeros_like(tiny.init)})
    return out["samples"]


def test_perp_neg_patch_at_cfg_1_sees_a_negative_of_zeros(sd1, empty):
    from nodes.samplers.schedules import TrainingSchedule

    (patched,) = gp.perp_neg(Recorder().ctx, sd1.model, empty, 0.8)
    schedule = TrainingSchedule(sd1.model.scheduler_config)
    den = patched.patches.perp_neg.denoiser(sd1.parts["unet"], sd1.model.family, positive=sd1.pos, negative=sd1.neg,
                                            cfg=1.0, image_size=(64, 64), batch=2, schedule=schedule)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = den.model_output(z, torch.tensor(T))
        sigma = float(schedule.sigma(T))
        x, pos = _eps_x0(z, sigma, den.pair.last_cond)
        _, nothing = _eps_x0(z, sigma, den.empty.model_output(z, torch.tensor(T)))
    p, n = pos - nothing, -nothing  # ComfyUI's unevaluated negative is 0
    expected = nothing + (p - 0.8 * (n - (n * p).sum() / p.norm() ** 2 * p))
    assert torch.allclose(out, (x - expected) / sigma, atol=2e-4, rtol=1e-4)


def test_perp_neg_patch_and_the_other_cfg_functions_replace_each_other(sd1, empty):
    from nodes.model_patches import rescale_cfg

    (model,) = gp.renorm_cfg(Recorder().ctx, sd1.model, 100.0, 1.0)
    (model,) = gp.perp_neg(Recorder().ctx, model, empty, 1.0)
    assert model.patches.perp_neg is not None and model.patches.guidance == ()
    (rescaled,) = rescale_cfg(Recorder().ctx, model, 0.5)
    assert rescaled.patches.perp_neg is None
    (renormed,) = gp.renorm_cfg(Recorder().ctx, model, 100.0, 1.0)
    assert renormed.patches.perp_neg is None


@pytest.mark.parametrize("args,bad", [(("not a model", "E", 1.0), "model"), ((None, "text", 1.0), "empty_conditioning"),
                                      ((None, "E", 100.5), "neg_scale")])
def test_perp_neg_patch_bad_input_is_named(sd1, empty, args, bad):
    model, cond, scale = args
    with pytest.raises(NodeError) as err:
        gp.perp_neg(Recorder().ctx, sd1.model if model is None else model, empty if cond == "E" else cond, scale)
    assert err.value.input_name == bad


# -- the nodes, as ComfyUI declares them and as a ComfyUI workflow uses them ----------------------

SCHEMAS = {  # node: (category, [(input, default, min, max)], output type)
    "CFGZeroStar": ("advanced/guidance", [], "MODEL"),
    "APG": ("sampling/custom_sampling", [("eta", 1.0, -10.0, 10.0), ("norm_threshold", 5.0, 0.0, 50.0),
                                         ("momentum", 0.0, -5.0, 1.0)], "MODEL"),
    "CFGNorm": ("advanced/guidance", [("strength", 1.0, 0.0, 100.0)], "MODEL"),
    "TCFG": ("advanced/guidance", [], "MODEL"),
    "Mahiro": ("_for_testing", [], "MODEL"),
    "RenormCFG": ("advanced/model", [("cfg_trunc", 100.0, 0.0, 100.0), ("renorm_cfg", 1.0, 0.0, 100.0)], "MODEL"),
    "PerpNegGuider": ("_for_testing", [("cfg", 8.0, 0.0, 100.0), ("neg_scale", 1.0, 0.0, 100.0)], "GUIDER"),
    "PerpNeg": ("_for_testing", [("neg_scale", 1.0, 0.0, 100.0)], "MODEL"),
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_the_node_has_comfyui_s_schema(name):
    from engine.registry import default_registry

    category, numbers, output = SCHEMAS[name]
    spec = default_registry().get(name)
    assert spec is not None and spec.category == category
    assert spec.inputs[0].name == "model"
    for input_name, default, low, high in numbers:
        i = spec.input(input_name)
        assert (i.default, i.min, i.max) == (default, low, high)
    assert [o.type for o in spec.outputs] == [output]


def test_a_comfyui_workflow_with_apg_and_perp_neg_guider_runs(tiny_env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse
    from test_custom_sampling import _api_prompt

    executor = Executor(default_registry(), tiny_env)
    plain = executor.run(parse(_api_prompt(8)))  # CFGGuider at cfg 7
    prompt = _api_prompt(8)
    prompt["30"] = {"class_type": "APG", "inputs": {"model": ["4", 0], "eta": 1.0, "norm_threshold": 0.0,
                                                    "momentum": 0.0}}
    prompt["22"]["inputs"].update(model=["30", 0], cfg=6.0)  # APG at eta 1, uncapped: CFG one higher
    apg = executor.run(parse(prompt))
    assert apg.status == "succeeded", apg.error and apg.error.message
    assert (apg.results["8"][0] - plain.results["8"][0]).abs().max().item() < 1e-3
    prompt["31"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}}
    prompt["22"] = {"class_type": "PerpNegGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "empty_conditioning": ["31", 0],
        "cfg": 7.0, "neg_scale": 1.0}}
    perp = executor.run(parse(prompt))
    assert perp.status == "succeeded", perp.error and perp.error.message
    # 0.008 apart in pixels here (the tiny VAE squeezes latents that differ by more than 1)
    assert (perp.results["8"][0] - plain.results["8"][0]).abs().max().item() > 3e-3


def test_a_prompt_of_the_wrong_width_as_empty_conditioning_is_named_at_sampling(sd1):
    wide = [[torch.zeros(1, 77, sd1.pos[0][0].shape[-1] + 8), {}]]
    (guider,) = gp.perp_neg_guider(Recorder().ctx, sd1.model, sd1.pos, sd1.neg, wide, 5.0, 1.0)
    with pytest.raises(NodeError) as err:
        _guided_run(sd1, guider, steps=1)
    assert err.value.input_name == "empty_conditioning"


# -- a cross-job batch: each job's images guided as in its own run ---------------------------------

@pytest.mark.parametrize("kind", ["Mahiro", "PerpNeg"])
def test_in_a_cross_job_batch_each_job_is_guided_as_alone(sd1, empty, kind):
    """Mahiro's similarity and Perp-Neg's projection are batch-wide: batched with another job's
    prompt, a job must still get exactly what its single run gets."""
    from nodes.families.conditioning import PerJob
    from nodes.families.denoiser import Denoiser
    from nodes.families.perp_neg import PerpNeg
    from nodes.samplers.schedules import TrainingSchedule

    schedule = TrainingSchedule(sd1.model.scheduler_config)
    guidance = _patched(sd1, gp.mahiro).patches.guidance if kind == "Mahiro" else ()
    make = Denoiser if kind == "Mahiro" else PerpNeg(empty, 0.9).denoiser

    def output(positive, negative, z):
        den = make(sd1.parts["unet"], sd1.model.family, positive=positive, negative=negative, cfg=6.0,
                   image_size=(64, 64), batch=z.shape[0], schedule=schedule, guidance=guidance)
        with torch.no_grad():
            return den.model_output(z, torch.tensor(T))

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    other = tiny_models.encoded_prompts("sd1", "a blue car on a wet road", "blurry")[0]
    both = output(PerJob([sd1.pos[0], other[0]]), PerJob([sd1.neg[0], sd1.neg[0]]), z)
    alone = torch.cat([output([sd1.pos[0]], [sd1.neg[0]], z[:1]), output([other[0]], [sd1.neg[0]], z[1:])])
    assert torch.allclose(both, alone, atol=1e-4)
