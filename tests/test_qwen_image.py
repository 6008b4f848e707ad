"""Qwen-Image on a tiny random model: Kiln's nodes against diffusers' Qwen-Image pipelines.

Kiln encodes the prompts itself (its CLIP handle over the tiny Qwen2.5-VL's language model) and
samples with KSampler (cfg > 1, a negative prompt); diffusers runs QwenImagePipeline /
QwenImageImg2ImgPipeline from the raw prompts with true_cfg_scale. The decoded images must agree
within 1/255 per pixel. Both img2img sides start from the same init latent. Each parity test also
checks that what it varies changes the result.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_qwen_image
from flow_family_files import clip_over, model_over, pipeline_images
from node_call import Recorder
from nodes.checkpoint.qwen_image_vae import FrameVAE
from nodes.families import qwen_image
from nodes.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.latent import add_noise
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red barn in a field"
NEGATIVE = "blurry, low quality"
SIZE = 64


def _model() -> ModelHandle:
    return model_over(qwen_image.FAMILY, tiny_qwen_image.components()["transformer"])


def _clip() -> ClipHandle:
    parts = tiny_qwen_image.components()
    return clip_over(qwen_image.FAMILY, parts["tokenizer"], parts["text_encoder"].model.language_model)


def _vae() -> VaeHandle:
    frame = FrameVAE(tiny_qwen_image.components()["vae"])
    return VaeHandle(latent_scale=1.0, _use_vae=lambda: contextlib.nullcontext(frame), latent_channels=16)


def _init_raw() -> torch.Tensor:
    """A real image's latent (the posterior mean of a random image through the tiny VAE)."""
    g = torch.Generator().manual_seed(7)
    return _vae().encode(torch.rand(1, SIZE, SIZE, 3, generator=g))


def kiln(prompt: str, negative: str, cfg: float, *, strength: float | None = None, steps: int = 4,
         seed: int = 5) -> torch.Tensor:
    clip, model, vae = _clip(), _model(), _vae()
    positive, negative_cond = clip.encode(prompt), clip.encode(negative)
    if strength is None:
        latent = {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}
    else:
        (latent,) = add_noise(Recorder().ctx, model, {"samples": _init_raw()}, strength=strength,
                              seed=seed)
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", "normal", positive, negative_cond, latent)
    return vae.decode(out["samples"])


def diffusers(prompt: str, negative: str, cfg: float, *, strength: float | None = None, steps: int = 4,
              seed: int = 5) -> torch.Tensor:
    kwargs = {"prompt": prompt, "negative_prompt": negative, "height": SIZE, "width": SIZE,
              "num_inference_steps": steps, "true_cfg_scale": cfg, "generator": torch.Generator().manual_seed(seed),
              "output_type": "pt"}
    img2img = None
    if strength is not None:  # a 16-channel "image" is taken as the model-space latent
        from diffusers import QwenImageImg2ImgPipeline as img2img

        kwargs |= {"image": qwen_image.FAMILY.latent.to_model(_init_raw()), "strength": strength}
    return pipeline_images(tiny_qwen_image.pipeline, img2img, **kwargs).permute(0, 2, 3, 1)


def test_txt2img_with_true_cfg_and_negative_equals_qwen_image_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 4.0)
    theirs = diffusers(PROMPT, NEGATIVE, 4.0)
    print("txt2img max diff", float((ours - theirs).abs().max()))
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln("a blue car on a road", NEGATIVE, 4.0)).abs().max() > 0.02  # the prompt matters
    assert (ours - kiln(PROMPT, "", 4.0)).abs().max() > 0.005  # so does the negative (real CFG)


def test_img2img_equals_qwen_image_img2img_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 3.0, strength=0.6, steps=6, seed=42)
    theirs = diffusers(PROMPT, NEGATIVE, 3.0, strength=0.6, steps=6, seed=42)
    print("img2img max diff", float((ours - theirs).abs().max()))
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    other = kiln(PROMPT, NEGATIVE, 3.0, strength=0.3, steps=6, seed=42)
    assert (ours - other).abs().max() > 0.02  # strength matters


