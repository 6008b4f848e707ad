"""FLUX.3 [klein] (base and step-distilled) on a tiny random model, from ComfyUI's split files through the real
loaders, against diffusers' Flux3ModularPipeline and Flux3DistilledModularPipeline.

The tiny FLUX.3 (tests/tiny_flux3.py) is written as ComfyUI's files: the transformer in BFL's key layout
(bare and under ``model.diffusion_model.``) and in diffusers', Qwen3-VL as ComfyUI's qwen3vl_4b file, the
FLUX.2 VAE. API graphs as ComfyUI's klein templates wire them (UNETLoader, CLIPLoader type flux3,
VAELoader, CLIPTextEncode, EmptyFlux2LatentImage, KSampler, VAEDecode) equal the modular pipelines'
images within 1/255 per pixel: the base at cfg 3.5 with the negative "" (the pipeline's guider default),
the distilled at cfg 1 (its flow-map target timestep from KSampler's own sigmas). Each parity test
also checks that what it varies changes the picture by clearly more.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_flux3
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.checkpoint import flux3_keys
from nodes.families import flux3, flux3_distilled

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a red fox standing in fresh snow at sunrise"
SIZE = 64  # pixels: a 4 x 4 latent of 128 channels
BASE, DISTILLED = "flux3-klein-tiny.safetensors", "flux3-klein-distilled-tiny.safetensors"
CLIP, VAE = "qwen3vl_4b-tiny.safetensors", "flux2-vae-tiny.safetensors"

root = models_root(tiny_flux3.make_models_folder, "flux3-models")


def _reference(prompt: str, seed: int, steps: int, cfg: float, distilled: bool) -> np.ndarray:
    """The modular pipeline's image [1, H, W, 3] in 0..1 (negative "" for the base, as its guider defaults)."""
    pipe = tiny_flux3.pipeline(distilled, cfg)
    with torch.no_grad():
        out = pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator().manual_seed(seed), output="images")
    return out.permute(0, 2, 3, 1).float().numpy()


def _graph(prompt: str, seed: int, steps: int, cfg: float, *, unet: str = BASE, negative: str = "",
           sampler: str = "euler") -> dict:
    """ComfyUI's klein text-to-image graph (its subgraph's nodes), SaveImage at the end."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "flux3", "device": "default"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": sampler, "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "flux3"}},
    }


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distilled", [False, True])
def test_key_table_is_diffusers_converters_and_round_trips(distilled):
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers

    original = tiny_flux3.original_state(distilled)
    assert flux3_keys.is_original(original) and flux3_keys.is_distilled(original) == distilled
    theirs = convert_flux3_transformer_checkpoint_to_diffusers(dict(original))
    ours = flux3_keys.original_to_diffusers(dict(original))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = flux3_keys.diffusers_to_original(ours)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    with_training_heads = {**original, "repa_projectors.0.weight": torch.zeros(2, 2)}  # dropped, as diffusers does
    assert set(flux3_keys.original_to_diffusers(with_training_heads)) == set(ours)


@pytest.mark.parametrize("stem", ["flux3-klein-tiny", "flux3-klein-distilled-tiny"])
@pytest.mark.parametrize("form", ["", "-prefixed", "-diffusers-keys"])
def test_unet_loader_detects_flux3_and_loads_the_weights_bit_for_bit(env, stem, form):
    distilled = "distilled" in stem
    (model,) = call(split_loaders.unet_loader, env, unet_name=f"{stem}{form}.safetensors")
    assert model.family is (flux3_distilled.FAMILY if distilled else flux3.FAMILY)
    assert model.scheduler_config["shift"] == flux3.SHIFT and not model.scheduler_config["use_dynamic_shifting"]
    want = tiny_flux3.components(distilled)["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
        assert bool(net.config.flow_map) == distilled
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_clip_loader_flux3_builds_the_qwen3_vl_text_model(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="flux3")
    assert clip.family.clip_types == ("flux3",)
    want = tiny_flux3.components()["text_encoder"].model.language_model.state_dict()
    with clip.encoder("text_encoder") as module:
        assert type(module).__name__ == "Qwen3VLTextModel"
        got = module.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_truncated_transformer_file_names_the_file_and_the_keys(tmp_path):
    from nodes.checkpoint.flux3_load import build_transformer
    from nodes.checkpoint.load import CheckpointError

    state = tiny_flux3.original_state()
    del state["txt_mode_blocks.0.k_proj.weight"]
    state["single_blocks.0.extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"broken.safetensors.*txt_mode_blocks\.0\.k_proj\.weight.*"
                                              r"single_blocks\.0\.extra\.weight"):
        build_transformer(state, "broken.safetensors", torch.float32)


def test_a_flux3_file_in_checkpoint_loader_names_the_loaders(root):
    from nodes.checkpoint.load import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="FLUX.3 transformer.*UNETLoader.*qwen3vl_4b.*type flux3.*flux2-vae"):
        load_checkpoint(root / "diffusion_models" / BASE, torch.float32)


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "", "a long prompt " * 40])
def test_conditioning_equals_the_pipelines_text_encoder_step(env, prompt):
    """The chat template, padding to a multiple of 80 (masked, at position 1) and layers 4..32 stacked."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="flux3")
    [[ours, _]] = clip.encode(prompt)
    parts = tiny_flux3.components()
    with torch.no_grad():
        theirs = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(parts["text_encoder"], parts["tokenizer"], prompt,
                                                                  device=torch.device("cpu"))
    assert ours.shape == theirs.shape and ours.shape[1] % flux3.PAD_MULTIPLE == 0
    assert ours.shape[2] == len(flux3.TEXT_LAYERS) * tiny_flux3.TEXT
    assert torch.allclose(ours, theirs.float(), atol=1e-5, rtol=1e-5)


