"""DualCFGGuider (nodes/custom_sampling.py, nodes/families/dual_cfg.py) on the tiny SD1 and FLUX.

The claims: with N, M, P the predictions for negative, cond2 and cond1, one evaluation is
N + s2 (M - N) + s1 (P - M) (regular) or N + s2 ((M + s1 (P - M)) - N) (nested), checked
against three single-prompt denoisers; whole runs reduce to CFGGuider where the formulas
say they must (cond2 = negative, cond2 = cond1), and differ from every such reduction
with three different prompts; the unguided prediction CFG++ steps with is the negative's;
RescaleCFG and PAG act on the pair ComfyUI applies them to; cond1's ControlNet is shared
as ComfyUI shares a positive prompt's; bad input names the node's input.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models
from engine.context import NodeError
from nodes import custom_sampling as cs
from test_sampling import Recorder, sd1  # noqa: F401 (sd1 is a fixture)

S1, S2 = 3.0, 2.0  # cfg_conds, cfg_cond2_negative
#: Latents (up to about 70 in size on the random tiny SD1): the dual run makes its network calls in
#: other batch shapes than CFGGuider's, which moves the result by about 1e-6 of its size.
TOL = 1e-3
#: Results that must differ do so by 2 or more here.
APART = 0.5


@pytest.fixture(scope="module")
def third(sd1):
    """A third prompt for the tiny SD1, encoded as the fixture's two are."""
    return tiny_models.encoded_prompts("sd1", "a blue car on a wet road", "blurry")[0]


def _run(tiny, guider, *, seed: int = 4, steps: int = 4, sampler: str = "euler", model=None) -> torch.Tensor:
    ctx = Recorder().ctx
    sigmas, = cs.basic_scheduler(ctx, model or tiny.model, "normal", steps, 1.0)
    out, _ = cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, seed)[0], guider, cs.ksampler_select(ctx, sampler)[0],
                                        sigmas, {"samples": torch.zeros_like(tiny.init)})
    return out["samples"]


def _cfg(tiny, positive, negative, cfg, **kw) -> torch.Tensor:
    return _run(tiny, cs.cfg_guider(Recorder().ctx, kw.get("model") or tiny.model, positive, negative, cfg)[0], **kw)


def _dual(tiny, cond1, cond2, negative, style, s1=S1, s2=S2, **kw) -> torch.Tensor:
    guider, = cs.dual_cfg_guider(Recorder().ctx, kw.get("model") or tiny.model, cond1, cond2, negative, s1, s2, style)
    return _run(tiny, guider, **kw)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- whole runs against CFGGuider ---------------------------------------------------------------

def test_regular_reduces_to_cfg_guider(sd1):
    # cond2 = negative: N + s2 (N - N) + s1 (P - N) is CFG at cfg_conds
    assert _gap(_dual(sd1, sd1.pos, sd1.neg, sd1.neg, "regular"), _cfg(sd1, sd1.pos, sd1.neg, S1)) < TOL
    # cond2 = cond1: N + s2 (P - N) + s1 (P - P) is CFG at cfg_cond2_negative
    assert _gap(_dual(sd1, sd1.pos, sd1.pos, sd1.neg, "regular"), _cfg(sd1, sd1.pos, sd1.neg, S2)) < TOL


def test_nested_reduces_to_cfg_guider(sd1):
    # cond2 = negative: N + s2 ((N + s1 (P - N)) - N) is CFG at the product of the scales
    assert _gap(_dual(sd1, sd1.pos, sd1.neg, sd1.neg, "nested"), _cfg(sd1, sd1.pos, sd1.neg, S1 * S2)) < TOL
    # cond2 = cond1: CFG at cfg_cond2_negative
    assert _gap(_dual(sd1, sd1.pos, sd1.pos, sd1.neg, "nested"), _cfg(sd1, sd1.pos, sd1.neg, S2)) < TOL


def test_three_prompts_differ_from_every_reduction(sd1, third):
    references = [_cfg(sd1, sd1.pos, sd1.neg, s) for s in (S1, S2, S1 * S2)] + [_cfg(sd1, third, sd1.neg, S2)]
    regular = _dual(sd1, sd1.pos, third, sd1.neg, "regular")
    nested = _dual(sd1, sd1.pos, third, sd1.neg, "nested")
    for result in (regular, nested):
        assert all(_gap(result, ref) > APART for ref in references)
    assert _gap(regular, nested) > APART  # the style matters


