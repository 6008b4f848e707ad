"""FLUX.2 [klein] from the files people have, through the real loader nodes, against Flux2KleinPipeline.

The tiny klein (tests/tiny_flux2.py) is written in ComfyUI's split layout (BFL keys, with and
without ``model.diffusion_model.``, fp8; the Qwen3 as qwen_3_*.safetensors; the VAE in its original
layout with ``bn.*``) and as a diffusers folder. Graphs on the split files and on the folder equal
Flux2KleinPipeline from the raw prompt within 1/255 per pixel (cfg 1 distilled, cfg > 1 base);
ComfyUI's klein text-to-image template runs through the editor-format converter and equals the
pipeline too; wrong files get errors naming family, file and keys.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux2
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run, txt2img_graph, unet_weights  # noqa: F401 (fixtures)
from node_call import Called, call, environment_over
from nodes import loaders, split_loaders
from nodes.checkpoint import flux2_keys
from nodes.families import flux2, flux2_dev

PROMPT = "a lighthouse on a cliff"
SIZE = 64
SPLIT = dict(unet="flux-2-klein-tiny.safetensors", clip="qwen_3_tiny.safetensors", vae="flux2-vae-tiny.safetensors")


root = models_root(tiny_flux2.make_models_folder, "flux2-models")


@functools.lru_cache(maxsize=None)
def reference(seed: int, steps: int, cfg: float, prompt: str = PROMPT) -> np.ndarray:
    """Flux2KleinPipeline's image (deterministic: cached, as tests ask for the same one more than once)."""
    with torch.no_grad():
        return tiny_flux2.pipeline(distilled=cfg <= 1)(
            prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg, output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed)).images


def _graph(loader: dict, seed: int, steps: int, cfg: float) -> dict:
    return txt2img_graph(loader, prompt=PROMPT, negative="", size=SIZE, seed=seed, steps=steps, cfg=cfg,
                         scheduler="simple", latent="EmptyFlux2LatentImage", prefix="flux2")


SPLIT_LOADERS = {
    "10": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["unet"], "weight_dtype": "default"}},
    "11": {"class_type": "CLIPLoader", "inputs": {"clip_name": SPLIT["clip"], "type": "flux2"}},
    "12": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae"]}},
    "_model": ["10", 0], "_clip": ["11", 0], "_vae": ["12", 0],
}
FOLDER_LOADER = {
    "10": {"class_type": "DiffusersLoader", "inputs": {"model_path": "flux2-klein-tiny"}},
    "_model": ["10", 0], "_clip": ["10", 1], "_vae": ["10", 2],
}


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_split_files_graph_equals_klein_pipeline(registry, env, cfg):
    kiln = run(registry, env, parse(_graph(SPLIT_LOADERS, 8, 4, cfg))).results["6"][0].numpy()
    assert np.abs(kiln - reference(8, 4, cfg)).max() <= 1 / 255
    assert np.abs(kiln - reference(9, 4, cfg)).max() > 0.02  # the seed moves it: not vacuous


def test_diffusers_folder_graph_equals_klein_pipeline(registry, env):
    kiln = run(registry, env, parse(_graph(FOLDER_LOADER, 8, 4, 1.0))).results["6"][0].numpy()
    assert np.abs(kiln - reference(8, 4, 1.0)).max() <= 1 / 255
    assert np.abs(kiln - reference(8, 4, 1.0, "a forest at dawn")).max() > 0.02


@pytest.fixture(scope="module")
def folder(root, tmp_path_factory) -> dict:
    """The diffusers folder through DiffusersLoader, loaded once for every split file to be compared with:
    its three handles and a copy of its transformer's weights."""
    with contextlib.contextmanager(environment_over)(root, tmp_path_factory.mktemp("folder")) as env:
        (model, clip, vae) = call(loaders.diffusers_loader, env, model_path="flux2-klein-tiny")
        return {"model": model, "clip": clip, "vae": vae, "weights": unet_weights(model)}


