"""FLUX.2 [klein] on a tiny random model: Kiln's nodes against diffusers' Flux2KleinPipeline.

Kiln encodes the prompts itself (its CLIP handle over the same Qwen3), samples with KSampler and
decodes with its VAE handle over the FLUX.2 VAE (patch latent, batch-norm statistics); diffusers
runs Flux2KleinPipeline from the raw prompts. The decoded images must agree within 1/255 per
pixel, distilled (cfg 1, one pass) and base (cfg > 1, negative ""). The reference-image edit
path is compared too: Kiln's VAEEncode + ReferenceLatent against the pipeline's ``image``.
Each parity test also checks that what it varies moves the image.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import tiny_flux2
from flow_family_files import clip_over, model_over
from node_call import Recorder
from nodes.families import flux2
from nodes.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red barn in a field"
SIZE = 64  # pixels: a 4 x 4 latent of 128 channels


def _model() -> ModelHandle:
    return model_over(flux2.FAMILY, tiny_flux2.components()["transformer"])


def _clip() -> ClipHandle:
    parts = tiny_flux2.components()
    return clip_over(flux2.FAMILY, parts["tokenizer"], parts["text_encoder"])


def _vae() -> VaeHandle:
    from nodes.checkpoint.flux2_vae import Flux2LatentVAE

    wrapped = Flux2LatentVAE(tiny_flux2.components()["vae"])
    return VaeHandle(latent_scale=1.0, downscale=wrapped.kiln_downscale, latent_channels=128,
                     _use_vae=lambda: contextlib.nullcontext(wrapped))


def _image(seed: int = 11) -> torch.Tensor:
    """An IMAGE [1, 64, 64, 3] with values on the 0..255 grid (the pipeline's PIL path sees the same)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, SIZE, SIZE, 3, generator=g) * 255).round() / 255


def kiln(prompt: str, cfg: float, *, steps: int = 4, seed: int = 5, reference: torch.Tensor | None = None,
         negative: str = "") -> torch.Tensor:
    clip, vae = _clip(), _vae()
    positive, negative_cond = clip.encode(prompt), clip.encode(negative)
    if reference is not None:
        from nodes.kontext import reference_latent

        (positive,) = reference_latent(Recorder().ctx, positive, {"samples": vae.encode(reference)})
    latent = {"samples": torch.zeros(1, 128, SIZE // 16, SIZE // 16)}
    (out,) = ksampler(Recorder().ctx, _model(), seed, steps, cfg, "euler", "normal", positive, negative_cond, latent)
    return vae.decode(out["samples"])


def diffusers(prompt: str, cfg: float, *, steps: int = 4, seed: int = 5, reference: torch.Tensor | None = None,
              distilled: bool = False) -> torch.Tensor:
    from PIL import Image

    kwargs = {"prompt": prompt, "height": SIZE, "width": SIZE, "num_inference_steps": steps, "guidance_scale": cfg,
              "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    if reference is not None:
        kwargs["image"] = Image.fromarray((reference[0].numpy() * 255).round().astype(np.uint8))
    with torch.no_grad():
        out = tiny_flux2.pipeline(distilled=distilled)(**kwargs).images
    return out.permute(0, 2, 3, 1)


def test_distilled_txt2img_at_cfg_1_equals_klein_pipeline():
    ours = kiln(PROMPT, 1.0)
    theirs = diffusers(PROMPT, 1.0, distilled=True)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln("a blue car on a road", 1.0)).abs().max() > 0.02  # the prompt matters
    assert (ours - kiln(PROMPT, 1.0, seed=6)).abs().max() > 0.02  # so does the seed


def test_base_txt2img_with_real_cfg_equals_klein_pipeline():
    ours = kiln(PROMPT, 4.0, steps=5)
    theirs = diffusers(PROMPT, 4.0, steps=5)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, 1.0, steps=5)).abs().max() > 0.01  # the guidance matters
    assert (ours - kiln(PROMPT, 4.0, steps=5, negative="blurry")).abs().max() > 0.005  # and the negative


def test_reference_image_edit_equals_klein_pipeline():
    ref = _image()
    ours = kiln(PROMPT, 1.0, reference=ref)
    theirs = diffusers(PROMPT, 1.0, reference=ref, distilled=True)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, 1.0)).abs().max() > 0.01  # the reference matters
    assert (ours - kiln(PROMPT, 1.0, reference=_image(12))).abs().max() > 0.005  # and which one


def test_text_encoding_stacks_layers_9_18_27_of_the_chat_template():
    parts = tiny_flux2.components()
    cond = _clip().encode(PROMPT)
    states = cond[0][0]
    assert states.shape == (1, flux2.TEXT_TOKENS, 3 * tiny_flux2.QWEN)
    want = tiny_flux2.pipeline()._get_qwen3_prompt_embeds(parts["text_encoder"], parts["tokenizer"], PROMPT)
    assert torch.equal(states, want.float())


