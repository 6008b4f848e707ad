"""FIBO 2 on a tiny random model, from ComfyUI's split files through the real loaders, against BriaFibo2Pipeline.

The tiny FIBO 2 (tests/tiny_fibo2.py) is written as ComfyUI's files: the transformer bare and under
``model.diffusion_model.`` (and as an int8_convrot file with its dequantised twin), Qwen3-VL as ComfyUI's
qwen3vl_4b file, FLUX.2's VAE. Graphs (UNETLoader, CLIPLoader type fibo2, VAELoader, TextEncodeFibo2 or
CLIPTextEncode, KSampler euler/simple) equal the pipeline's images within 1/255 per pixel on the same
noise (Kiln's seeded noise in FLUX.2's 128-channel latent, handed to the pipeline unpatched); each parity
test also checks that what it varies changes the picture.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_fibo2
from engine.workflow import parse
from flow_family_files import env, registry, run, save_state, unet_weights  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.families import fibo2

CAPTION = json.dumps({"short_description": "a red fox in fresh snow", "objects": [
    {"description": "a fox", "location": "center", "pose": ""}], "background_setting": "a pine forest",
    "lighting": {"conditions": "overcast", "direction": ""}, "aesthetics": {"aesthetic_score": 7.5},
    "style_medium": "photograph", "text_render": []})
NEGATIVE = "blurry, dark, low quality, oversaturated, extra limbs"
SIZE = 64
UNET, CLIP, VAE = "tiny-fibo2.safetensors", "tiny-qwen3vl_4b.safetensors", "tiny-flux2-vae.safetensors"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from test_int8_quant import quantise_int8

    root = tiny_fibo2.make_models_folder(tmp_path_factory.mktemp("fibo2-models"))
    int8, twin = quantise_int8(tiny_fibo2.transformer_state(), "model.diffusion_model.")
    save_state(root / "diffusion_models" / "fibo2-int8_convrot.safetensors", int8)
    save_state(root / "diffusion_models" / "fibo2-int8-dequant.safetensors", twin)
    return root


def _noise(seed: int, size: int = SIZE) -> torch.Tensor:
    from nodes.latent import seeded_noise

    return seeded_noise((1, 128, size // 16, size // 16), [seed])


def _reference(prompt: str, negative: str | None, seed: int, steps: int, guidance: float,
               size: int = SIZE) -> np.ndarray:
    with torch.no_grad():
        return tiny_fibo2.pipeline()(
            prompt=prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
            guidance_scale=guidance, latents=fibo2.unpatch(_noise(seed, size)), output_type="np").images


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, *, node: bool = True, unet: str = UNET,
           size: int = SIZE) -> dict:
    """TextEncodeFibo2 (positive, negative, latent) -> KSampler when ``node``, else two CLIPTextEncode and
    EmptyFlux2LatentImage."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "fibo2"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["2", 1],
                                                   "latent_image": ["2", 2], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "fibo2"}},
    }
    if node:
        graph["2"] = {"class_type": "TextEncodeFibo2", "inputs": {
            "clip": ["8", 0], "prompt": prompt, "negative_prompt": negative, "width": size, "height": size,
            "batch_size": 1}}
    else:
        graph["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}}
        graph["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}}
        graph["4"] = {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": size, "height": size,
                                                                        "batch_size": 1}}
        graph["5"]["inputs"].update(negative=["3", 0], latent_image=["4", 0])
    return graph


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-fibo2-prefixed.safetensors"])
def test_unet_loader_detects_fibo2_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is fibo2.FAMILY and model.scheduler_config["kiln_mu_rule"] == "per_pixel"
    want = tiny_fibo2.components()["transformer"]
    with model._use_unet() as net:  # the config read from the shapes is the model's
        assert {k: v for k, v in net.config.items() if not k.startswith("_")} == \
            {k: v for k, v in want.config.items() if not k.startswith("_")}
    got, want = unet_weights(model), want.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_clip_loader_fibo2_builds_the_qwen3_vl_text_model(env):
    import tiny_krea2

    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="fibo2")
    assert clip.family is fibo2.FAMILY
    tiny_krea2.check_text_model(clip)


def test_int8_convrot_file_equals_its_dequantised_twin(registry, env):
    from test_int8_quant import _compare

    from nodes.runtime.fp8 import rotation_group

    (a,) = call(split_loaders.unet_loader, env, unet_name="fibo2-int8_convrot.safetensors")
    (b,) = call(split_loaders.unet_loader, env, unet_name="fibo2-int8-dequant.safetensors")
    with a.unet() as x, b.unet() as y:
        layers = _compare(x, y)
    assert layers and any(rotation_group(m) for m in layers)
    ours = _run(registry, env, _graph(CAPTION, "", 2, 3, 1.0, unet="fibo2-int8_convrot.safetensors"))
    twin = _run(registry, env, _graph(CAPTION, "", 2, 3, 1.0, unet="fibo2-int8-dequant.safetensors"))
    plain = _run(registry, env, _graph(CAPTION, "", 2, 3, 1.0))
    gap = np.abs(ours - twin).max()
    assert gap <= 1 / 255, gap
    assert np.abs(ours - plain).max() > max(2 * gap, 1e-4)  # the quantisation is real


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [CAPTION, "a fox", "", "a long prompt " * 30,
                                    json.dumps({"structured_caption": {"short_description": "x", "objects": []},
                                                "edit_instruction": "ignored in text to image"})])
