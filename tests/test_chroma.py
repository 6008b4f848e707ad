"""Chroma on a tiny random model: Kiln's nodes against diffusers' Chroma pipelines.

Kiln encodes the prompts itself (its CLIP handle over the same T5) and samples with KSampler
(cfg > 1, a negative prompt); diffusers runs ChromaPipeline / ChromaImg2ImgPipeline from the
raw prompts. The decoded images must agree within 1/255 per pixel. As in tests/test_flux.py,
both img2img sides get the same init latent (diffusers takes a 16-channel "image" as the
latent). Each parity test also checks that what it varies changes the result.
"""
from __future__ import annotations

import pytest
import torch

import tiny_chroma
import tiny_models
from flow_family_files import clip_over, model_over, pipeline_images
from node_call import Recorder
from nodes.families import chroma
from nodes.handles import ClipHandle, ModelHandle
from nodes.latent import add_noise
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red barn in a field"
NEGATIVE = "blurry, low quality"


def _model() -> ModelHandle:
    return model_over(chroma.FAMILY, tiny_chroma.components()["transformer"])


def _clip(padding: tuple[int, int] | None = None) -> ClipHandle:
    parts = tiny_chroma.components()
    return clip_over(chroma.FAMILY, parts["tokenizer"], parts["text_encoder"], t5_padding=padding)


def _decode(raw: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(tiny_chroma.components()["vae"], raw)


def _init_raw() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 + 0.1159


def kiln(prompt: str, negative: str, cfg: float, *, strength: float | None = None, steps: int = 4, seed: int = 5,
         clip: ClipHandle | None = None, scheduler: str = "normal") -> torch.Tensor:
    clip = clip or _clip()
    positive, negative_cond = clip.encode(prompt), clip.encode(negative)
    model = _model()
    if strength is None:
        latent = {"samples": torch.zeros(1, 16, 8, 8)}
    else:
        (latent,) = add_noise(Recorder().ctx, model, {"samples": _init_raw()}, strength=strength, seed=seed)
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", scheduler, positive, negative_cond, latent)
    return _decode(out["samples"])


def diffusers(prompt: str, negative: str, cfg: float, *, strength: float | None = None, steps: int = 4,
              seed: int = 5) -> torch.Tensor:
    kwargs = {"prompt": prompt, "negative_prompt": negative, "height": 64, "width": 64, "num_inference_steps": steps,
              "guidance_scale": cfg, "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    img2img = None
    if strength is not None:  # unlike FLUX's, this pipeline resizes its input before it checks for a latent
        from diffusers import ChromaImg2ImgPipeline as img2img

        kwargs |= {"image": chroma.FAMILY.latent.to_model(_init_raw()), "strength": strength}
    return pipeline_images(tiny_chroma.pipeline, img2img, **kwargs).permute(0, 2, 3, 1)


def test_txt2img_with_cfg_and_negative_equals_chroma_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 4.0)
    theirs = diffusers(PROMPT, NEGATIVE, 4.0)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln("a blue car on a road", NEGATIVE, 4.0)).abs().max() > 0.02  # the prompt matters
    assert (ours - kiln(PROMPT, "", 4.0)).abs().max() > 0.005  # so does the negative (real CFG)


def test_img2img_equals_chroma_img2img_pipeline():
    ours = kiln(PROMPT, NEGATIVE, 3.0, strength=0.6, steps=6, seed=42)
    theirs = diffusers(PROMPT, NEGATIVE, 3.0, strength=0.6, steps=6, seed=42)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    other = kiln(PROMPT, NEGATIVE, 3.0, strength=0.3, steps=6, seed=42)
    assert (ours - other).abs().max() > 0.02  # strength matters


def test_the_text_mask_matters():
    """Without the mask (T5 attending to padding, the transformer to all 512 tokens) the image differs
    beyond the tolerance, so the parity above depends on carrying the mask as diffusers does."""
    cond = _clip().encode(PROMPT)
    mask = cond[0][1][chroma.MASK]
    count = len(tiny_chroma.components()["tokenizer"](PROMPT).input_ids)  # the prompt and its end token
    assert mask.shape == (1, chroma.T5_TOKENS) and int(mask.sum()) == count + 1  # one padding token kept
    ours = kiln(PROMPT, NEGATIVE, 4.0)
    real = chroma.Chroma.encode_text

    def unmasked(self, clip, text, report=None, texts=None):
        out = real(self, clip, text, report, texts)
        out[0][1].pop(chroma.MASK)
        return out

    chroma.Chroma.encode_text = unmasked
    try:
        plain = kiln(PROMPT, NEGATIVE, 4.0)
    finally:
        chroma.Chroma.encode_text = real
    assert (ours - plain).abs().max() > 4 / 255