def test_cfg_pp_steps_with_the_negative_prediction(sd1):
    """CFG++ samplers step with Denoiser.last_uncond: the negative's in both styles, so the
    reductions hold for them too (nested with cond2 = cond1 would not if it were cond2's)."""
    ref = _cfg(sd1, sd1.pos, sd1.neg, 1.5, sampler="euler_cfg_pp")
    assert _gap(_dual(sd1, sd1.pos, sd1.pos, sd1.neg, "nested", s1=3.0, s2=1.5, sampler="euler_cfg_pp"), ref) < TOL
    assert _gap(_dual(sd1, sd1.pos, sd1.neg, sd1.neg, "regular", s1=1.5, s2=3.0, sampler="euler_cfg_pp"), ref) < TOL
    assert _gap(_cfg(sd1, sd1.pos, sd1.neg, 1.5), ref) > APART  # CFG++ is not plain Euler here


# -- one evaluation against the formulas --------------------------------------------------------

def _evaluate(tiny):
    """(network-output function of a Denoiser or dual denoiser, the input, t) at one fixed point."""
    from nodes.families.denoiser import Denoiser
    from nodes.samplers.schedules import TrainingSchedule

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(500.0)
    common = dict(image_size=(64, 64), batch=1, schedule=TrainingSchedule(tiny.model.scheduler_config))

    def single(cond, **patches):
        d = Denoiser(tiny.parts["unet"], tiny.model.family, positive=cond, negative=None, cfg=1.0, **common, **patches)
        with torch.no_grad():
            return d.model_output(z, t)

    def made(maker, **args):
        d = maker(tiny.parts["unet"], tiny.model.family, **args, **common)
        with torch.no_grad():
            return d, d.model_output(z, t)

    return single, made


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_one_evaluation_follows_the_formula_and_last_uncond_is_the_negative(sd1, third, style):
    from nodes.families.dual_cfg import DualCFG

    single, made = _evaluate(sd1)
    n, m, p = single(sd1.neg), single(third), single(sd1.pos)
    spec = DualCFG(third, S2, nested=style == "nested")
    dual, out = made(spec.denoiser, positive=sd1.pos, negative=sd1.neg, cfg=S1)
    want = n + S2 * (m - n) + S1 * (p - m) if style == "regular" else n + S2 * ((m + S1 * (p - m)) - n)
    assert torch.allclose(out, want, atol=1e-5)
    other = n + S2 * (m - n) + S1 * (p - m) if style == "nested" else n + S2 * ((m + S1 * (p - m)) - n)
    assert not torch.allclose(out, other, atol=1e-3)  # the two formulas do differ here
    assert torch.allclose(dual.last_uncond, n, atol=1e-5) and not torch.allclose(dual.last_uncond, m, atol=1e-3)


def test_a_weightless_prompt_is_not_evaluated(sd1, third):
    from nodes.families.dual_cfg import DualCFG

    single, made = _evaluate(sd1)
    n, m, p = single(sd1.neg), single(third), single(sd1.pos)
    before = sd1.unet_calls
    dual, out = made(DualCFG(third, S2).denoiser, positive=sd1.pos, negative=sd1.neg, cfg=0.0)  # regular, s1 = 0
    assert sd1.unet_calls - before == 1 and dual.third is None
    assert torch.allclose(out, n + S2 * (m - n), atol=1e-5)
    before = sd1.unet_calls
    dual, out = made(DualCFG(third, 1.0, nested=True).denoiser, positive=sd1.pos, negative=sd1.neg, cfg=S1)
    assert sd1.unet_calls - before == 1 and dual.third is None
    assert torch.allclose(out, m + S1 * (p - m), atol=1e-5)
    assert torch.allclose(dual.last_uncond, m, atol=1e-5)  # the negative was never evaluated: cond2 is unguided