def test_conditioning_equals_the_pipelines_encoding_of_the_cleaned_prompt(env, prompt):
    """The pipeline cleans a generation caption in __call__, then encodes it; Kiln's CLIPTextEncode does
    both. The six bundles are flattened bundle-major into the width."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="fibo2")
    [[ours, _]] = clip.encode(prompt)
    pipe = tiny_fibo2.pipeline()
    caption, _ = pipe._parse_prompt(prompt)
    cleaned = prompt if isinstance(caption, str) else json.dumps(caption or {}, separators=(",", ":"),
                                                                 ensure_ascii=False)
    assert fibo2.caption_text(prompt) == cleaned
    with torch.no_grad():
        theirs, mask = pipe.encode_prompt(cleaned, device=torch.device("cpu"))
    assert mask is None and theirs.shape[:2] == (1, 6)
    assert ours.shape == (1, theirs.shape[2], 6 * theirs.shape[3])
    assert torch.allclose(ours.reshape(1, -1, 6, theirs.shape[3]).transpose(1, 2), theirs.float(), atol=1e-5)


def test_a_caption_loses_its_empty_values_and_scores():
    text = fibo2.caption_text(CAPTION)
    assert json.loads(text) == {"short_description": "a red fox in fresh snow", "objects": [
        {"description": "a fox", "location": "center"}], "background_setting": "a pine forest",
        "lighting": {"conditions": "overcast"}, "style_medium": "photograph"}
    assert " " not in text.replace("a red fox in fresh snow", "").replace("a pine forest", "").replace("a fox", "")


# -- sampling ---------------------------------------------------------------------------------------------


def test_text_encode_fibo2_with_cfg_equals_the_pipeline(registry, env):
    """The dev template's shape: TextEncodeFibo2's positive, negative and latent into KSampler at cfg > 1
    (the pipeline's guidance_scale); the negative, shorter than the prompt, runs as its own pass."""
    ours = _run(registry, env, _graph(CAPTION, NEGATIVE, 3, 5, 4.0))
    gap = np.abs(ours - _reference(CAPTION, NEGATIVE, 3, 5, 4.0)).max()
    print(f"cfg gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _run(registry, env, _graph(CAPTION, NEGATIVE, 4, 5, 4.0))).max() > 0.02  # the seed
    assert np.abs(ours - _run(registry, env, _graph("a red car", NEGATIVE, 3, 5, 4.0))).max() > 0.02  # prompt
    assert np.abs(ours - _run(registry, env, _graph(CAPTION, "", 3, 5, 4.0))).max() > 0.005  # the negative


def test_an_empty_negative_is_the_null_caption_as_in_the_pipeline(registry, env):
    ours = _run(registry, env, _graph(CAPTION, "", 6, 4, 3.0))
    gap = np.abs(ours - _reference(CAPTION, None, 6, 4, 3.0)).max()
    assert gap <= 1 / 255, gap


def test_clip_text_encode_at_cfg_1_equals_the_pipeline_without_guidance(registry, env):
    """The turbo template's guidance (cfg 1): CLIPTextEncode and EmptyFlux2LatentImage give what
    TextEncodeFibo2 gives, at another size (so another shift)."""
    ours = _run(registry, env, _graph(CAPTION, NEGATIVE, 5, 4, 1.0, node=False, size=96))
    gap = np.abs(ours - _reference(CAPTION, None, 5, 4, 1.0, size=96)).max()
    print(f"cfg 1 gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    node = _run(registry, env, _graph(CAPTION, NEGATIVE, 5, 4, 1.0, size=96))
    assert np.abs(ours - node).max() <= 1e-6
    pipe = tiny_fibo2.pipeline()  # the same without the size shift (mu 0): the shift is in the picture
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, base_shift=0.0, max_shift=0.0)
    with torch.no_grad():
        unshifted = pipe(prompt=CAPTION, height=96, width=96, num_inference_steps=4, guidance_scale=1.0,
                         latents=fibo2.unpatch(_noise(5, 96)), output_type="np").images
    assert np.abs(ours - unshifted).max() > 2 / 255


def test_the_shift_counts_one_token_per_latent_pixel():
    from nodes.samplers.flow import calculate_mu, mu_for

    config = fibo2.FAMILY.scheduler_config()
    assert mu_for(config, 64, 64) == pytest.approx(calculate_mu(config, 4096)) == pytest.approx(1.15)
    assert mu_for(config, 4, 4) == pytest.approx(calculate_mu(config, 16))


# -- bad input -------------------------------------------------------------------------------------------


def test_pictures_to_edit_are_refused_by_input_name(registry, env):
    from engine.executor import Executor

    graph = _graph(CAPTION, "", 1, 2, 1.0)
    graph["10"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    graph["2"]["inputs"]["images.image_1"] = ["10", 0]
    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status != "succeeded"
    error = outcome.error
    assert (error.node_id, error.node_type, error.input_name) == ("2", "TextEncodeFibo2", "images.image_1")
    assert "vision tower" in error.message and "not supported" in error.message


def test_another_familys_clip_and_a_wrong_width_name_their_input(env):
    from engine.context import NodeError
    from nodes.fibo2_nodes import text_encode_fibo2

    (krea,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    with pytest.raises(NodeError) as exc:
        call(text_encode_fibo2, env, clip=krea, prompt="x")
    assert exc.value.input_name == "clip" and "fibo2" in str(exc.value)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="fibo2")
    with pytest.raises(NodeError) as exc:
        call(text_encode_fibo2, env, clip=clip, prompt="x", width=8)
    assert exc.value.input_name == "width"
    _, _, latent = call(text_encode_fibo2, env, clip=clip, prompt="x", width=0, height=100, batch_size=2)
    assert latent["samples"].shape == (2, 128, 6, 64)


def test_a_fibo2_file_with_broken_keys_names_family_file_and_key(root, tmp_path):
    from nodes.checkpoint.load import CheckpointError
    from nodes.checkpoint.split import load_unet_file

    state = tiny_fibo2.transformer_state()
    del state["x_embedder.weight"]
    save_state(tmp_path / "broken-fibo2.safetensors", state)
    with pytest.raises(CheckpointError) as exc:
        load_unet_file(tmp_path / "broken-fibo2.safetensors", torch.float32)
    assert "FIBO 2" in str(exc.value) and "broken-fibo2.safetensors" in str(exc.value)
    assert "x_embedder.weight" in str(exc.value)


def test_a_fibo2_transformer_in_checkpoint_loader_names_its_loaders(root, tmp_path):
    from nodes.checkpoint.load import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(root / "diffusion_models" / UNET, torch.float32)
    message = str(exc.value)
    assert "FIBO 2" in message and "UNETLoader" in message and "type fibo2" in message


def test_a_qwen3_vl_too_shallow_for_the_taps_names_the_clip(env):
    from nodes.families.base import ConditioningError

    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="fibo2")
    with clip.encoder("text_encoder") as qwen:
        layers = qwen.layers
        qwen.layers = layers[:20]
        qwen.config.num_hidden_layers = 20
        try:
            with pytest.raises(ConditioningError) as exc:
                clip.encode("x")
        finally:
            qwen.layers, qwen.config.num_hidden_layers = layers, len(layers)
    assert exc.value.input_name == "clip" and "35" in str(exc.value)


def test_files_given_to_the_wrong_loader_name_the_file_and_the_loader(root, env):
    """The FIBO 2 transformer given to CLIPLoader type fibo2, and the Qwen3-VL file given to UNETLoader."""
    import shutil

    from engine.context import NodeError

    shutil.copy(root / "diffusion_models" / UNET, root / "text_encoders" / "fibo2-as-clip.safetensors")
    shutil.copy(root / "text_encoders" / CLIP, root / "diffusion_models" / "qwen3vl-as-unet.safetensors")
    try:
        with pytest.raises(NodeError) as exc:
            call(split_loaders.clip_loader, env, clip_name="fibo2-as-clip.safetensors", type="fibo2")
        assert "fibo2-as-clip.safetensors" in str(exc.value) and "diffusion model" in str(exc.value)
        with pytest.raises(NodeError) as exc:
            call(split_loaders.unet_loader, env, unet_name="qwen3vl-as-unet.safetensors")
        assert "qwen3vl-as-unet.safetensors" in str(exc.value) and "CLIPLoader" in str(exc.value)
    finally:
        (root / "text_encoders" / "fibo2-as-clip.safetensors").unlink()
        (root / "diffusion_models" / "qwen3vl-as-unet.safetensors").unlink()


def test_a_batch_of_two_with_cfg_equals_the_pipelines_two_images(registry, env):
    """TextEncodeFibo2's batch_size 2: image k's noise from seed + k (Kiln's rule), the prompt and the
    shorter negative each evaluated for both rows; the pipeline with num_images_per_prompt 2 on that noise."""
    graph = _graph(CAPTION, NEGATIVE, 7, 3, 3.0)
    graph["2"]["inputs"]["batch_size"] = 2
    ours = run(registry, env, parse(graph)).results["6"][0].numpy()
    noise = torch.cat([_noise(7), _noise(8)])
    with torch.no_grad():
        theirs = tiny_fibo2.pipeline()(
            prompt=CAPTION, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=3,
            guidance_scale=3.0, num_images_per_prompt=2, latents=fibo2.unpatch(noise), output_type="np").images
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255
    assert np.abs(ours[0] - ours[1]).max() > 0.02  # two noises, two pictures
