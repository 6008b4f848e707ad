"""PerturbedAttentionGuidance (nodes/families/perturbed.py, nodes/model_patches.py): on the tiny
SD1, Kiln's txt2img equals diffusers' StableDiffusionPAGPipeline with the middle block perturbed,
with and without classifier-free guidance, and the network's attention is left as it was."""
from __future__ import annotations

import pytest
import torch

from engine.context import NodeError
from nodes.latent import empty_latent_image
from nodes.model_patches import perturbed_attention_guidance
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL, Recorder, sd1  # noqa: F401 (a fixture)


def _diffusers(tiny, cfg: float, pag: float):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(**tiny.parts, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    embeds = tiny.embeds if cfg > 1 else {"prompt_embeds": tiny.embeds["prompt_embeds"]}
    images = pipe(height=64, width=64, num_inference_steps=6, guidance_scale=cfg, pag_scale=pag, output_type="pt",
                  generator=torch.Generator().manual_seed(5), **embeds).images
    return images.permute(0, 2, 3, 1)


def _kiln(tiny, model, cfg: float):
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, 5, 6, cfg, "euler", "normal", tiny.pos, tiny.neg, empty)
    return tiny.decode(out["samples"])


@pytest.mark.parametrize("cfg", [6.0, 1.0])
def test_it_equals_diffusers_pag_pipeline(sd1, cfg):
    (patched,) = perturbed_attention_guidance(Recorder().ctx, sd1.model, 3.0)
    ours = _kiln(sd1, patched, cfg)
    assert (ours - _diffusers(sd1, cfg, 3.0)).abs().max().item() <= PIXEL_TOL
    assert (ours - _kiln(sd1, sd1.model, cfg)).abs().max().item() > 0.01  # the guidance changed the image
    processors = {type(m.processor).__name__ for n, m in sd1.parts["unet"].named_modules() if n.endswith("attn1")}
    assert "IdentitySelfAttention" not in processors  # restored after every step


def test_a_flow_model_and_a_negative_scale_are_refused(sd1):
    from test_flux import _model

    with pytest.raises(NodeError) as err:
        perturbed_attention_guidance(Recorder().ctx, _model("dev"), 3.0)
    assert err.value.input_name == "model" and "middle block" in str(err.value)
    with pytest.raises(NodeError) as err:
        perturbed_attention_guidance(Recorder().ctx, sd1.model, -1.0)
    assert err.value.input_name == "scale"
