"""SelfAttentionGuidance (nodes/families/self_attention.py): on the tiny SD1, Kiln's txt2img equals
diffusers' StableDiffusionSAGPipeline (DDIM, whose SAG reads the sample it is given as a
variance-preserving one), and the network's attention is left as it was. ComfyUI's formula,
on clean-latent predictions, is diffusers' on noise predictions for an epsilon model; diffusers
blurs with sigma 1 always, so the parity run sets blur_sigma 1."""
from __future__ import annotations

import pytest
import torch

from engine.context import NodeError
from nodes.latent import empty_latent_image
from nodes.model_patches import self_attention_guidance
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL, Recorder, sd1, sd2v  # noqa: F401 (fixtures)


def _diffusers(tiny, cfg: float, scale: float):
    from diffusers import DDIMScheduler, StableDiffusionSAGPipeline

    pipe = StableDiffusionSAGPipeline(**tiny.parts, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(height=64, width=64, num_inference_steps=6, guidance_scale=cfg, sag_scale=scale, output_type="pt",
                  generator=torch.Generator().manual_seed(5), **tiny.embeds).images
    return images.permute(0, 2, 3, 1)


def _kiln(tiny, model, cfg: float, sampler: str = "ddim"):
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, 5, 6, cfg, sampler, "normal", tiny.pos, tiny.neg, empty)
    return tiny.decode(out["samples"])


def test_it_equals_diffusers_sag_pipeline(sd1):
    (patched,) = self_attention_guidance(Recorder().ctx, sd1.model, 0.75, 1.0)
    ours = _kiln(sd1, patched, 6.0)
    assert (ours - _diffusers(sd1, 6.0, 0.75)).abs().max().item() <= PIXEL_TOL
    assert (ours - _kiln(sd1, sd1.model, 6.0)).abs().max().item() > 0.01  # the guidance changed the image
    processors = {type(m.processor).__name__ for n, m in sd1.parts["unet"].named_modules() if n.endswith("attn1")}
    assert "RecordingSelfAttention" not in processors  # restored after every evaluation


def test_zero_scale_or_blur_is_the_model_itself_and_cfg_1_still_guides(sd1):
    plain = _kiln(sd1, sd1.model, 6.0, "euler")
    for scale, blur in ((0.0, 2.0), (0.5, 0.0)):
        (patched,) = self_attention_guidance(Recorder().ctx, sd1.model, scale, blur)
        assert torch.equal(_kiln(sd1, patched, 6.0, "euler"), plain)
    (patched,) = self_attention_guidance(Recorder().ctx, sd1.model, 0.5, 2.0)
    # as ComfyUI's: the unconditional side is read at cfg 1 too
    assert (_kiln(sd1, patched, 1.0, "euler") - _kiln(sd1, sd1.model, 1.0, "euler")).abs().max().item() > 0.01


def test_a_v_prediction_model_is_guided_on_its_clean_predictions(sd2v):
    (patched,) = self_attention_guidance(Recorder().ctx, sd2v.model, 0.5, 2.0)
    guided, plain = _kiln(sd2v, patched, 6.0, "euler"), _kiln(sd2v, sd2v.model, 6.0, "euler")
    assert torch.isfinite(guided).all() and (guided - plain).abs().max().item() > 0.01


def test_refusals_name_their_input(sd1):
    from test_flux import _model

    with pytest.raises(NodeError) as err:
        self_attention_guidance(Recorder().ctx, _model("dev"), 0.5, 2.0)
    assert err.value.input_name == "model" and "middle block" in str(err.value)
    for name, args in (("scale", (6.0, 2.0)), ("blur_sigma", (0.5, -1.0))):
        with pytest.raises(NodeError) as err:
            self_attention_guidance(Recorder().ctx, sd1.model, *args)
        assert err.value.input_name == name


def test_custom_sampling_carries_it_and_dual_cfg_refuses_it(sd1):
    """CFGGuider's run is guided by the patched model too; DualCFGGuider, whose guidance is not one
    CFG pair, refuses it naming the model."""
    from test_dual_cfg_guider import _cfg, _dual

    (patched,) = self_attention_guidance(Recorder().ctx, sd1.model, 0.5, 2.0)
    plain = _cfg(sd1, sd1.pos, sd1.neg, 6.0)
    assert (_cfg(sd1, sd1.pos, sd1.neg, 6.0, model=patched) - plain).abs().max().item() > 0.01
    with pytest.raises(NodeError) as err:
        _dual(sd1, sd1.pos, sd1.neg, sd1.neg, "regular", model=patched)
    assert err.value.input_name == "guider" and "DualCFGGuider" in str(err.value)