def test_comfy_padding_encodes_without_mask_and_one_pad_token():
    """T5TokenizerOptions (ComfyUI's Chroma template: min_padding 1, min_length 0): the prompt, its end
    token and one pad token, no mask, as ComfyUI's PixArt T5 encoder gives them."""
    tok = tiny_chroma.components()["tokenizer"]
    ids = tok(PROMPT).input_ids
    cond = _clip((1, 0)).encode(PROMPT)
    states, extra = cond[0]
    assert states.shape[1] == len(ids) + 1 and chroma.MASK not in extra
    t5 = tiny_chroma.components()["text_encoder"]
    with torch.no_grad():
        want = t5(torch.tensor([ids + [tok.pad_token_id]]))[0]
    assert torch.equal(states, want.float())
    image = kiln(PROMPT, NEGATIVE, 4.0, clip=_clip((1, 0)))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_flux_guidance_on_chroma_is_a_note_not_an_input():
    clip = _clip()
    positive = [[e, {**x, "guidance": 3.5}] for e, x in clip.encode(PROMPT)]
    notes = chroma.FAMILY.conditioning_notes([positive])
    assert len(notes) == 1 and "guidance 3.5 is ignored" in notes[0] and "Chroma" in notes[0]
    assert chroma.FAMILY.conditioning_notes([clip.encode(PROMPT)]) == []
    rec = Recorder()
    (out,) = ksampler(rec.ctx, _model(), 5, 2, 4.0, "euler", "normal", positive, clip.encode(NEGATIVE),
                      {"samples": torch.zeros(1, 16, 8, 8)})
    assert any("Chroma has no distilled guidance" in m for m in rec.messages)


def test_detection_claims_chroma_and_not_flux():
    import tiny_flux
    from nodes import families
    from nodes.checkpoint.flux_keys import diffusers_to_bfl

    diffusers_shapes = {k: tuple(v.shape) for k, v in tiny_chroma.components()["transformer"].state_dict().items()}
    assert families.for_unet(diffusers_shapes) is chroma.FAMILY
    original = {"distilled_guidance_layer.in_proj.weight": (5120, 64), "double_blocks.0.img_attn.qkv.weight": (1, 1)}
    assert families.for_unet(original) is chroma.FAMILY
    assert families.for_unet({"model.diffusion_model." + k: v for k, v in original.items()}) is chroma.FAMILY
    flux_shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(
        tiny_flux.components("dev")["transformer"].state_dict()).items()}
    assert families.for_unet(flux_shapes).name == "flux"
    assert families.for_folder({"transformer", "text_encoder", "vae"}, "") is chroma.FAMILY
    assert families.for_folder({"transformer", "text_encoder", "text_encoder_2", "vae"}, "").name == "flux"


def test_chroma_text_width_mismatch_names_the_input():
    from nodes.families.base import ConditioningError

    net = chroma.FAMILY.wrap_network(tiny_chroma.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 77, 768))
    assert err.value.input_name == "positive" and "CLIPLoader type chroma" in str(err.value)


def test_prompt_weights_scale_their_tokens_and_keep_the_rest_as_diffusers_encodes_it():
    """ComfyUI's weight syntax on Chroma's T5 (nodes.families.t5_weights, with the same T5 mask): the
    weighted word's tokens move, every other token keeps the unweighted (masked) encoding exactly."""
    tok = tiny_chroma.components()["tokenizer"]
    plain = _clip().encode("a red barn in a field")[0]
    weighted = _clip().encode("a red (barn:1.4) in a field")[0]
    assert torch.equal(plain[1][chroma.MASK], weighted[1][chroma.MASK])
    before = len(tok("a red", add_special_tokens=False).input_ids)
    barn = len(tok("barn", add_special_tokens=False).input_ids)
    moved = (plain[0] - weighted[0]).abs().amax(dim=-1)[0]
    assert torch.equal(plain[0][:, :before], weighted[0][:, :before])
    assert float(moved[before:before + barn].min()) > 1e-3
    assert float(moved[before + barn:].max()) == 0.0


def test_a_batch_carries_each_rows_mask():
    """Two images at once (the prompts' masks expanded per row, positive and negative): the first equals
    the image sampled alone."""
    clip = _clip()
    positive, negative = clip.encode(PROMPT), clip.encode("")
    outs = []
    for batch in (1, 2):
        (out,) = ksampler(Recorder().ctx, _model(), 5, 3, 4.0, "euler", "normal", positive, negative,
                          {"samples": torch.zeros(batch, 16, 8, 8)})
        outs.append(_decode(out["samples"]))
    assert outs[1].shape[0] == 2 and (outs[1][:1] - outs[0]).abs().max() <= PIXEL_TOL
    assert (outs[1][0] - outs[1][1]).abs().max() > 0.02  # the second image has its own noise


def test_concatenated_prompts_run_and_an_unfit_mask_names_the_input():
    from nodes.conditioning_nodes import conditioning_concat
    from nodes.families.base import ConditioningError

    clip = _clip()
    (joined,) = conditioning_concat(Recorder().ctx, clip.encode(PROMPT), clip.encode("at night"))
    assert joined[0][0].shape[1] == 2 * chroma.T5_TOKENS
    (out,) = ksampler(Recorder().ctx, _model(), 5, 2, 4.0, "euler", "normal", joined, clip.encode(NEGATIVE),
                      {"samples": torch.zeros(1, 16, 8, 8)})
    assert torch.isfinite(out["samples"]).all()
    net = chroma.FAMILY.wrap_network(tiny_chroma.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 700, tiny_chroma.TEXT),
            text_mask=torch.ones(1, chroma.T5_TOKENS))
    assert err.value.input_name == "positive" and "text mask" in str(err.value)