@pytest.mark.parametrize("name", ["flux-2-klein-tiny.safetensors", "flux-2-klein-tiny-prefixed.safetensors"])
def test_split_file_and_folder_load_the_same_weights_bit_for_bit(env, folder, name):
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name=name)
    assert model.family is flux2.FAMILY and any("flux2 UNet" in m for m in rec.messages)
    clip, vae = folder["clip"], folder["vae"]
    assert folder["model"].family is clip.family is flux2.FAMILY and vae.downscale == 16 and vae.latent_channels == 128
    split, whole = unet_weights(model), folder["weights"]
    want = tiny_flux2.components()["transformer"].state_dict()
    assert set(split) == set(whole) == set(want)
    assert all(torch.equal(split[k], want[k]) and torch.equal(whole[k], want[k]) for k in want)


def test_fp8_file_keeps_fp8_linears_and_stays_close(env):
    rec = Called()
    (model,) = call(split_loaders.unet_loader, env, rec, unet_name="flux-2-klein-tiny-fp8.safetensors")
    with model._use_unet() as net:
        assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        want = tiny_flux2.components()["transformer"].state_dict()["transformer_blocks.0.attn.to_q.weight"]
        got = net.transformer_blocks[0].attn.to_q.weight.float()
        assert (got - want).abs().max() < 0.1 * want.abs().max() and not torch.equal(got, want)


def test_key_map_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    original = tiny_flux2.original_transformer()
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    ours = flux2_keys.original_to_diffusers(dict(original))
    assert set(ours) == set(theirs) == set(tiny_flux2.components()["transformer"].state_dict())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_vae_loader_reads_the_original_layout_with_its_batch_norm(env):
    from nodes.vae import vae_decode

    (vae,) = call(loaders.vae_loader, env, vae_name=SPLIT["vae"])
    assert vae.latent_channels == 128 and vae.downscale == 16
    z = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(1))
    (image,) = call(vae_decode, env, samples={"samples": z}, vae=vae)
    parts = tiny_flux2.components()
    bn = parts["vae"].bn
    raw = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4) + bn.running_mean.view(1, -1, 1, 1)
    with torch.no_grad():
        want = parts["vae"].decode(tiny_flux2.pipeline()._unpatchify_latents(raw)).sample
    assert torch.allclose(image, (want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-5)


def test_wrong_files_name_family_file_and_keys(env, root):
    from tiny_flux import _save

    state = tiny_flux2.original_transformer()
    broken = {k: v for k, v in state.items() if not k.startswith("single_blocks.0.linear2")}
    _save(root / "diffusion_models" / "flux-2-broken.safetensors", broken)
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="flux-2-broken.safetensors")
    assert "FLUX.2" in str(err.value) and "single_blocks.0.linear2.weight" in str(err.value)
    assert err.value.input_name == "unet_name"
    dev_state = dict(state, **{"guidance_in.in_layer.weight": torch.zeros(64, 256),
                               "guidance_in.out_layer.weight": torch.zeros(64, 64)})
    _save(root / "diffusion_models" / "flux-2-dev-tiny.safetensors", dev_state)
    (dev,) = call(split_loaders.unet_loader, env, unet_name="flux-2-dev-tiny.safetensors")  # no longer refused
    assert dev.family is flux2_dev.FAMILY and dev.family is not flux2.FAMILY
    _save(root / "checkpoints" / "flux-2-dev-as-checkpoint.safetensors", dev_state)
    with pytest.raises(NodeError) as err:  # a [dev] transformer in CheckpointLoader: still refused, by name
        call(loaders.checkpoint_loader, env, ckpt_name="flux-2-dev-as-checkpoint.safetensors")
    assert "FLUX.2 [dev] transformer" in str(err.value) and "UNETLoader" in str(err.value)
    assert "mistral_3_small_flux2" in str(err.value)
    _save(root / "checkpoints" / "flux-2-klein-as-checkpoint.safetensors", state)
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="flux-2-klein-as-checkpoint.safetensors")
    assert "FLUX.2 transformer" in str(err.value) and "UNETLoader" in str(err.value)