def test_sigmas_are_the_pipelines_constant_shift():
    from nodes.samplers.flow import scheduler

    sched = scheduler(flux3.FAMILY.scheduler_config(), "simple", 8, 64, 64)
    t = np.linspace(1.0, 1 / 8, 8)
    want = flux3.SHIFT * t / (1 + (flux3.SHIFT - 1) * t)
    assert np.allclose(sched.sigmas[:-1].numpy(), want, atol=1e-6) and float(sched.sigmas[-1]) == 0.0
    assert np.allclose(scheduler(flux3.FAMILY.scheduler_config(), "simple", 8, 512, 512).sigmas.numpy(),
                       sched.sigmas.numpy())  # the size does not move it


# -- sampling ---------------------------------------------------------------------------------------------


def test_base_graph_with_real_cfg_equals_flux3_modular_pipeline(registry, env):
    ours = _run(registry, env, _graph(PROMPT, 5, 4, 3.5))
    theirs = _reference(PROMPT, 5, 4, 3.5, distilled=False)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    print(f"base: max |kiln - pipeline| = {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    moves = {"prompt": _run(registry, env, _graph("a blue car on a road", 5, 4, 3.5)),
             "seed": _run(registry, env, _graph(PROMPT, 6, 4, 3.5)),
             "cfg": _run(registry, env, _graph(PROMPT, 5, 4, 1.0))}
    moves = {k: float(np.abs(ours - v).max()) for k, v in moves.items()}
    print("base: the image moves by", {k: f"{255 * v:.0f}/255" for k, v in moves.items()})
    assert moves["prompt"] > 0.02 and moves["seed"] > 0.02 and moves["cfg"] > 0.01


def test_a_positive_and_negative_of_other_padded_lengths_run_apart_as_the_pipelines_guider_runs_them(registry, env):
    """A prompt past 80 tokens pads to 160 while the negative "" pads to 80: the transformer reads every
    token (no text mask), so the two are evaluated in separate calls, as the guider makes them."""
    long = PROMPT + ", " + ", ".join(["golden light on the snow, pine trees behind"] * 12)
    ours = _run(registry, env, _graph(long, 5, 3, 3.5))
    theirs = _reference(long, 5, 3, 3.5, distilled=False)
    assert np.abs(ours - theirs).max() <= PIXEL_TOL


