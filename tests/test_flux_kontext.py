"""FLUX.1 Kontext (reference latents) on the tiny FLUX: Kiln's nodes against diffusers' FluxKontextPipeline.

Kontext is a FLUX transformer that also reads the clean latent of a reference image,
appended to its token sequence with position index 1. Both sides get the same weights,
conditioning, reference latent (handed to the pipeline as a 16-channel "image" in model
space, which it uses as the latent), seed, steps and guidance; the decoded images must
agree within 1/255 per pixel. Each parity test also checks that the reference changes
the result, so agreement is not vacuous. The layouts of several references (ComfyUI's
offset, index and uxo rules) are checked against positions worked out by hand.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
import torch

import tiny_flux
import tiny_models
from engine.context import NodeError
from engine.workflow import load, parse
from flow_family_files import env, registry, run  # noqa: F401 (env and registry are fixtures)
from node_call import call, environment_over
from nodes import kontext
from nodes.families import flux, flux_references
from nodes.handles import ModelHandle
from nodes.sampling import ksampler
from test_flux import PIXEL_TOL, Recorder, _embeds, _model
from test_flux_loading import PROMPT, REPO, SIZE, SPLIT, root  # noqa: F401 (a fixture)

STEPS = 4
#: Kiln's and diffusers' latents agree to float rounding; the reference moves them ~0.02.
LATENT_TOL = 1e-5
EFFECT = 1e-3


def _reference(h: int = 6, w: int = 10, seed: int = 11) -> torch.Tensor:
    """A raw (VAE-space) reference latent, another size than the 8x8 image made."""
    return torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed)) * 2 + 0.1159


def _cond(guidance: float = 3.5, scale: float = 1.0) -> list:
    embeds, pooled = _embeds("dev")
    return [[embeds * scale, {"pooled_output": pooled, "guidance": guidance}]]


def _with_refs(cond: list, *latents: dict) -> list:
    for latent in latents:
        (cond,) = kontext.reference_latent(Recorder().ctx, cond, latent)
    return cond


def kiln(positive: list, negative: list | None = None, cfg: float = 1.0, seed: int = 5, batch: int = 1,
         model: ModelHandle | None = None) -> torch.Tensor:
    """KSampler's result from an empty 64x64 latent, in model space [batch, 16, 8, 8]."""
    empty = {"samples": torch.zeros(batch, 16, 8, 8)}
    (out,) = ksampler(Recorder().ctx, model or _model("dev"), seed, STEPS, cfg, "euler", "normal", positive,
                      negative if negative is not None else positive, empty)
    return flux.FLUX_LATENT.to_model(out["samples"])


def diffusers_kontext(reference: torch.Tensor, guidance: float = 3.5, seed: int = 5, batch: int = 1,
                      true_cfg: float = 1.0) -> torch.Tensor:
    """FluxKontextPipeline's latent for the same settings, in model space like :func:`kiln`'s."""
    from diffusers import FluxKontextPipeline

    embeds, pooled = _embeds("dev")
    extra = {}
    if true_cfg != 1.0:
        extra = dict(negative_prompt_embeds=embeds * 0.5, negative_pooled_prompt_embeds=pooled, true_cfg_scale=true_cfg)
    pipe = tiny_flux.pipeline("dev", cls=FluxKontextPipeline)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    with torch.no_grad():
        out = pipe(image=flux.FLUX_LATENT.to_model(reference), prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                   height=64, width=64, max_area=64 * 64, num_inference_steps=STEPS, guidance_scale=guidance,
                   output_type="latent", generator=generators if batch > 1 else generators[0],
                   num_images_per_prompt=batch, **extra).images
    return flux.unpack(out, 8, 8)