def test_flux1_files_are_not_klein(env, root):
    """A FLUX.1 transformer loads as FLUX.1 (its own family), and its parts refuse klein's by name: a
    T5 for CLIPLoader type flux2, a FLUX.1 latent for the FLUX.2 VAE, Qwen3 conditioning for FLUX.1."""
    import tiny_flux
    from nodes.vae import vae_decode

    tiny_flux._save(root / "diffusion_models" / "flux1-tiny.safetensors", tiny_flux.bfl_transformer("dev"))
    tiny_flux._save(root / "text_encoders" / "t5xxl-tiny.safetensors", tiny_flux.t5_state())
    (model,) = call(split_loaders.unet_loader, env, unet_name="flux1-tiny.safetensors")
    assert model.family.name == "flux"
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="t5xxl-tiny.safetensors", type="flux2")
    assert "'flux2' needs Qwen3" in str(err.value) and "T5-XXL" in str(err.value)
    (vae,) = call(loaders.vae_loader, env, vae_name=SPLIT["vae"])
    with pytest.raises(NodeError) as err:
        call(vae_decode, env, samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=vae)
    assert "16 channels" in str(err.value) and "128" in str(err.value)


def test_scaled_fp8_and_diffusers_keyed_files_load(env, root):
    """ComfyUI's scaled fp8 (scale_weight per layer, fused qkv scales split per row with the weight)
    computes with the weights of its dequantised twin; diffusers' names in one file load bit for bit."""
    from test_scaled_fp8 import _compare, quantise
    from tiny_flux import _save

    scaled, plain = quantise(tiny_flux2.original_transformer(), "model.diffusion_model.")
    _save(root / "diffusion_models" / "flux-2-klein-tiny-fp8-scaled.safetensors", scaled)
    _save(root / "diffusion_models" / "flux-2-klein-tiny-dequantised.safetensors", plain)
    _save(root / "diffusion_models" / "flux-2-klein-tiny-diffusers-keys.safetensors",
          dict(tiny_flux2.components()["transformer"].state_dict()))
    nets = {}
    for name in ("fp8-scaled", "dequantised", "diffusers-keys"):
        (model,) = call(split_loaders.unet_loader, env, unet_name=f"flux-2-klein-tiny-{name}.safetensors")
        assert model.family is flux2.FAMILY
        with model._use_unet() as net:
            nets[name] = net
    layers, fp8 = _compare(nets["fp8-scaled"], nets["dequantised"])
    assert layers >= 10 and fp8 > 0
    want = tiny_flux2.components()["transformer"].state_dict()
    got = nets["diffusers-keys"].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- the shipped workflow and ComfyUI's template ---------------------------------------------------


def test_shipped_workflow_on_split_files_equals_klein_pipeline(registry, env):
    from engine.workflow import load

    wf = load(Path(__file__).resolve().parent.parent / "workflows" / "flux2-klein-txt2img.json").with_overrides(
        dict(diffusion_model=SPLIT["unet"], qwen3=SPLIT["clip"], vae=SPLIT["vae"], prompt=PROMPT, width=SIZE,
             height=SIZE, steps=4, seed=3))
    kiln = run(registry, env, wf).results["8"][0].numpy()
    assert np.abs(kiln - reference(3, 4, 1.0)).max() <= 1 / 255
    assert np.abs(kiln - reference(3, 4, 1.0, "a forest at dawn")).max() > 0.02


def test_comfyui_klein_template_equals_klein_pipeline(registry, env):
    """image_flux2_klein_text_to_image.json as ComfyUI's editor saved it (comfyui-workflow-templates-json):
    a subgraph of UNETLoader (the base model), CLIPLoader type flux2, VAELoader, EmptyFlux2LatentImage,
    Flux2Scheduler, CFGGuider cfg 5 with an empty negative prompt, RandomNoise, KSamplerSelect euler and
    SamplerCustomAdvanced. On the tiny files it equals Flux2KleinPipeline (base, guidance 5) on the
    template's prompt; the distilled subgraph is bypassed in the template."""
    import importlib
    import json

    from engine.formats import parse_document

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    document = json.loads((folder / "image_flux2_klein_text_to_image.json").read_text(encoding="utf-8"))
    wf = parse_document(document, registry).with_overrides({
        "75:70.unet_name": SPLIT["unet"], "75:71.clip_name": SPLIT["clip"], "75:72.vae_name": SPLIT["vae"],
        "75:68.value": SIZE, "75:69.value": SIZE, "75:62.steps": 4, "75:73.noise_seed": 11})
    assert wf.nodes["75:63"].inputs["cfg"] == 5 and wf.nodes["75:67"].inputs["text"] == ""
    outcome = run(registry, env, wf)
    ours = outcome.results["75:65"][0].numpy()
    prompt = wf.nodes["76"].inputs["value"]
    sigmas = outcome.results["75:62"][0]
    assert sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
    assert np.abs(ours - reference(11, 4, 5.0, prompt)).max() <= 1 / 255
    assert np.abs(ours - reference(11, 4, 1.0, prompt)).max() > 0.01  # the template's cfg 5 is what matched


