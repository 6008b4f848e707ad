"""DualModelGuider with the model's CFG patches (nodes/families/dual_model.py), on the tiny SD1.

ComfyUI's Guider_DualModel evaluates the positive prompt on ``model`` and the negative on
``model_negative``, both with the guider's (``model``'s) options, and hands the two predictions to
``model``'s CFG function: RescaleCFG and the post-CFG hooks (PAG, CFGZeroStar, ...) see the negative
model's prediction as the unconditional one, and PAG's perturbed pass runs on ``model`` with the
positive prompt. The claims: with one model on both sides the guider equals CFGGuider with the same
patch (one evaluation within 1e-5, whole runs within run-to-run rounding), and the patch changes the
result; with two models each patch's formula, written out here, holds on (positive model's cond,
negative model's uncond); what ComfyUI's guider never applies is refused naming the input. Network
patches (FreeU here) are model's on both networks, as ComfyUI runs both passes with model's options,
equal to the hooks put there by hand; model_negative's are not used (the node says so); one loaded
network on both inputs is patched once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

import tiny_models
from engine.context import NodeError
from nodes import custom_sampling as cs
from nodes import dual_model_nodes as dm
from nodes import guidance_patches as gp
from nodes import model_patches as mp
from test_sampling import Recorder, sd1  # noqa: F401 (sd1 is a fixture)

CFG, T = 5.0, 600.0
#: One patch of each kind ComfyUI's DualModelGuider applies: its CFG function, a post-CFG pass with a
#: network call of its own, a post-CFG rule on both predictions, and a rule that replaces the CFG function.
PATCHES = {
    "RescaleCFG": lambda m: mp.rescale_cfg(Recorder().ctx, m, 0.7)[0],
    "PAG": lambda m: mp.perturbed_attention_guidance(Recorder().ctx, m, 2.0)[0],
    "CFGZeroStar": lambda m: gp.cfg_zero_star(Recorder().ctx, m)[0],
    "RenormCFG": lambda m: gp.renorm_cfg(Recorder().ctx, m, 100.0, 0.9)[0],
}


def _float64(sd1, seed: int):
    """The tiny SD1's handle over a float64 UNet built with ``seed`` (0: the fixture's own weights). One
    evaluation in double precision leaves the batching of the two sides (CFGGuider's one call of two,
    the dual guider's two calls) no rounding to show, so the 1e-5 below is all margin."""
    unet = tiny_models.fresh_components("sd1", seed=seed)["unet"].double()
    return dataclasses.replace(sd1.model, _use_unet=lambda: contextlib.nullcontext(unet))


@pytest.fixture(scope="module")
def model(sd1):
    return _float64(sd1, 0)


@pytest.fixture(scope="module")
def other(sd1):
    """A second tiny SD1 with other weights (the same text width), as ``model_negative``."""
    return _float64(sd1, 5)


def _common(model, batch: int = 1) -> dict:
    from nodes.samplers.schedules import TrainingSchedule

    return dict(image_size=(64, 64), batch=batch, schedule=TrainingSchedule(model.scheduler_config),
                prediction_type=model.prediction_type)


def _patch_args(model) -> dict:
    p = model.patches
    return dict(cfg_rescale=p.cfg_rescale, pag_scale=p.pag_scale, guidance=p.guidance)


def _z(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _cfg_eval(tiny, model, cfg: float = CFG, batch: int = 1) -> torch.Tensor:
    from nodes.families.denoiser import Denoiser

    with model.unet() as unet, torch.no_grad():
        d = Denoiser(unet, model.family, positive=tiny.pos, negative=tiny.neg, cfg=cfg, **_common(model, batch),
                     **_patch_args(model))
        return d.model_output(_z(batch), torch.tensor(T))


def _dual_eval(tiny, model, negative_model, cfg: float = CFG, batch: int = 1):
    """(the dual denoiser, its output) at one evaluation, the negative model's network held."""
    from nodes.families.dual_model import DualModel

    with model.unet() as unet, negative_model.unet() as neg_unet, torch.no_grad():
        spec = DualModel(negative_model, network=neg_unet)
        d = spec.denoiser(unet, model.family, positive=tiny.pos, negative=tiny.neg, cfg=cfg,
                          **_common(model, batch), **_patch_args(model))
        return d, d.model_output(_z(batch), torch.tensor(T))


def _single(tiny, model, prompt, perturbed: bool = False) -> torch.Tensor:
    """One conditional-only, unpatched evaluation of ``prompt`` on ``model`` (its middle self-attention
    the identity when ``perturbed``)."""
    from nodes.families.denoiser import Denoiser
    from nodes.families.perturbed import identity_middle_attention

    with model.unet() as unet, torch.no_grad():
        d = Denoiser(unet, model.family, positive=prompt, negative=None, cfg=1.0, **_common(model))
        with identity_middle_attention(unet) if perturbed else contextlib.nullcontext():
            return d.model_output(_z(), torch.tensor(T))


# -- one model on both sides: CFGGuider --------------------------------------------------------------

@pytest.mark.parametrize("name", list(PATCHES))
def test_one_model_on_both_sides_is_cfg_guider_with_the_patch(sd1, model, name):
    patched = PATCHES[name](model)
    want = _cfg_eval(sd1, patched, batch=2)
    _, ours = _dual_eval(sd1, patched, model, batch=2)
    assert (ours - want).abs().max().item() <= 1e-5
    # not vacuous: the patch changes the prediction, by 100 times the tolerance or more (RescaleCFG least: 0.01)
    assert (want - _cfg_eval(sd1, model, batch=2)).abs().max().item() > 1e-3


def _sample(tiny, guider, steps: int = 3) -> torch.Tensor:
    ctx = Recorder().ctx
    sigmas, = cs.basic_scheduler(ctx, tiny.model, "normal", steps, 1.0)
    out, _ = cs.sampler_custom_advanced(ctx, cs.random_noise(ctx, 4)[0], guider, cs.ksampler_select(ctx, "euler")[0],
                                        sigmas, {"samples": torch.zeros_like(tiny.init)})
    return out["samples"]


def test_whole_runs_through_the_nodes_equal_cfg_guider(sd1):
    """SamplerCustomAdvanced with DualModelGuider (the patched model on both inputs, as a user wires it)
    equals CFGGuider on that model: the dual run makes its two network calls one by one where CFGGuider
    batches them, which moves the latent (about 70 in size) by rounding only."""
    ours, want, plain = _same_model_runs(sd1, PATCHES["PAG"](PATCHES["RescaleCFG"](sd1.model)))
    assert (ours - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (want - plain).abs().max().item() > 0.1  # the patches act on the run


def _same_model_runs(tiny, patched):
    """(DualModelGuider with ``patched`` on both inputs, CFGGuider on ``patched``, CFGGuider on the tiny
    model unpatched): whole runs through the nodes."""
    ctx = Recorder().ctx
    (guider,) = dm.dual_model_guider(ctx, model=patched, positive=tiny.pos, cfg=CFG, model_negative=patched,
                                     negative=tiny.neg)
    return _sample(tiny, guider), _sample(tiny, cs.cfg_guider(ctx, patched, tiny.pos, tiny.neg, CFG)[0]), \
        _sample(tiny, cs.cfg_guider(ctx, tiny.model, tiny.pos, tiny.neg, CFG)[0])


# -- two models: each patch on (positive model's cond, negative model's uncond) ----------------------

def _pieces(tiny, model, negative_model):
    """The positive model's cond, the negative model's uncond, the input, sigma and ComfyUI's x."""
    from nodes.samplers.schedules import TrainingSchedule

    sigma = float(TrainingSchedule(model.scheduler_config).sigma(T))
    z = _z()
    return _single(tiny, model, tiny.pos), _single(tiny, negative_model, tiny.neg), z, sigma, \
        z * math.sqrt(1 + sigma ** 2)


def test_two_models_plain_cfg_and_last_uncond(sd1, model, other):
    c, u, *_ = _pieces(sd1, model, other)
    d, out = _dual_eval(sd1, model, other)
    assert torch.allclose(out, u + CFG * (c - u), atol=1e-5)
    assert torch.allclose(d.last_uncond, u, atol=1e-6)
    assert (u - _single(sd1, model, sd1.neg)).abs().max().item() > 0.1  # the two models do differ


def test_two_models_rescale_cfg_rescales_on_the_negative_models_uncond(sd1, model, other):
    """ComfyUI's RescaleCFG on an epsilon model: velocities v = sqrt(1 + s^2) eps - s z, the guided one
    rescaled to the conditional one's spread, blended by the multiplier, and back."""
    c, u, z, sigma, _ = _pieces(sd1, model, other)
    _, out = _dual_eval(sd1, PATCHES["RescaleCFG"](model), other)
    root = math.sqrt(1 + sigma ** 2)
    v_c, v_g = root * c - sigma * z, root * (u + CFG * (c - u)) - sigma * z
    v = 0.7 * v_g * (v_c.std() / v_g.std()) + 0.3 * v_g
    want = (v + sigma * z) / root
    assert torch.allclose(out, want, atol=1e-5)
    assert (out - (u + CFG * (c - u))).abs().max().item() > 1e-3


def test_two_models_pag_perturbs_the_positive_model_on_the_positive_prompt(sd1, model, other):
    c, u, *_ = _pieces(sd1, model, other)
    _, out = _dual_eval(sd1, PATCHES["PAG"](model), other)
    want = u + CFG * (c - u) + 2.0 * (c - _single(sd1, model, sd1.pos, perturbed=True))
    assert torch.allclose(out, want, atol=1e-5)
    # not the negative model's perturbed pass, nor the negative prompt's
    for wrong in (_single(sd1, other, sd1.pos, perturbed=True), _single(sd1, model, sd1.neg, perturbed=True)):
        assert (out - (u + CFG * (c - u) + 2.0 * (c - wrong))).abs().max().item() > 1e-2


def test_two_models_cfg_zero_star_scales_the_negative_models_prediction(sd1, model, other):
    """CFG-Zero* on the clean-latent predictions (x - s eps), its factor from the two models' noises."""
    c, u, z, sigma, x = _pieces(sd1, model, other)
    _, out = _dual_eval(sd1, PATCHES["CFGZeroStar"](model), other)
    c0, u0 = x - sigma * c, x - sigma * u
    alpha = ((x - c0) * (x - u0)).sum() / ((x - u0).pow(2).sum() + 1e-8)
    guided0 = u0 + CFG * (c0 - u0) + (alpha - 1) * u0 + CFG * (1 - alpha) * u0
    assert torch.allclose(out, (x - guided0) / sigma, atol=1e-5)
    assert (out - (u + CFG * (c - u))).abs().max().item() > 1e-2


def test_a_cfg_override_step_at_cfg_1_is_the_positive_prediction_unpatched(sd1, model, other):
    """ComfyUI's guider returns the positive model's prediction when the step's cfg is 1: no patch runs."""
    from nodes.families.dual_model import DualModel

    c = _single(sd1, model, sd1.pos)
    patched = PATCHES["PAG"](model)
    with model.unet() as unet, other.unet() as neg_unet, torch.no_grad():
        d = DualModel(other, network=neg_unet).denoiser(unet, model.family, positive=sd1.pos, negative=sd1.neg,
                                                        cfg=CFG, **_common(model), **_patch_args(patched))
        d.cfg = 1.0
        assert torch.equal(d.model_output(_z(), torch.tensor(T)), c)
        d.cfg = CFG
        assert (d.model_output(_z(), torch.tensor(T)) - c).abs().max().item() > 0.1


# -- what ComfyUI's guider never applies -------------------------------------------------------------

def _guider(tiny, model, model_negative, cfg: float = CFG):
    return dm.dual_model_guider(Recorder().ctx, model=model, positive=tiny.pos, cfg=cfg,
                                model_negative=model_negative, negative=tiny.neg)


def test_what_comfyuis_guider_leaves_out_is_refused_naming_the_input(sd1, other):
    ctx = Recorder().ctx
    apg, = gp.apg(ctx, sd1.model, 1.0, 5.0, 0.0)
    with pytest.raises(NodeError) as err:  # a pre-CFG hook: Guider_DualModel never calls them
        _guider(sd1, apg, other)
    assert err.value.input_name == "model" and "APG" in str(err.value) and "DualModelGuider" in str(err.value)
    rescaled = PATCHES["RescaleCFG"](sd1.model)
    with pytest.raises(NodeError) as err:  # cfg 1: ComfyUI returns the positive prediction, no CFG function
        _guider(sd1, rescaled, other, cfg=1.0)
    assert err.value.input_name == "model" and "cfg 1" in str(err.value)
    window, = dm.cfg_override(ctx, rescaled, 3.0, 0.5, 1.0)
    _guider(sd1, window, other, cfg=1.0)  # a CFGOverride sets a cfg the patch acts on
    perp, = gp.perp_neg(ctx, sd1.model, sd1.neg, 1.0)
    with pytest.raises(NodeError) as err:
        _guider(sd1, perp, other)
    assert err.value.input_name == "model" and "PerpNeg" in str(err.value)
    with pytest.raises(NodeError) as err:  # model_negative's options are never read
        _guider(sd1, sd1.model, PATCHES["CFGZeroStar"](other))
    assert err.value.input_name == "model_negative"
    # the sampling loop's own check, for a DualModel made without the node
    from nodes.families.base import ConditioningError
    from nodes.families.dual_model import DualModel

    with pytest.raises(ConditioningError) as err:
        DualModel(other).denoiser(None, sd1.model.family, positive=sd1.pos, negative=sd1.neg, cfg=CFG,
                                  guidance=apg.patches.guidance)
    assert err.value.input_name == "model" and "APG" in str(err.value)
    # the patched model on both inputs, or on model alone: the patch is model's, applied once
    _guider(sd1, rescaled, rescaled)
    _guider(sd1, rescaled, other)


# -- network patches: model's on both networks, as ComfyUI's guider runs them --------------------------

FREEU = dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)


def _freeu(handle):
    return mp.freeu(Recorder().ctx, handle, **FREEU)[0]


def _hooked(handle, settings):
    """``handle`` whose network carries FreeU's hooks on every use, put there by hand: the reference the
    loop's FreeU patch must equal."""
    from nodes.families import freeu

    @contextlib.contextmanager
    def use():
        with handle.unet() as unet, freeu.applied(unet, settings):
            yield unet

    return dataclasses.replace(handle, _use_unet=use)


def test_a_network_patch_on_model_runs_on_both_networks(sd1, model, other):
    """FreeU on model equals FreeU hooked by hand on both networks (ComfyUI hands model's options to the
    negative pass), not on the positive one alone; FreeU on model_negative alone is not used."""
    settings = _freeu(model).patches.freeu
    ctx = Recorder().ctx

    def run(positive_model, negative_model):
        return _sample(sd1, dm.dual_model_guider(ctx, model=positive_model, positive=sd1.pos, cfg=CFG,
                                                 model_negative=negative_model, negative=sd1.neg)[0])

    plain = run(model, other)
    scale = plain.abs().max().item()
    on_model, on_both = run(_freeu(model), other), run(_freeu(model), _freeu(other))
    both_by_hand = run(_hooked(model, settings), _hooked(other, settings))
    positive_by_hand = run(_hooked(model, settings), other)
    for ours in (on_model, on_both):
        assert (ours - both_by_hand).abs().max().item() <= 1e-6 * scale
    assert (on_model - plain).abs().max().item() > 1e-3 * scale  # the patch acts
    assert (on_model - positive_by_hand).abs().max().item() > 1e-3 * scale  # and reaches the negative pass
    assert (run(model, _freeu(other)) - plain).abs().max().item() <= 1e-6 * scale  # model_negative's: unused


def test_the_node_says_a_patch_on_model_negative_alone_is_not_used(sd1, model, other):
    for positive_model, negative_model, said in ((_freeu(model), other, False), (model, _freeu(other), True),
                                                 (_freeu(model), _freeu(other), False)):
        rec = Recorder()
        dm.dual_model_guider(rec.ctx, model=positive_model, positive=sd1.pos, cfg=CFG, model_negative=negative_model,
                             negative=sd1.neg)
        assert any("FreeU on model_negative is not used" in m for m in rec.messages) == said


def test_one_loaded_network_on_both_inputs_is_patched_once(sd1):
    """model and model_negative over one module: the same MODEL (here with its attention scaled, a weight
    patch like a LoRA) is CFGGuider on it, its patch applied once, not once per input; MODELs that patch
    that one module with two sets of weights are refused naming model_negative; FreeU on model alone
    runs on the one network, as CFGGuider with it."""
    from nodes import attention_multiply as am

    ctx = Recorder().ctx
    scaled, = am.unet_self_attention_multiply(ctx, sd1.model, q=1.5, k=1.0, v=1.0, out=1.0)
    ours, want, plain = _same_model_runs(sd1, scaled)
    assert (ours - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (want - plain).abs().max().item() > 0.1
    (guider,) = dm.dual_model_guider(ctx, model=scaled, positive=sd1.pos, cfg=CFG, model_negative=sd1.model,
                                     negative=sd1.neg)
    with pytest.raises(NodeError) as err:
        _sample(sd1, guider)
    assert err.value.input_name == "model_negative" and "one network" in str(err.value)
    freeu_model = _freeu(sd1.model)
    (guider,) = dm.dual_model_guider(ctx, model=freeu_model, positive=sd1.pos, cfg=CFG, model_negative=sd1.model,
                                     negative=sd1.neg)
    with_freeu = _sample(sd1, cs.cfg_guider(ctx, freeu_model, sd1.pos, sd1.neg, CFG)[0])
    assert (_sample(sd1, guider) - with_freeu).abs().max().item() <= 1e-5 * with_freeu.abs().max().item()
    assert (with_freeu - plain).abs().max().item() > 0.1  # FreeU acts


def test_sampling_level_patches_on_model_negative_alone_are_refused(sd1, other):
    """DifferentialDiffusion acts on the whole run (the noise mask's hold), not on one network: ComfyUI's
    guider reads it from model only, so on model_negative alone it is refused, as the guidance patches are."""
    blended, = mp.differential_diffusion(Recorder().ctx, other, 1.0)
    with pytest.raises(NodeError) as err:
        _guider(sd1, sd1.model, blended)
    assert err.value.input_name == "model_negative"
    _guider(sd1, mp.differential_diffusion(Recorder().ctx, sd1.model, 1.0)[0], other)