def test_the_true_cfg_renorm_matters():
    """Without diffusers' per-token renormalisation of the guided velocity the image differs beyond
    the tolerance, so the parity above depends on it."""
    ours = kiln(PROMPT, NEGATIVE, 4.0)
    real = qwen_image.QwenImage.combine_guidance
    qwen_image.QwenImage.combine_guidance = lambda self, guided, cond: guided
    try:
        plain = kiln(PROMPT, NEGATIVE, 4.0)
    finally:
        qwen_image.QwenImage.combine_guidance = real
    assert (ours - plain).abs().max() > 2 / 255  # measured 0.011


def test_encoding_drops_the_template_and_width_mismatch_names_the_input():
    from nodes.families.base import ConditioningError

    tok = tiny_qwen_image.components()["tokenizer"]
    states, extra = _clip().encode(PROMPT)[0]
    count = len(tok(qwen_image.TEMPLATE.format(PROMPT)).input_ids) - qwen_image.TEMPLATE_TOKENS
    assert states.shape == (1, count, tiny_qwen_image.TEXT) and bool(extra[qwen_image.MASK].all())
    head = tok(qwen_image.TEMPLATE.format(PROMPT)).input_ids[:qwen_image.TEMPLATE_TOKENS]
    assert tok.decode(head).endswith("<|im_start|>user\n")  # ComfyUI's cut: up to the user turn
    net = qwen_image.FAMILY.wrap_network(tiny_qwen_image.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 7, 4096))
    assert err.value.input_name == "positive" and "qwen_image" in str(err.value)


def test_detection_claims_qwen_image_in_both_prefixes():
    from nodes import families

    shapes = {k: tuple(v.shape) for k, v in tiny_qwen_image.components()["transformer"].state_dict().items()}
    assert families.for_unet(shapes) is qwen_image.FAMILY
    assert families.for_unet({"model.diffusion_model." + k: v for k, v in shapes.items()}) is qwen_image.FAMILY


def test_a_negative_twice_the_prompts_length_is_not_repeated_into_one_call():
    """Kiln repeats a short prompt to share a call with one a small multiple as long (ComfyUI's rule,
    exact where text has no positions). Qwen-Image's text tokens have rotary positions, so a repeated
    prompt would change the image: its prompts of other lengths are evaluated apart, as diffusers does."""
    tok = tiny_qwen_image.components()["tokenizer"]

    def length(text: str) -> int:
        return len(tok(qwen_image.TEMPLATE.format(text)).input_ids) - qwen_image.TEMPLATE_TOKENS

    negative = "blurry"
    while length(negative) < 2 * length(PROMPT):
        negative += " blurry"
    assert length(negative) == 2 * length(PROMPT)
    ours, theirs = kiln(PROMPT, negative, 4.0), diffusers(PROMPT, negative, 4.0)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    qwen_image.QwenImage.repeats_text = True
    try:
        repeated = kiln(PROMPT, negative, 4.0)
    finally:
        qwen_image.QwenImage.repeats_text = False
    assert (repeated - theirs).abs().max() > 4 / 255  # measured 17.5/255: the rule is what keeps parity


def test_a_batch_of_two_starts_with_the_image_sampled_alone():
    clip = _clip()
    positive, negative = clip.encode(PROMPT), clip.encode(NEGATIVE)
    outs = []
    for batch in (1, 2):
        (out,) = ksampler(Recorder().ctx, _model(), 5, 3, 4.0, "euler", "normal", positive, negative,
                          {"samples": torch.zeros(batch, 16, 8, 8)})
        outs.append(_vae().decode(out["samples"]))
    assert outs[1].shape[0] == 2 and (outs[1][:1] - outs[0]).abs().max() <= PIXEL_TOL
    assert (outs[1][0] - outs[1][1]).abs().max() > 0.02  # the second image has its own noise
