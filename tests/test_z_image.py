"""Z-Image on a tiny random model: Kiln's family against diffusers' Z-Image pipelines.

Kiln encodes the prompts itself (its CLIP handle over the same Qwen3, the template written by
nodes.families.z_image) and samples with KSampler; diffusers runs ZImagePipeline /
ZImageImg2ImgPipeline from the raw prompts (the tokenizer given a chat template rendering one user
turn as Qwen3's does). diffusers' guidance_scale g is Kiln's cfg g + 1 (Turbo: cfg 1, guidance 0).
The decoded images must agree within 1/255 per pixel; each test also shows what it varies matters.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models
import tiny_z_image
from flow_family_files import clip_over, model_over, pipeline_images
from node_call import Recorder
from nodes.families import z_image
from nodes.handles import ClipHandle, ModelHandle
from nodes.latent import add_noise
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red barn in a field"
NEGATIVE = "blurry, low quality, extra fingers"


def _model() -> ModelHandle:
    return model_over(z_image.FAMILY, tiny_z_image.components()["transformer"])


def _clip() -> ClipHandle:
    parts = tiny_z_image.components()
    return clip_over(z_image.FAMILY, parts["tokenizer"], parts["text_encoder"])


def _init_raw() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 + 0.1159


def kiln(prompt: str, negative: str, cfg: float, *, strength: float | None = None, steps: int = 4, seed: int = 5,
         sampler: str = "euler") -> torch.Tensor:
    clip = _clip()
    model = _model()
    if strength is None:
        latent = {"samples": torch.zeros(1, 16, 8, 8)}
    else:
        (latent,) = add_noise(Recorder().ctx, model, {"samples": _init_raw()}, strength=strength, seed=seed)
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, sampler, "simple", clip.encode(prompt),
                      clip.encode(negative), latent)
    return tiny_models.decode(tiny_z_image.components()["vae"], out["samples"])


def diffusers(prompt: str, negative: str, cfg: float, *, strength: float | None = None, steps: int = 4,
              seed: int = 5) -> torch.Tensor:
    kwargs = {"prompt": prompt, "negative_prompt": negative, "height": 64, "width": 64, "num_inference_steps": steps,
              "guidance_scale": cfg - 1.0, "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    img2img = None
    if strength is not None:  # a 16-channel latent passes through
        from diffusers import ZImageImg2ImgPipeline as img2img

        kwargs |= {"image": z_image.FAMILY.latent.to_model(_init_raw()), "strength": strength}
    return pipeline_images(tiny_z_image.pipeline, img2img, **kwargs).permute(0, 2, 3, 1)


def test_prompt_encoding_is_the_pipelines_layer_without_padding():
    pipe = tiny_z_image.pipeline()
    with torch.no_grad():
        (theirs,) = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    states, extra = _clip().encode(PROMPT)[0]
    assert states.shape == (1, theirs.shape[0], 48) and extra[z_image.TOKENS] == theirs.shape[0]
    assert torch.allclose(states[0], theirs, atol=1e-5)
    tok = tiny_z_image.components()["tokenizer"]
    ids = tok(z_image.TEMPLATE.format(PROMPT)).input_ids
    rendered = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
    assert rendered == z_image.TEMPLATE.format(PROMPT) and len(ids) == theirs.shape[0]


def test_turbo_txt2img_at_cfg_1_equals_z_image_pipeline():
    ours = kiln(PROMPT, "", 1.0)
    theirs = diffusers(PROMPT, "", 1.0)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln("a blue car on a road", "", 1.0)).abs().max() > 0.02  # the prompt matters
    assert (ours - kiln(PROMPT, "", 1.0, seed=6)).abs().max() > 0.02  # and the seed


def test_txt2img_with_cfg_and_negative_equals_z_image_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 4.0)
    theirs = diffusers(PROMPT, NEGATIVE, 4.0)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, "", 4.0)).abs().max() > 0.005  # the negative matters (real CFG)
    assert (ours - kiln(PROMPT, NEGATIVE, 1.0)).abs().max() > 0.005  # and cfg


def test_img2img_equals_z_image_img2img_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 3.0, strength=0.6, steps=6, seed=42)
    theirs = diffusers(PROMPT, NEGATIVE, 3.0, strength=0.6, steps=6, seed=42)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, NEGATIVE, 3.0, strength=0.3, steps=6, seed=42)).abs().max() > 0.02  # strength


def test_the_token_count_keeps_padding_out_of_the_network():
    """A 16-token prompt and the empty negative (8 tokens) share a call, the negative repeated twice
    (ComfyUI's rule); the token count gives each row its own tokens, as diffusers' lists do. Without it
    the negative's row would read the repeat as more caption and the image would move."""
    prompt = "blurry, low quality, extra fingers"  # 16 tokens templated, the empty prompt 8
    tok = tiny_z_image.components()["tokenizer"]
    assert [len(tok(z_image.TEMPLATE.format(p)).input_ids) for p in (prompt, "")] == [16, 8]
    ours = kiln(prompt, "", 4.0)
    assert (ours - diffusers(prompt, "", 4.0)).abs().max() <= PIXEL_TOL
    real = z_image.ZImage.network_kwargs
    z_image.ZImage.network_kwargs = lambda self, *a, **k: {}
    try:
        plain = kiln(prompt, "", 4.0)
    finally:
        z_image.ZImage.network_kwargs = real
    assert (ours - plain).abs().max() > 2 / 255


def test_res_multistep_the_templates_sampler_runs():
    image = kiln(PROMPT, "", 1.0, sampler="res_multistep", steps=8)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert (image - kiln(PROMPT, "", 1.0, steps=8)).abs().max() > 1 / 255  # a different sampler than euler


def test_concatenated_prompts_reach_the_network_whole():
    """ConditioningConcat appends the second prompt's tokens; they are caption tokens too (diffusers given
    the concatenated states as prompt_embeds), though the count on the conditioning is the first's."""
    from nodes.conditioning_nodes import conditioning_concat

    clip = _clip()
    first, second = clip.encode(PROMPT), clip.encode("at night, stars")
    (joined,) = conditioning_concat(Recorder().ctx, first, second)
    (out,) = ksampler(Recorder().ctx, _model(), 5, 4, 1.0, "euler", "simple", joined, clip.encode(""),
                      {"samples": torch.zeros(1, 16, 8, 8)})
    ours = tiny_models.decode(tiny_z_image.components()["vae"], out["samples"])
    pipe = tiny_z_image.pipeline()
    with torch.no_grad():
        theirs = pipe(prompt_embeds=[joined[0][0][0]], height=64, width=64, num_inference_steps=4, guidance_scale=0.0,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, "", 1.0)).abs().max() > 0.02  # the appended tokens matter