def test_comfyui_klein_edit_template_equals_klein_pipeline_image_path(registry, env):
    """image_flux2_klein_image_edit_4b_distilled.json: the image scaled (ImageScaleToTotalPixels, nearest),
    VAEEncode, ReferenceLatent on the prompt and on its ConditioningZeroOut negative, CFGGuider cfg 1,
    EmptyFlux2LatentImage and Flux2Scheduler at GetImageSize's size. On the tiny files, with the scale set
    to give 96 x 96 pixels, it equals Flux2KleinPipeline given the same (scaled) image."""
    import importlib
    import json

    from PIL import Image

    from engine.formats import parse_document
    from nodes.sample_image import draw_landscape

    draw_landscape(64, 64).save(env.paths.input.root / "bag.png")
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    document = json.loads((folder / "image_flux2_klein_image_edit_4b_distilled.json").read_text(encoding="utf-8"))
    overrides = {"75:70.unet_name": SPLIT["unet"], "75:71.clip_name": SPLIT["clip"], "75:72.vae_name": SPLIT["vae"],
                 "76.image": "bag.png", "81.image": "bag.png", "75:80.megapixels": 0.01, "75:80.resolution_steps": 16,
                 "75:73.noise_seed": 21}
    wf = parse_document(document, registry).with_overrides(overrides)
    outcome = run(registry, env, wf)
    ours = outcome.results["75:65"][0].numpy()
    scaled = outcome.results["75:80"][0]
    assert scaled.shape == (1, 96, 96, 3) and ours.shape == (1, 96, 96, 3)
    prompt = wf.nodes["75:74"].inputs["text"]

    def pipeline(image):
        with torch.no_grad():
            return tiny_flux2.pipeline(distilled=True)(
                prompt=prompt, image=image, height=96, width=96, num_inference_steps=4, guidance_scale=1.0,
                output_type="np", generator=torch.Generator("cpu").manual_seed(21)).images

    pil = Image.fromarray((scaled[0].numpy() * 255).round().astype(np.uint8))
    assert np.abs(ours - pipeline(pil)).max() <= 1 / 255
    assert np.abs(ours - pipeline(None)).max() > 0.01  # the reference moves it: not vacuous
    plain = Image.fromarray(np.full((96, 96, 3), 128, dtype=np.uint8))
    assert np.abs(ours - pipeline(plain)).max() > 2 / 255  # and which image it is


def test_vae_with_a_narrower_decoder_loads(env, root):
    """Comfy-Org's full_encoder_small_decoder.safetensors: the decoder's widths differ from the encoder's
    (diffusers' decoder_block_out_channels); read from the decoder's own shapes."""
    from diffusers import AutoencoderKLFlux2

    from nodes.checkpoint.to_original import vae_to_original
    from tiny_flux import _save

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        small = AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 64, 64),
                                   layers_per_block=1, latent_channels=32, norm_num_groups=32, sample_size=64).eval()
    state = {k: v for k, v in small.state_dict().items() if not k.startswith("bn.")}
    original = {k[len("first_stage_model."):]: v for k, v in vae_to_original(state, dict(small.config)).items()}
    original.update({f"bn.{k}": v for k, v in small.bn.state_dict().items()})
    _save(root / "vae" / "flux2-small-decoder.safetensors", original)
    (vae,) = call(loaders.vae_loader, env, vae_name="flux2-small-decoder.safetensors")
    with vae.module() as module:
        got = module.vae.state_dict()
    want = small.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
