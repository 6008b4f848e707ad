"""PixArt-Σ and PixArt-α on tiny random models: Kiln's nodes against diffusers' PixArt pipelines.

Kiln encodes the prompts itself (its CLIP handle over the same T5) and samples with KSampler (euler,
normal, cfg > 1, a negative prompt); diffusers runs PixArtSigmaPipeline / PixArtAlphaPipeline from the
raw prompts with its scheduler swapped for EulerDiscreteScheduler on the same config (the pairing of
the SD parity tests, tests/test_workflows_end_to_end.py), resolution binning and caption cleaning off.
The decoded images must agree within 1/255 per pixel; each test also checks that what it varies
changes the result. diffusers has no PixArt img2img pipeline, so img2img (AddNoise + KSampler at a
denoise) is checked to run and to depend on its strength, not against a reference.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models
import tiny_pixart
from flow_family_files import clip_over, model_over
from node_call import Recorder
from nodes.families import pixart
from nodes.latent import add_noise
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "A Red Barn in a field"
NEGATIVE = "blurry, low quality"
SIZE = 64


def _family(variant: str):
    return pixart.SIGMA if variant == "sigma" else pixart.ALPHA


def _model(variant: str):
    return model_over(_family(variant), tiny_pixart.components(variant)["transformer"])


def _clip(variant: str, padding: tuple[int, int] | None = None):
    parts = tiny_pixart.components(variant)
    return clip_over(_family(variant), parts["tokenizer"], parts["text_encoder"], t5_padding=padding)


def kiln(variant: str, prompt: str, negative: str, cfg: float, *, seed: int = 5, steps: int = 4,
         height: int = SIZE, width: int = SIZE, strength: float | None = None, clip=None) -> torch.Tensor:
    clip = clip or _clip(variant)
    model = _model(variant)
    latent = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
    denoise = 1.0
    if strength is not None:
        init = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(7)) * 4
        (latent,) = add_noise(Recorder().ctx, model, {"samples": init}, strength=strength, seed=seed)
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", "normal", clip.encode(prompt),
                      clip.encode(negative), latent, denoise)
    return tiny_models.decode(tiny_pixart.components(variant)["vae"], out["samples"])


def diffusers(variant: str, prompt: str, negative: str, cfg: float, *, seed: int = 5, steps: int = 4,
              height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    pipe = tiny_pixart.pipeline(variant)
    with torch.no_grad():
        images = pipe(prompt=prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
                      guidance_scale=cfg, generator=torch.Generator().manual_seed(seed), output_type="pt",
                      use_resolution_binning=False, clean_caption=False).images
    return images.permute(0, 2, 3, 1)


@pytest.mark.parametrize("variant", ["sigma", "alpha", "alpha512"])
def test_txt2img_equals_the_pixart_pipeline(variant):
    ours = kiln(variant, PROMPT, NEGATIVE, 4.5)
    theirs = diffusers(variant, PROMPT, NEGATIVE, 4.5)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(variant, "a blue car on a road", NEGATIVE, 4.5)).abs().max() > 0.02  # the prompt matters
    assert (ours - kiln(variant, PROMPT, NEGATIVE, 4.5, seed=6)).abs().max() > 0.02  # so does the seed


def test_alpha_1024_reads_the_image_size_and_aspect_ratio():
    """A non-square α-1024 image equals the pipeline's (which passes height, width and their ratio), and
    the size conditioning matters: without it the image moves beyond the tolerance."""
    ours = kiln("alpha", PROMPT, NEGATIVE, 4.5, height=64, width=96)
    assert (ours - diffusers("alpha", PROMPT, NEGATIVE, 4.5, height=64, width=96)).abs().max() <= PIXEL_TOL
    net = tiny_pixart.components("alpha")["transformer"]
    real = pixart.PixArtNetwork.__call__

    def sizeless(self, x, t, encoder_hidden_states, return_dict=False, text_mask=None, **kwargs):
        self.transformer.use_additional_conditions = False
        self.transformer.adaln_single.emb.use_additional_conditions = False
        try:
            return real(self, x, t, encoder_hidden_states, return_dict, text_mask, **kwargs)
        finally:
            self.transformer.use_additional_conditions = True
            self.transformer.adaln_single.emb.use_additional_conditions = True

    pixart.PixArtNetwork.__call__ = sizeless
    try:
        plain = kiln("alpha", PROMPT, NEGATIVE, 4.5, height=64, width=96)
    finally:
        pixart.PixArtNetwork.__call__ = real
    assert net.use_additional_conditions
    assert (ours - plain).abs().max() > 2 / 255


def test_the_text_mask_matters():
    """The mask keeps the prompt and its end token; without it (T5 and the cross-attention seeing the
    300 padding tokens) the image differs beyond the tolerance, so the parity depends on it."""
    cond = _clip("sigma").encode(PROMPT)
    mask = cond[0][1][pixart.MASK]
    count = len(tiny_pixart.components("sigma")["tokenizer"](PROMPT.lower()).input_ids)
    assert mask.shape == (1, pixart.SIGMA.t5_tokens) and int(mask.sum()) == count
    assert _clip("alpha").encode(PROMPT)[0][0].shape[1] == pixart.ALPHA.t5_tokens
    ours = kiln("sigma", PROMPT, NEGATIVE, 4.5)
    real = pixart.PixArt.encode_text

    def unmasked(self, clip, text, report=None, texts=None):
        out = real(self, clip, text, report, texts)
        out[0][1].pop(pixart.MASK)
        return out

    pixart.PixArt.encode_text = unmasked
    try:
        plain = kiln("sigma", PROMPT, NEGATIVE, 4.5)
    finally:
        pixart.PixArt.encode_text = real
    assert (ours - plain).abs().max() > 4 / 255


def test_comfy_padding_encodes_as_typed_without_mask():
    """T5TokenizerOptions: ComfyUI's encoding (the prompt as typed, its end token, min_padding pad tokens,
    no mask)."""
    tok = tiny_pixart.components("sigma")["tokenizer"]
    ids = tok(PROMPT).input_ids
    states, extra = _clip("sigma", (1, 0)).encode(PROMPT)[0]
    assert states.shape[1] == len(ids) + 1 and pixart.MASK not in extra
    image = kiln("sigma", PROMPT, NEGATIVE, 4.5, clip=_clip("sigma", (1, 0)))
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()


def test_img2img_runs_and_its_strength_matters():
    strong = kiln("sigma", PROMPT, NEGATIVE, 4.5, strength=0.8, steps=6, seed=42)
    weak = kiln("sigma", PROMPT, NEGATIVE, 4.5, strength=0.3, steps=6, seed=42)
    assert torch.isfinite(strong).all() and (strong - weak).abs().max() > 0.02


def test_learned_sigma_half_is_dropped_and_text_width_is_checked():
    from nodes.families.base import ConditioningError

    net = pixart.SIGMA.wrap_network(tiny_pixart.components("sigma")["transformer"])
    assert net.text_width == tiny_pixart.TEXT
    out = net(torch.zeros(1, 4, 8, 8), torch.tensor(500.0), torch.zeros(1, 7, tiny_pixart.TEXT))[0]
    assert out.shape == (1, 4, 8, 8)
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 4, 8, 8), torch.tensor(500.0), torch.zeros(1, 77, 768))
    assert err.value.input_name == "positive" and "CLIPLoader type pixart" in str(err.value)


def test_detection_tells_sigma_from_alpha_and_from_other_families():
    from nodes import families

    for variant in tiny_pixart.VARIANTS:
        shapes = {k: tuple(v.shape) for k, v in tiny_pixart.original_transformer(variant).items()}
        assert families.for_unet(shapes) is _family(variant)
        assert families.for_unet({"model.diffusion_model." + k: v for k, v in shapes.items()}) is _family(variant)
        diff = {k: tuple(v.shape) for k, v in tiny_pixart.components(variant)["transformer"].state_dict().items()}
        assert families.for_unet(diff) is (pixart.ALPHA if variant == "alpha" else pixart.SIGMA)
    assert families.for_folder({"text_encoder", "unet", "vae"}, "quick_gelu").name == "sd1"
    assert pixart.SIGMA.scheduler_config()["beta_schedule"] == "linear"
    assert pixart.SIGMA.latent.scale == 0.13025 and pixart.ALPHA.latent.scale == 0.18215


def test_a_batch_carries_each_rows_mask_and_size():
    """Two α-1024 images at once (masks and size conditioning expanded per row): the first equals the
    image sampled alone, the second has its own noise."""
    clip = _clip("alpha")
    positive, negative = clip.encode(PROMPT), clip.encode("")
    outs = []
    for batch in (1, 2):
        (out,) = ksampler(Recorder().ctx, _model("alpha"), 5, 3, 4.5, "euler", "normal", positive, negative,
                          {"samples": torch.zeros(batch, 4, 8, 12)})
        outs.append(tiny_models.decode(tiny_pixart.components("alpha")["vae"], out["samples"]))
    assert outs[1].shape[0] == 2 and (outs[1][:1] - outs[0]).abs().max() <= PIXEL_TOL
    assert (outs[1][0] - outs[1][1]).abs().max() > 0.02