@pytest.mark.parametrize("style", ["regular", "nested"])
@pytest.mark.parametrize("patches", [{"cfg_rescale": 0.7}, {"pag_scale": 2.0}])
def test_rescale_cfg_and_pag_act_on_the_pair_comfyui_hands_them(sd1, third, style, patches):
    """ComfyUI's CFG hook (where RescaleCFG and PAG sit) sees (negative, cond2) at cfg_cond2_negative
    in the regular style and (cond2, cond1) at cfg_conds in the nested one."""
    from nodes.families.denoiser import Denoiser
    from nodes.families.dual_cfg import DualCFG

    single, made = _evaluate(sd1)
    n, m, p = single(sd1.neg), single(third), single(sd1.pos)
    spec = DualCFG(third, S2, nested=style == "nested")
    _, out = made(spec.denoiser, positive=sd1.pos, negative=sd1.neg, cfg=S1, **patches)
    _, plain = made(spec.denoiser, positive=sd1.pos, negative=sd1.neg, cfg=S1)
    if style == "regular":
        _, pair = made(Denoiser, positive=third, negative=sd1.neg, cfg=S2, **patches)
        want = pair + S1 * (p - m)
    else:
        _, pair = made(Denoiser, positive=sd1.pos, negative=third, cfg=S1, **patches)
        want = n + S2 * (pair - n)
    assert torch.allclose(out, want, atol=1e-5)
    # the patch did something (RescaleCFG's is small on the regular pair at this scale: 5e-4 here)
    assert _gap(out, plain) > 1e-4


def test_a_patched_model_samples_with_its_patch(sd1, third):
    from nodes.model_patches import rescale_cfg

    patched, = rescale_cfg(Recorder().ctx, sd1.model, 0.7)
    plain = _dual(sd1, sd1.pos, third, sd1.neg, "nested", steps=3)
    # the loop hands the model's patches on (0.4 here, against run-to-run differences of 0)
    assert _gap(_dual(sd1, sd1.pos, third, sd1.neg, "nested", steps=3, model=patched), plain) > 0.1


# -- what ComfyUI does across the three prompts -------------------------------------------------

def test_cond1_controlnet_is_shared_and_cond2_s_stays_its_own(sd1, third):
    from nodes.families.dual_cfg import DualCFG

    def with_control(cond, control):
        return [[cond[0][0], {**cond[0][1], "control": control, "control_apply_to_uncond": True}]]

    common = dict(image_size=(64, 64), batch=1)
    first, own = object(), object()
    cond1 = with_control(sd1.pos, first)
    for nested in (False, True):
        d = DualCFG(third, S2, nested=nested).denoiser(sd1.parts["unet"], sd1.model.family, positive=cond1,
                                                       negative=sd1.neg, cfg=S1, **common)
        sides = d.pair.positive + d.pair.negative + d.third.positive
        assert [e.extra.get("control") for e in sides] == [first, first, first]
        assert {e.extra["_input"] for e in sides} == {"cond1", "cond2", "negative"}
        d = DualCFG(with_control(third, own), S2, nested=nested).denoiser(
            sd1.parts["unet"], sd1.model.family, positive=sd1.pos, negative=sd1.neg, cfg=S1, **common)
        negative = d.third.positive if nested else d.pair.negative
        assert negative[0].extra["_input"] == "negative" and negative[0].extra.get("control") is None
    assert "_input" not in cond1[0][1] and "control" not in sd1.neg[0][1]  # the inputs are left as they were


def test_cond2_is_a_negative_type_prompt():
    from nodes.families.sdxl_refiner import NEGATIVE_SCORE, POSITIVE_SCORE, refiner_time_ids

    embeds = torch.zeros(1, 77, 32)
    cond2 = [[embeds, {"pooled_output": None}]]
    guider, = cs.dual_cfg_guider(Recorder().ctx, None, [[embeds, {}]], cond2, [[embeds, {}]], 1.0, 1.0, "regular")
    middle = guider.dual.middle
    assert middle[0][1]["prompt_type"] == "negative" and "prompt_type" not in cond2[0][1]
    # the SDXL refiner's default aesthetic score follows it, as ComfyUI's encode_adm does
    assert refiner_time_ids({**middle[0][1], "_input": "cond2"}, 64, 64)[-1] == NEGATIVE_SCORE
    assert refiner_time_ids({"_input": "cond1"}, 64, 64)[-1] == POSITIVE_SCORE
    assert refiner_time_ids({"_input": "negative"}, 64, 64)[-1] == NEGATIVE_SCORE


# -- the node ---------------------------------------------------------------------------------------