def test_encoding_scores_no_prompt_token():
    """A whole Qwen3ForCausalLM handed in (the tiny pipeline's; Kiln's loaders build none with a head) is called
    for its hidden states only: its output head (width x 151k) sees the last token, not the 512 of the chat
    template (nodes.families.text.without_logits); the states are the pipeline's (the test above). Kiln's own
    arguments are read ahead of the reference pipelines' hook (flow_family_files.score_last_token_only), which
    would otherwise supply the same one."""
    from nodes.families.text import without_logits

    encoder = tiny_flux2.components()["text_encoder"]
    assert without_logits(encoder) == {"logits_to_keep": 1} and without_logits(encoder.model) == {}
    asked: list[int | None] = []
    tokens_scored: list[int] = []
    hooks = [encoder.register_forward_pre_hook(lambda _m, args, kwargs: asked.append(kwargs.get("logits_to_keep")),
                                               with_kwargs=True, prepend=True),
             encoder.lm_head.register_forward_hook(lambda _m, args, out: tokens_scored.append(args[0].shape[1]))]
    try:
        _clip().encode(PROMPT)
    finally:
        for hook in hooks:
            hook.remove()
    assert asked == [1] and tokens_scored == [1]


def test_sigmas_follow_flux2s_empirical_shift():
    """KSampler's grid is the pipeline's: linspace(1, 1/N, N) shifted at FLUX.2's mu for (tokens, steps)."""
    import math

    from nodes.samplers.flow import empirical_mu, scheduler

    config = flux2.FAMILY.scheduler_config()
    sched = scheduler(config, "normal", 20, 64, 64)
    mu = empirical_mu(64 * 64, 20)
    t = np.linspace(1.0, 1 / 20, 20)
    want = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert np.allclose(sched.sigmas[:-1].numpy(), want, atol=1e-6)
    assert abs(empirical_mu(64 * 64, 4) - empirical_mu(64 * 64, 50)) > 0.05  # the step count moves it


def test_guidance_is_a_note_and_a_wrong_width_names_the_input():
    from nodes.families.base import ConditioningError

    positive = [[e, {**x, "guidance": 3.5}] for e, x in _clip().encode(PROMPT)]
    notes = flux2.FAMILY.conditioning_notes([positive])
    assert len(notes) == 1 and "guidance 3.5 is ignored" in notes[0] and "klein" in notes[0]
    net = flux2.FAMILY.wrap_network(tiny_flux2.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 128, 4, 4), torch.tensor(500.0), torch.zeros(1, 77, 768))
    assert err.value.input_name == "positive" and "CLIPLoader type flux2" in str(err.value)


def test_empty_flux2_latent_and_flux2_scheduler_are_comfyuis():
    from nodes.flux2_nodes import empty_flux2_latent_image, flux2_scheduler
    from nodes.samplers.flow import empirical_mu, scheduler

    (latent,) = empty_flux2_latent_image(Recorder().ctx, 1024, 768, 2)
    assert latent["samples"].shape == (2, 128, 48, 64) and not latent["samples"].any()
    (sigmas,) = flux2_scheduler(Recorder().ctx, 4, 1024, 1024)
    assert sigmas.shape == (5,) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    # the pipeline's grid at the same size: Kiln's KSampler builds it as the pipeline does
    sched = scheduler(flux2.FAMILY.scheduler_config(), "normal", 4, 64, 64)
    assert torch.allclose(sigmas, sched.sigmas.float(), atol=1e-6)
    (other,) = flux2_scheduler(Recorder().ctx, 4, 512, 512)
    assert (sigmas[1:-1] - other[1:-1]).abs().min() > 0.005  # the size moves the shift
    assert empirical_mu(5000, 4) == empirical_mu(5000, 50)  # past 4300 tokens the step count does not


def test_a_reference_method_other_than_index_names_the_input():
    from nodes.families.base import ConditioningError
    from nodes.kontext import flux_kontext_multi_reference_latent_method, reference_latent

    (positive,) = reference_latent(Recorder().ctx, _clip().encode(PROMPT), {"samples": torch.zeros(1, 128, 4, 4)})
    (offset,) = flux_kontext_multi_reference_latent_method(Recorder().ctx, positive, "offset")
    with pytest.raises(ConditioningError) as err:
        flux2.FAMILY.network_kwargs([offset[0][1]], 1, (4, 4), "cpu", torch.float32)
    assert "'offset'" in str(err.value) and "index" in str(err.value) and err.value.input_name == "positive"
    (index,) = flux_kontext_multi_reference_latent_method(Recorder().ctx, positive, "index")
    assert "reference_latents" in flux2.FAMILY.network_kwargs([index[0][1]], 1, (4, 4), "cpu", torch.float32)


def test_original_names_and_lora_modules_cover_the_transformer():
    """Merge nodes and LoRAs address the original (BFL) names: every parameter has one, and a fused
    qkv / linear1 LoRA module splits row-wise onto diffusers' weights."""
    net = tiny_flux2.components()["transformer"]
    names = flux2.FAMILY.original_names(net)
    assert set(names) == {n for n, _ in net.named_parameters()}
    assert names["transformer_blocks.0.attn.to_k.weight"] == "double_blocks.0.img_attn.qkv.weight"
    lora = flux2.FAMILY.lora_modules(net)
    hidden = tiny_flux2.HEADS * tiny_flux2.HEAD_DIM
    assert lora["double_blocks.0.txt_attn.qkv"] == tuple((f"transformer_blocks.0.attn.add_{q}_proj.weight",
                                                          ((i * hidden, (i + 1) * hidden),)) for i, q in enumerate("qkv"))
    fused = net.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight.shape[0]
    assert lora["single_blocks.0.linear1"] == (("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
                                                ((0, fused),)),)