def _pixels(model_latent: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(tiny_flux.components("dev")["vae"], flux.FLUX_LATENT.from_model(model_latent))


def _apart(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_kontext_equals_flux_kontext_pipeline():
    ref = {"samples": _reference()}
    ours, theirs = kiln(_with_refs(_cond(), ref)), diffusers_kontext(ref["samples"])
    assert _apart(_pixels(ours), _pixels(theirs)) <= PIXEL_TOL
    assert _apart(ours, theirs) <= LATENT_TOL
    # The reference is read, and which one matters: far beyond the agreement (not vacuous).
    assert _apart(ours, kiln(_cond())) > EFFECT
    assert _apart(ours, kiln(_with_refs(_cond(), {"samples": _reference(seed=12)}))) > EFFECT


def test_kontext_batch_and_true_cfg_equal_the_pipeline():
    """A batch of 2 shares one reference image (each image's noise from its own seed), and with
    guidance (cfg 2) the negative reads the reference too, as diffusers' true CFG does."""
    ref = {"samples": _reference()}
    ours = kiln(_with_refs(_cond(), ref), batch=2)
    assert ours.shape[0] == 2 and _apart(ours[0], ours[1]) > EFFECT
    assert _apart(ours, diffusers_kontext(ref["samples"], batch=2)) <= LATENT_TOL
    guided = kiln(_with_refs(_cond(), ref), _with_refs(_cond(scale=0.5), ref), cfg=2.0)
    assert _apart(guided, diffusers_kontext(ref["samples"], true_cfg=2.0)) <= LATENT_TOL
    assert _apart(guided, ours[:1]) > EFFECT


def test_a_negative_without_references_gets_its_own_network_call():
    """Token sequences with and without references differ, so the two sides are evaluated apart
    (flux_references.call_key), each as it would be alone."""
    ref = {"samples": _reference()}
    positive, negative = _with_refs(_cond(), ref), _cond(scale=0.5)
    calls = []
    original = flux.FluxNetwork.__call__

    def spy(self, x, *args, **kwargs):
        calls.append((x.shape[0], kwargs.get("reference_latents") is not None))
        return original(self, x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flux.FluxNetwork, "__call__", spy)
        apart = kiln(positive, negative, cfg=2.0)
        first_step = calls[:2]
        calls.clear()
        kiln(positive, _with_refs(_cond(scale=0.5), ref), cfg=2.0)
    assert sorted(first_step) == [(1, False), (1, True)]
    assert calls[0] == (2, True)  # both sides read the same reference: one call
    shared = kiln(positive, _with_refs(_cond(scale=0.5), ref), cfg=2.0)
    assert _apart(apart, shared) > EFFECT


def test_references_on_regional_conditioning():
    """Through the regional path (an area over the whole image, each side's entries grouped by
    call key) a referenced prompt samples as it does plainly; a second entry without references
    on the same side is evaluated apart and changes the result."""
    from nodes import conditioning_nodes as cn

    ref = {"samples": _reference()}
    positive = _with_refs(_cond(), ref)
    (whole,) = cn.conditioning_set_area(Recorder().ctx, positive, 64, 64, 0, 0, 1.0)
    plain = kiln(positive)
    assert _apart(kiln(whole), plain) <= LATENT_TOL
    (both,) = cn.conditioning_combine(Recorder().ctx, whole, _cond(scale=0.5))
    assert _apart(kiln(both), plain) > EFFECT
    # one evaluation: two full-image entries average, each evaluated with its own references
    from nodes.families.denoiser import Denoiser

    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor(600.0)
    net = tiny_flux.components("dev")["transformer"]

    def output(side):
        return Denoiser(net, flux.FAMILY, positive=side, negative=None, cfg=1.0, image_size=(64, 64),
                        batch=1).model_output(x, t)

    with torch.inference_mode():
        mean = (output(positive) + output(_cond(scale=0.5))) / 2
        assert _apart(output(both), mean) <= LATENT_TOL


def test_reference_layouts_are_comfyuis():
    sizes = [(8, 8), (6, 10), (4, 4)]
    assert flux_references.placements(sizes, (8, 8), "offset") == [(1, 0, 0), (1, 8, 0), (1, 0, 10)]
    assert flux_references.placements(sizes, (8, 8), "index") == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert flux_references.placements(sizes, (8, 8), "uxo") == [(0, 8, 8), (0, 16, 16), (0, 22, 26)]
    assert flux_references.placements(sizes[:1], (7, 9), "uxo") == [(0, 8, 10)]  # past the padded image
    ids = flux_references.patch_ids(5, 7, 2, 8, 3, "cpu", torch.float32)  # odd sides round up
    assert ids.shape == (3 * 4, 3)
    assert ids[0].tolist() == [2.0, 4.0, 2.0] and ids[-1].tolist() == [2.0, 6.0, 5.0]


def test_several_references_and_their_layouts_change_the_image():
    first, second = {"samples": _reference()}, {"samples": _reference(5, 7, seed=13)}  # odd sides: padded
    one = kiln(_with_refs(_cond(), first))
    two = kiln(_with_refs(_cond(), first, second))
    assert _apart(one, two) > EFFECT
    images = {}
    for method in ("offset", "index", "uxo/uno"):
        (cond,) = kontext.flux_kontext_multi_reference_latent_method(Recorder().ctx, _with_refs(_cond(), first, second),
                                                                     method)
        images[method] = kiln(cond)
    (cond,) = kontext.flux_kontext_multi_reference_latent_method(Recorder().ctx, _with_refs(_cond(), first),
                                                                 "index_timestep_zero")
    with pytest.raises(NodeError, match="FLUX.1 Kontext takes offset, index or uxo/uno") as err:
        kiln(cond)  # ComfyUI's newer choice, for other models: the workflow loads, sampling says why not
    assert err.value.input_name == "positive"
    assert _apart(images["offset"], two) == 0  # offset is the default
    assert _apart(images["index"], two) > EFFECT and _apart(images["uxo/uno"], two) > EFFECT


def test_reference_latent_node_appends_without_changing_its_input():
    cond = _cond()
    a, b = {"samples": _reference()}, {"samples": _reference(seed=12)}
    one = _with_refs(cond, a)
    two = _with_refs(one, b)
    assert "reference_latents" not in cond[0][1] and len(one[0][1]["reference_latents"]) == 1
    assert [r is x for r, x in zip(two[0][1]["reference_latents"], (a["samples"], b["samples"]))] == [True, True]
    (same,) = kontext.reference_latent(Recorder().ctx, cond, None)
    assert "reference_latents" not in same[0][1]
    with pytest.raises(NodeError) as err:
        kontext.reference_latent(Recorder().ctx, cond, {"samples": torch.zeros(16, 8, 8)})
    assert err.value.input_name == "latent"
    with pytest.raises(NodeError) as err:
        kontext.flux_kontext_multi_reference_latent_method(Recorder().ctx, cond, "diagonal")
    assert err.value.input_name == "reference_latents_method"


def test_bad_references_are_errors_naming_the_input():
    with pytest.raises(NodeError, match="16, h, w") as err:
        kiln(_with_refs(_cond(), {"samples": torch.zeros(1, 4, 8, 8)}))
    assert err.value.input_name == "positive"
    with pytest.raises(NodeError, match="3 images for a batch of 2"):
        kiln(_with_refs(_cond(), {"samples": torch.zeros(3, 16, 8, 8)}), batch=2)
    parts = tiny_models.components("sd1")
    from nodes.families import sd1

    unet = parts["unet"]
    model = ModelHandle(sd1.FAMILY, scheduler_config=dict(parts["scheduler"].config), latent=sd1.FAMILY.latent,
                        _use_unet=lambda: contextlib.nullcontext(unet))
    pos, neg, _ = tiny_models.encoded_prompts("sd1", "a barn", "")
    with pytest.raises(NodeError, match="FLUX.1 Kontext") as err:
        ksampler(Recorder().ctx, model, 1, 2, 1.0, "euler", "normal", _with_refs(pos, {"samples": torch.zeros(1, 4, 8, 8)}),
                 neg, {"samples": torch.zeros(1, 4, 8, 8)})
    assert err.value.input_name == "positive"


def test_kontext_image_scale_picks_the_trained_size_nearest_in_aspect(tmp_path):
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(kontext.KONTEXT_SIZES) == [tuple(s) for s in PREFERRED_KONTEXT_RESOLUTIONS]
    assert kontext.kontext_size(100, 60) == (1328, 800)
    assert kontext.kontext_size(512, 512) == (1024, 1024)
    assert kontext.kontext_size(60, 200) == (672, 1568)  # narrower than every trained size: the narrowest
    image = torch.rand(1, 60, 100, 3, generator=torch.Generator().manual_seed(2))
    env = next(environment_over(None, tmp_path))
    (out,) = call(kontext.flux_kontext_image_scale, env, image=image)
    assert out.shape == (1, 800, 1328, 3)
    assert abs(float(out.mean()) - float(image.mean())) < 0.02


# -- the shipped workflow and ComfyUI's template graph, on the tiny split files -----------------


def _pipeline_edit(image, prompt: str, guidance: float, steps: int, seed: int) -> "Any":
    """FluxKontextPipeline from the image and prompt (its own encoding), at the image's size."""
    from diffusers import FluxKontextPipeline

    pipe = tiny_flux.pipeline("dev", cls=FluxKontextPipeline)
    return pipe(image=image, prompt=prompt, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
                num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed)).images


def _kontext_workflow(registry, env, image: str, guidance: float = 2.5, seed: int = 3):
    wf = load(REPO / "workflows" / "flux-kontext.json").with_overrides(
        dict(SPLIT, prompt=PROMPT, image=image, width=SIZE, height=SIZE, steps=4, seed=seed, guidance=guidance))
    return run(registry, env, wf)


def test_kontext_workflow_on_split_files_equals_flux_kontext_pipeline(registry, env):
    from nodes.sample_image import draw_landscape

    picture = draw_landscape(SIZE, SIZE)
    picture.save(env.paths.input.root / "init.png")
    outcome = _kontext_workflow(registry, env, "init.png")
    kiln = outcome.results["12"][0].numpy()
    assert np.abs(kiln - _pipeline_edit(picture, PROMPT, 2.5, 4, 3)).max() <= PIXEL_TOL
    # denoise 1 starts from pure noise: the picture reaches the result only as the reference
    picture.transpose(0).save(env.paths.input.root / "mirrored.png")
    mirrored = _kontext_workflow(registry, env, "mirrored.png").results["11"][0]["samples"]
    assert _apart(outcome.results["11"][0]["samples"], mirrored) > EFFECT


def _comfy_kontext_template(image: str) -> dict:
    """ComfyUI's FLUX.1 Kontext [dev] template graph, API format, at the tests' size (its
    FluxKontextImageScale, which makes about one megapixel, is left out: the picture is already
    a size the model takes)."""
    return {
        "37": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["diffusion_model"], "weight_dtype": "default"}},
        "38": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": SPLIT["clip_l"], "clip_name2": SPLIT["t5xxl"],
                                                          "type": "flux"}},
        "39": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
        "142": {"class_type": "LoadImage", "inputs": {"image": image}},
        "124": {"class_type": "VAEEncode", "inputs": {"pixels": ["142", 0], "vae": ["39", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["38", 0]}},
        "177": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["124", 0]}},
        "35": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["177", 0], "guidance": 2.5}},
        "135": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "31": {"class_type": "KSampler", "inputs": {"model": ["37", 0], "seed": 3, "steps": 4, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["35", 0], "negative": ["135", 0],
                                                    "latent_image": ["124", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["39", 0]}},
        "136": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def test_comfyui_kontext_template_runs_unchanged(registry, env):
    from nodes.sample_image import draw_landscape

    picture = draw_landscape(SIZE, SIZE)
    picture.save(env.paths.input.root / "init.png")
    kiln = run(registry, env, parse(_comfy_kontext_template("init.png"))).results["8"][0].numpy()
    assert np.abs(kiln - _pipeline_edit(picture, PROMPT, 2.5, 4, 3)).max() <= PIXEL_TOL