def test_distilled_graph_at_cfg_1_equals_flux3_distilled_modular_pipeline(registry, env):
    ours = _run(registry, env, _graph(PROMPT, 3, 4, 1.0, unet=DISTILLED))
    theirs = _reference(PROMPT, 3, 4, 1.0, distilled=True)
    print(f"distilled: max |kiln - pipeline| = {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    moves = {"prompt": _run(registry, env, _graph("a blue car on a road", 3, 4, 1.0, unet=DISTILLED)),
             "seed": _run(registry, env, _graph(PROMPT, 4, 4, 1.0, unet=DISTILLED))}
    moves = {k: float(np.abs(ours - v).max()) for k, v in moves.items()}
    print("distilled: the image moves by", {k: f"{255 * v:.0f}/255" for k, v in moves.items()})
    assert moves["prompt"] > 0.02 and moves["seed"] > 0.02


def test_the_distilled_network_reads_where_each_step_jumps():
    """The flow map's target timestep is a real input: another next sigma gives another prediction."""
    net = flux3_distilled.FAMILY.wrap_network(tiny_flux3.components(True)["transformer"])
    assert net.reads_next_sigma and not flux3.FAMILY.wrap_network(tiny_flux3.components()["transformer"]) \
        .reads_next_sigma
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 80, 8 * tiny_flux3.TEXT, generator=g)
    with torch.no_grad():
        (a,), (b,) = (net(x, torch.tensor(700.0), text, sigma_next=s) for s in (0.5, 0.0))
    assert (a - b).abs().max() > 1e-3


def test_guidance_is_a_note_and_a_wrong_width_names_the_input():
    from nodes.families.base import ConditioningError

    positive = [[torch.zeros(1, 80, 8 * tiny_flux3.TEXT), {"guidance": 3.5}]]
    notes = flux3.FAMILY.conditioning_notes([positive])
    assert len(notes) == 1 and "guidance 3.5 is ignored" in notes[0] and "FLUX.3" in notes[0]
    net = flux3.FAMILY.wrap_network(tiny_flux3.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 128, 4, 4), torch.tensor(500.0), torch.zeros(1, 77, 768))
    assert err.value.input_name == "positive" and "CLIPLoader type flux3" in str(err.value)


# -- image edit: a reference image ----------------------------------------------------------------------