def test_the_node_has_comfyui_s_inputs():
    from engine.registry import default_registry

    spec = default_registry().get("DualCFGGuider")
    assert spec is not None and spec.category == "sampling/guiders"  # beside CFGGuider in Kiln's menu
    assert [i.name for i in spec.inputs] == ["model", "cond1", "cond2", "negative", "cfg_conds",
                                             "cfg_cond2_negative", "style"]
    for name in ("cfg_conds", "cfg_cond2_negative"):
        i = spec.input(name)
        assert (i.default, i.min, i.max, i.step, i.round) == (8.0, 0.0, 100.0, 0.1, 0.01)
    assert list(spec.input("style").choices) == ["regular", "nested"]
    assert [o.type for o in spec.outputs] == ["GUIDER"]


def test_bad_input_names_the_input(sd1):
    ctx = Recorder().ctx
    for name, bad in (("cond1", "a red barn"), ("cond2", {"samples": sd1.init}), ("negative", []),
                      ("cond2", [[torch.zeros(77, 32), {}]])):
        args = dict(cond1=sd1.pos, cond2=sd1.neg, negative=sd1.neg) | {name: bad}
        with pytest.raises(NodeError) as err:
            cs.dual_cfg_guider(ctx, sd1.model, args["cond1"], args["cond2"], args["negative"], S1, S2, "regular")
        assert err.value.input_name == name
    with pytest.raises(NodeError) as err:
        cs.dual_cfg_guider(ctx, sd1.model, sd1.pos, sd1.neg, sd1.neg, S1, S2, "fancy")
    assert err.value.input_name == "style" and "nested" in str(err.value)
    # a prompt another model's text encoder made is refused at sampling, naming the input it came in on
    wide = [[torch.zeros(1, 77, sd1.pos[0][0].shape[-1] + 8), {}]]
    with pytest.raises(NodeError) as err:
        _dual(sd1, sd1.pos, wide, sd1.neg, "nested", steps=1)
    assert err.value.input_name == "cond2"


def test_a_comfyui_workflow_with_the_node_runs(tiny_env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.workflow import parse
    from test_custom_sampling import _api_prompt

    executor = Executor(default_registry(), tiny_env)
    plain = executor.run(parse(_api_prompt(8)))  # CFGGuider at cfg 7
    prompt = _api_prompt(8)
    prompt["22"] = {"class_type": "DualCFGGuider", "inputs": {
        "model": ["4", 0], "cond1": ["6", 0], "cond2": ["7", 0], "negative": ["7", 0], "cfg_conds": 7.0,
        "cfg_cond2_negative": 3.0, "style": "regular"}}
    dual = executor.run(parse(prompt))
    assert dual.status == "succeeded", dual.error and dual.error.message
    assert (dual.results["8"][0] - plain.results["8"][0]).abs().max().item() < 1e-3


# -- FLUX ------------------------------------------------------------------------------------------

def test_it_runs_on_flux():
    """FLUX [dev]'s guidance embedding rides in each prompt's conditioning; cfg_conds and
    cfg_cond2_negative combine the three predictions as on SD."""
    from test_flux import _embeds, _fixed, _model

    embeds, pooled = _embeds("dev")
    cond1 = [[embeds, {"pooled_output": pooled, "guidance": 3.5}]]
    cond2 = [[embeds * -0.4, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[embeds * 0.5, {"pooled_output": pooled, "guidance": 1.0}]]
    model = _fixed(_model("dev"))
    ctx = Recorder().ctx

    def run(guider):
        sigmas, = cs.basic_scheduler(ctx, model, "simple", 3, 1.0)
        euler, = cs.ksampler_select(ctx, "euler")
        out, _ = cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, 2)[0], guider, euler, sigmas,
                                            {"samples": torch.zeros(1, 16, 8, 8)})
        return out["samples"]

    def dual(c2, style, s1=2.0, s2=1.5):
        return run(cs.dual_cfg_guider(ctx, model, cond1, c2, negative, s1, s2, style)[0])

    cfg = {s: run(cs.cfg_guider(ctx, model, cond1, negative, s)[0]) for s in (2.0, 3.0)}
    assert _gap(dual(negative, "regular"), cfg[2.0]) < TOL
    assert _gap(dual(negative, "nested"), cfg[3.0]) < TOL
    three = dual(cond2, "regular")
    assert all(_gap(three, ref) > 0.1 for ref in cfg.values())  # 0.3 or more here, on latents up to 10
