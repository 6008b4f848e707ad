"""The Conditioning* nodes and how the denoiser combines several conditionings (ComfyUI's rules).

The expectations are computed directly with the tiny UNet: each region's network
output for its own prompt, blended by the weights ComfyUI's rules give.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from node_call import Called, call
from nodes import conditioning_nodes as cn
from nodes import families
from nodes.families import conditioning as rules
from nodes.families.denoiser import Denoiser
from nodes.handles import ModelHandle
from nodes.samplers.schedules import TrainingSchedule

H, W = 8, 16  # latent of a 64x128 image
#: float32 agreement between the denoiser and UNet calls written out here: the same operations in another
#: order (a batch of prompts, a weighted sum) round differently by up to a few 1e-6 on outputs of ~0.5
CLOSE = {"rtol": 1e-5, "atol": 5e-6}


@pytest.fixture(scope="module")
def sd1():
    parts = tm.components("sd1")
    pipe = tm.pipeline("sd1")
    with torch.no_grad():
        conds = {p: pipe.encode_prompt(p, "cpu", 1, False)[0] for p in ("a red barn", "a blue lake", "blurry")}
    return parts, {k: [[v, {"pooled_output": None}]] for k, v in conds.items()}


def _denoiser(parts, positive, negative, cfg=1.0):
    return Denoiser(parts["unet"], families.by_name("sd1"), positive=positive, negative=negative, cfg=cfg,
                    image_size=(H * 8, W * 8), batch=1, schedule=TrainingSchedule(dict(parts["scheduler"].config)))


def _x(seed=0):
    return torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(seed))


def _unet(parts, x, t, cond):
    with torch.no_grad():
        return parts["unet"](x, t, encoder_hidden_states=cond[0][0]).sample


def _run(node, *args, **kw):
    rec = Called()
    return call(node, None, rec, *args, **kw)[0], rec


def _area(cond, width, height, x, y, strength=1.0):
    return _run(cn.conditioning_set_area, conditioning=cond, width=width, height=height, x=x, y=y,
                strength=strength)[0]


def test_disjoint_areas_give_each_region_its_own_prompt(sd1):
    parts, c = sd1
    left = _area(c["a red barn"], 64, 64, 0, 0)
    right = _area(c["a blue lake"], 64, 64, 64, 0)
    positive = _run(cn.conditioning_combine, conditioning_1=left, conditioning_2=right)[0]
    x, t = _x(), torch.tensor(500)
    with torch.inference_mode():
        out = _denoiser(parts, positive, c["blurry"]).model_output(x, t)
    assert out.shape == x.shape
    assert torch.allclose(out[..., :8], _unet(parts, x[..., :8], t, c["a red barn"]), **CLOSE)
    assert torch.allclose(out[..., 8:], _unet(parts, x[..., 8:], t, c["a blue lake"]), **CLOSE)
    # not vacuous: the whole-latent output of either prompt differs from the regional one
    assert (out[..., :8] - _unet(parts, x, t, c["a red barn"])[..., :8]).abs().max() > 1e-3


def test_negative_gets_twins_of_the_positive_areas(sd1):
    """Guided: inside each positive area the negative is its full-latent output blended with its
    output on that area, weighted by the area's feathered weight (ComfyUI's paired areas)."""
    parts, c = sd1
    positive = _run(cn.conditioning_combine, conditioning_1=c["a red barn"],
                    conditioning_2=_area(c["a blue lake"], 64, 64, 64, 0, strength=2.0))[0]
    x, t, cfg = _x(1), torch.tensor(700), 5.0
    with torch.inference_mode():
        out = _denoiser(parts, positive, c["blurry"], cfg=cfg).model_output(x, t)
    m = torch.full((1, 1, H, 8), 2.0)
    m[..., 0] *= 0.5  # the area starts at x=8: its first min(8, 8 // 4) = 2 columns fade in
    full_pos, full_neg = _unet(parts, x, t, c["a red barn"]), _unet(parts, x, t, c["blurry"])
    area_pos, area_neg = _unet(parts, x[..., 8:], t, c["a blue lake"]), _unet(parts, x[..., 8:], t, c["blurry"])
    cond = full_pos.clone()
    uncond = full_neg.clone()
    cond[..., 8:] = (full_pos[..., 8:] + area_pos * m) / (1 + m)
    uncond[..., 8:] = (full_neg[..., 8:] + area_neg * m) / (1 + m)
    assert torch.allclose(out, uncond + cfg * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_combining_a_prompt_with_itself_changes_nothing(sd1):
    parts, c = sd1
    twice = _run(cn.conditioning_combine, conditioning_1=c["a red barn"], conditioning_2=c["a red barn"])[0]
    assert len(twice) == 2
    x, t = _x(2), torch.tensor(300)
    with torch.inference_mode():
        alone = _denoiser(parts, c["a red barn"], c["blurry"], cfg=7.0)
        both = _denoiser(parts, twice, c["blurry"], cfg=7.0)
        assert alone._plain and not both._plain  # the general path is what is tested here
        assert torch.allclose(both.model_output(x, t), alone.model_output(x, t), rtol=1e-5, atol=1e-5)


def test_timestep_ranges_select_entries_by_noise_level(sd1):
    parts, c = sd1
    early = _run(cn.conditioning_set_timestep_range, conditioning=c["a red barn"], start=0.0, end=0.5)[0]
    late = _run(cn.conditioning_set_timestep_range, conditioning=c["a blue lake"], start=0.5, end=1.0)[0]
    both = early + late
    x = _x(3)
    with torch.inference_mode():
        d = _denoiser(parts, both, c["blurry"])
        for t, prompt in ((torch.tensor(900), "a red barn"), (torch.tensor(100), "a blue lake")):
            expected = _unet(parts, x, t, c[prompt])
            assert torch.allclose(d.model_output(x, t), expected, **CLOSE), prompt
    # a range outside the current noise level leaves nothing of that entry
    only_late = _denoiser(parts, c["a red barn"] + late, c["blurry"])
    with torch.inference_mode():
        assert torch.allclose(only_late.model_output(x, torch.tensor(900)),
                              _unet(parts, x, torch.tensor(900), c["a red barn"]), **CLOSE)


def test_a_mask_weights_as_stated(sd1):
    parts, c = sd1
    mask = torch.ones(1, H, W)
    mask[..., 8:] = 0.25
    masked, _ = _run(cn.conditioning_set_mask, conditioning=c["a blue lake"], mask=mask, strength=2.0)
    positive = c["a red barn"] + masked
    x, t = _x(4), torch.tensor(400)
    with torch.inference_mode():
        out = _denoiser(parts, positive, c["blurry"]).model_output(x, t)
    a, b = _unet(parts, x, t, c["a red barn"]), _unet(parts, x, t, c["a blue lake"])
    w = mask * 2.0
    assert torch.allclose(out, (a + b * w) / (1 + w), **CLOSE)


def test_placement_is_resolved_like_comfyui():
    embeds = torch.zeros(1, 77, 8)
    pct = rules.resolve(rules.Entry(embeds, {"area": ("percentage", 0.5, 0.5, 0.0, 0.5), "_input": "p"}), H, W, "cpu")
    assert pct.extra["area"] == (4, 8, 0, 8)
    mask = torch.zeros(1, 64, 128)  # image resolution: resized to the latent
    mask[:, 8:24, 16:40] = 1.0
    bounded = rules.resolve(rules.Entry(embeds, {"mask": mask, "set_area_to_bounds": True, "_input": "p"}), H, W, "cpu")
    assert bounded.extra["mask"].shape == (1, H, W)
    ah, aw, ay, ax = bounded.extra["area"]
    assert (ah, aw) == (8, 8) and ay <= 1 and 1 <= ax <= 2  # a small box grows to ComfyUI's 8x8 minimum
    # feathering: min(8, size // 4) rows/columns at each inner edge
    w = rules.weight({"area": (8, 16, 0, 0), "strength": 1.0}, 1, (8, 16, 0, 0), 8, 32)
    assert w[0, 0, 0].tolist() == [1.0] * 12 + [1.0, 0.75, 0.5, 0.25]
    assert rules.weight({"strength": 3.0}, 1, (8, 16, 0, 0), 8, 16).unique().tolist() == [3.0]


def test_twins_take_the_smallest_enclosing_prompt():
    e = lambda v, **kw: rules.Entry(torch.full((1, 77, 8), float(v)), {**kw, "_input": "x"})  # noqa: E731
    positive = [e(1, area=(4, 4, 2, 2), strength=0.5)]
    negative = [e(2), e(3, area=(8, 8, 0, 0)), e(4, area=(6, 6, 1, 1)), e(5, area=(4, 4, 0, 0))]
    pos, neg = rules.prepare(positive, negative, H, W, "cpu")
    twin = neg[-1]
    assert len(neg) == 5 and float(twin.embeds[0, 0, 0]) == 4.0  # (6,6,1,1) is the smallest that contains it
    assert twin.extra["area"] == (4, 4, 2, 2) and twin.extra["strength"] == 0.5
    # and the negative's areas got positive twins from the positive's only (area-less) candidate: none here
    assert len(pos) == 1


def test_sdxl_areas_run_with_pooled_output(tiny_env):
    from nodes.latent import empty_latent_image
    from nodes.sampling import ksampler
    from test_sampling import Recorder

    parts = tm.components("sdxl")
    fam = families.by_name("sdxl")
    unet = parts["unet"]
    model = ModelHandle(fam, scheduler_config=dict(parts["scheduler"].config),
                        latent=dataclasses.replace(fam.latent, scale=float(parts["vae"].config.scaling_factor)),
                        _use_unet=lambda: contextlib.nullcontext(unet))
    pipe = tm.pipeline("sdxl")
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt("a castle", device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True, negative_prompt="fog")
    p, n = [[pos, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]]
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 128, 64, 1)
    plain, = ksampler(rec.ctx, model, 3, 3, 5.0, "euler", "normal", p, n, empty)
    regional = p + _area(p, 64, 64, 64, 0)
    out, = ksampler(rec.ctx, model, 3, 3, 5.0, "euler", "normal", regional, n, empty)
    assert out["samples"].shape == (1, 4, 8, 16) and torch.isfinite(out["samples"]).all()
    assert not torch.allclose(out["samples"], plain["samples"])


# -- the nodes themselves -------------------------------------------------------------------


def test_nodes_edit_copies_and_follow_comfyui():
    a = [[torch.ones(1, 77, 8), {"pooled_output": torch.ones(1, 4)}]]
    b = [[torch.full((1, 154, 8), 3.0), {"pooled_output": torch.full((1, 4), 3.0)}]]
    out, _ = _run(cn.conditioning_set_area, conditioning=a, width=64, height=128, x=64, y=8, strength=1.5)
    assert out[0][1]["area"] == (16, 8, 1, 8) and out[0][1]["strength"] == 1.5 and "area" not in a[0][1]
    out, _ = _run(cn.conditioning_set_area_percentage, conditioning=a, width=0.5, height=1.0, x=0.5, y=0.0,
                  strength=1.0)
    assert out[0][1]["area"] == ("percentage", 1.0, 0.5, 0.0, 0.5)
    out, _ = _run(cn.conditioning_set_area_strength, conditioning=a, strength=0.3)
    assert out[0][1]["strength"] == 0.3
    out, _ = _run(cn.conditioning_concat, conditioning_to=a, conditioning_from=b)
    assert out[0][0].shape == (1, 231, 8) and torch.equal(out[0][0][:, 77:], b[0][0])
    out, _ = _run(cn.conditioning_average, conditioning_to=b, conditioning_from=a, conditioning_to_strength=0.25)
    assert out[0][0].shape == (1, 154, 8)  # from is zero-padded to to's length
    assert torch.allclose(out[0][0][:, :77], torch.full((1, 77, 8), 0.25 * 3 + 0.75))
    assert torch.allclose(out[0][0][:, 77:], torch.full((1, 77, 8), 0.75))
    assert torch.allclose(out[0][1]["pooled_output"], torch.full((1, 4), 1.5))
    out, _ = _run(cn.conditioning_zero_out, conditioning=b)
    assert not out[0][0].any() and not out[0][1]["pooled_output"].any() and b[0][0].all()
    out, rec = _run(cn.conditioning_set_timestep_range, conditioning=a, start=0.7, end=0.2)
    assert out[0][1]["start_percent"] == 0.7 and "never applies" in rec.messages[0]
    out, _ = _run(cn.conditioning_set_mask, conditioning=a, mask=torch.ones(64, 64), strength=0.5,
                  set_cond_area="mask bounds")
    assert out[0][1]["mask"].shape == (1, 64, 64) and out[0][1]["set_area_to_bounds"] is True
    assert out[0][1]["mask_strength"] == 0.5
    _, rec = _run(cn.conditioning_concat, conditioning_to=a, conditioning_from=a + b)
    assert "only the first" in rec.messages[0]


def test_bad_conditioning_names_the_input():
    good = [[torch.ones(1, 77, 8), {}]]
    with pytest.raises(NodeError) as err:
        _run(cn.conditioning_combine, conditioning_1=good, conditioning_2="nope")
    assert err.value.input_name == "conditioning_2"
    with pytest.raises(NodeError) as err:
        _run(cn.conditioning_concat, conditioning_to=good, conditioning_from=[[torch.ones(1, 77, 16), {}]])
    assert err.value.input_name == "conditioning_from" and "different text encoders" in str(err.value)
    with pytest.raises(NodeError) as err:
        _run(cn.conditioning_set_mask, conditioning=good, mask="x", strength=1.0, set_cond_area="default")
    assert err.value.input_name == "mask"


def test_declarations_match_functions_and_comfyui_names():
    specs = [getattr(cn, n) for n in dir(cn) if isinstance(getattr(cn, n), type(cn.conditioning_combine))]
    assert {s.type for s in specs} == {
        "ConditioningCombine", "ConditioningConcat", "ConditioningAverage", "ConditioningZeroOut",
        "ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength",
        "ConditioningSetMask", "ConditioningSetTimestepRange"}
    for spec in specs:
        assert spec.signature_mismatches() == []
    assert [i.name for i in cn.conditioning_set_mask.inputs] == ["conditioning", "mask", "strength", "set_cond_area"]
    assert [i.name for i in cn.conditioning_set_area.inputs] == ["conditioning", "width", "height", "x", "y",
                                                                 "strength"]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_uncovered_pixels_predict_a_zero_clean_latent(sd1, prediction):
    """ComfyUI: where no entry applies, the weighted sum is 0 / 1e-37, a denoised latent of zero."""
    parts, c = sd1
    left = _area(c["a red barn"], 64, 64, 0, 0)
    d = Denoiser(parts["unet"], families.by_name("sd1"), positive=left, negative=c["blurry"], cfg=1.0,
                 image_size=(H * 8, W * 8), batch=1, schedule=TrainingSchedule(dict(parts["scheduler"].config)),
                 prediction_type=prediction)
    x, t = _x(5) * 3, torch.tensor(600)
    sigma = float(d.schedule.sigma(600))
    with torch.inference_mode():
        denoised = d.predict(x, sigma, prediction, t)
        region = _unet(parts, x[..., :8] / (sigma ** 2 + 1) ** 0.5, t, c["a red barn"])
    assert torch.allclose(denoised[..., 8:], torch.zeros(1, 4, H, 8), atol=1e-4)
    expected = x[..., :8] - sigma * region if prediction == "epsilon" else \
        x[..., :8] / (sigma ** 2 + 1) - region * sigma / (sigma ** 2 + 1) ** 0.5
    assert torch.allclose(denoised[..., :8], expected, rtol=1e-4, atol=1e-4)
    assert denoised[..., :8].abs().max() > 0.1