def _image(seed: int) -> torch.Tensor:
    """An IMAGE [1, 64, 64, 3] on the 0..255 grid (the pipeline's PIL path sees the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, SIZE, SIZE, 3, generator=g) * 255).round() / 255


def _edit(env, reference: "torch.Tensor | list | None", seed: int, steps: int, cfg: float, unet: str) -> np.ndarray:
    """Kiln's edit: VAEEncode of the reference, ReferenceLatent on the positive (and on the negative, as
    the pipeline's guider hands both branches the reference tokens), KSampler, VAEDecode; no reference:
    the same without ReferenceLatent."""
    from node_call import Recorder
    from nodes.kontext import reference_latent
    from nodes.loaders import vae_loader
    from nodes.sampling import ksampler

    (model,) = call(split_loaders.unet_loader, env, unet_name=unet)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="flux3")
    (vae,) = call(vae_loader, env, vae_name=VAE)
    positive, negative = clip.encode(PROMPT), clip.encode("")
    for image in [] if reference is None else reference if isinstance(reference, list) else [reference]:
        ref = {"samples": vae.encode(image)}  # chained ReferenceLatent: reference k at l = -(k + 1)
        (positive,) = reference_latent(Recorder().ctx, positive, ref)
        (negative,) = reference_latent(Recorder().ctx, negative, ref)
    latent = {"samples": torch.zeros(1, 128, SIZE // 16, SIZE // 16)}
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", "simple", positive, negative, latent)
    return vae.decode(out["samples"]).numpy()


def _edit_reference(reference: "torch.Tensor | list", seed: int, steps: int, cfg: float, distilled: bool) -> np.ndarray:
    from PIL import Image

    pipe = tiny_flux3.pipeline(distilled, cfg)
    images = [Image.fromarray((r[0].numpy() * 255).round().astype(np.uint8))
              for r in (reference if isinstance(reference, list) else [reference])]
    image = images if isinstance(reference, list) else images[0]
    with torch.no_grad():
        out = pipe(prompt=PROMPT, image=image, height=SIZE, width=SIZE, num_inference_steps=steps, output_type="pt",
                   generator=torch.Generator().manual_seed(seed), output="images")
    return out.permute(0, 2, 3, 1).float().numpy()


@pytest.mark.parametrize("distilled", [False, True])
def test_reference_image_edit_equals_the_image_conditioned_pipeline(env, distilled):
    """The reference's tokens are the transformer's image_cond mode at l = -1 (the pipeline's
    image-conditioned workflow, one reference already on the 16-pixel grid so it is neither padded nor cut)."""
    unet, cfg = (DISTILLED, 1.0) if distilled else (BASE, 3.5)
    ref = _image(11)
    ours = _edit(env, ref, 5, 3, cfg, unet)
    theirs = _edit_reference(ref, 5, 3, cfg, distilled)
    print(f"edit ({'distilled' if distilled else 'base'}): max |kiln - pipeline| = {np.abs(ours - theirs).max():.2e}")
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    moved = float(np.abs(ours - _edit(env, _image(12), 5, 3, cfg, unet)).max())
    unreferenced = float(np.abs(ours - _edit(env, None, 5, 3, cfg, unet)).max())
    print(f"edit: another reference moves the image by {255 * moved:.0f}/255, none by {255 * unreferenced:.0f}/255")
    assert moved > 0.01 and unreferenced > 0.01  # the reference matters, and which one


def test_a_bf16_load_keeps_the_qk_norm_scales_in_float32_as_diffusers_does():
    from nodes.checkpoint.flux3_load import build_transformer

    net = build_transformer(tiny_flux3.original_state(), "tiny", torch.bfloat16)
    want = tiny_flux3.components()["transformer"].state_dict()
    norms = {n: p for n, p in net.named_parameters() if n.rsplit(".", 2)[-2] in ("norm_q", "norm_k")}
    assert len(norms) == 8 and all(p.dtype == torch.float32 and torch.equal(p, want[n]) for n, p in norms.items())
    assert net.single_transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16


def test_two_references_sit_at_l_minus_1_and_minus_2_as_the_pipeline_places_them(env):
    """Two chained ReferenceLatent nodes against the pipeline's multi-reference edit (each 64x64 image is
    under 1 megapixel and on the 16-pixel grid, so its crop rule keeps it whole)."""
    refs = [_image(11), _image(13)]
    ours = _edit(env, refs, 5, 3, 1.0, DISTILLED)
    theirs = _edit_reference(refs, 5, 3, 1.0, distilled=True)
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    swapped = float(np.abs(ours - _edit(env, refs[::-1], 5, 3, 1.0, DISTILLED)).max())
    print(f"two references: swapping them moves the image by {255 * swapped:.0f}/255")
    assert swapped > 0.005  # the order (the l axis) matters


def test_clip_loader_flux3_on_a_diffusion_model_file_names_the_loader(env, root):
    import shutil

    shutil.copy(root / "diffusion_models" / BASE, root / "text_encoders" / "flux3-dit.safetensors")
    with pytest.raises(Exception, match="flux3-dit.safetensors holds a diffusion model.*CLIPLoader needs a text enc"):
        call(split_loaders.clip_loader, env, clip_name="flux3-dit.safetensors", type="flux3")


@pytest.mark.parametrize("module", ["flux2", "flux3"])
def test_references_placed_by_another_method_are_refused_naming_the_networks_rule(module):
    """FLUX.2 [klein] and FLUX.3 place reference k by its index themselves (flux_references.indexed_call): the
    offset or uxo placement of FluxKontextMultiReferenceLatentMethod cannot be followed and is refused."""
    import importlib

    from nodes.families import flux_references
    from nodes.families.base import ConditioningError

    family = importlib.import_module(f"nodes.families.{module}").FAMILY
    reference = torch.zeros(1, family.latent.channels, 2, 2)
    extras = [{flux_references.LATENTS: [reference], flux_references.METHOD: "offset", "_input": "positive"}]
    with pytest.raises(ConditioningError) as err:
        family.network_kwargs(extras, 1, (32, 32), "cpu", torch.float32)
    assert err.value.input_name == "positive" and "places reference k" in str(err.value)
    extras[0][flux_references.METHOD] = "index"
    assert set(family.network_kwargs(extras, 1, (32, 32), "cpu", torch.float32)) == {"reference_latents"}
    assert family.network_kwargs([{}], 1, (32, 32), "cpu", torch.float32) == {}
