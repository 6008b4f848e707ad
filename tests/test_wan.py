"""ChronoEdit (Wan 2.1 image-to-video) on a tiny random model, from ComfyUI's split files through the real
loaders, against ChronoEditPipeline.

The tiny ChronoEdit (tests/tiny_wan.py) is written as ComfyUI's files under the template's names: the
transformer in Wan's key layout, UMT5 with its SentencePiece model, CLIP ViT, the Wan 2.1 VAE in Wan's
layout. ComfyUI's graph (UNETLoader, ModelSamplingSD3 5, ScaleROPE scale_t 7, CLIPLoader type wan,
CLIPVisionLoader + CLIPVisionEncode none, VAELoader, WanImageToVideo length 5, KSampler euler/simple,
VAEDecode, ImageFromBatch 4) equals the pipeline's last frame within 1/255 per pixel (temporal reasoning
off, as the template); without ScaleROPE the frames sit at 0 and 1 instead of 0 and 7 and the picture
differs, as it does for another start image.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_wan
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from engine.context import NodeError
from nodes.checkpoint import wan_keys

PROMPT = "make the sky blue and add a red balloon"
NEGATIVE = "blurry, dark"
SIZE, LENGTH, STEPS, CFG, SEED = tiny_wan.PICTURE, 5, 2, 4.0, 3

def _make(folder):
    """The template's files, and a Wan text-to-video transformer (no CLIP vision projection) beside them."""
    from flow_family_files import save_state

    root = tiny_wan.make_models_folder(folder)
    t2v = {k: v for k, v in tiny_wan.original_state().items() if not k.startswith("img_emb.") and "_img" not in k}
    save_state(root / "diffusion_models" / "tiny-wan-t2v.safetensors", t2v)
    return root


root = models_root(_make, "wan-models")


def _picture(seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)


def _graph(picture: str, scale_rope: bool = True, steps: int = STEPS) -> dict:
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_wan.UNET, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 5.0}},
        "3": {"class_type": "ScaleROPE", "inputs": {"model": ["2", 0], "scale_x": 1.0, "shift_x": 0.0,
                                                    "scale_y": 1.0, "shift_y": 0.0, "scale_t": 7.0, "shift_t": 0.0}},
        "4": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_wan.CLIP, "type": "wan"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 0]}},
        "7": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": tiny_wan.CLIP_VISION}},
        "8": {"class_type": "LoadImage", "inputs": {"image": picture}},
        "9": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["7", 0], "image": ["8", 0], "crop": "none"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_wan.VAE}},
        "11": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["5", 0], "negative": ["6", 0], "vae": ["10", 0], "clip_vision_output": ["9", 0],
            "start_image": ["8", 0], "width": SIZE, "height": SIZE, "length": LENGTH, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["3" if scale_rope else "2", 0], "seed": SEED, "steps": steps, "cfg": CFG,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["11", 0], "negative": ["11", 1],
            "latent_image": ["11", 2], "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["10", 0]}},
        "14": {"class_type": "ImageFromBatch", "inputs": {"image": ["13", 0], "batch_index": 4, "length": 1}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "chronoedit"}},
    }
    return graph


def _reference(picture: np.ndarray) -> np.ndarray:
    """ChronoEditPipeline's last frame (temporal reasoning off: 5 frames)."""
    with torch.no_grad():
        frames = tiny_wan.pipeline()(
            image=Image.fromarray(picture), prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
            num_frames=LENGTH, num_inference_steps=STEPS, guidance_scale=CFG, output_type="np",
            generator=torch.Generator("cpu").manual_seed(SEED)).frames
    return frames[0, -1]


def _kiln(registry, env) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The start and other pictures, and Kiln's last frames: with ScaleROPE, for the other picture, and
    without ScaleROPE; the whole decoded video of the first."""
    pictures, out = {}, {}
    for name, seed in (("start.png", 0), ("other.png", 1)):
        pictures[name] = _picture(seed)
        Image.fromarray(pictures[name]).save(env.paths.input.root / name)
    for key, graph in (("start", _graph("start.png")), ("other", _graph("other.png")),
                       ("plain-rope", _graph("start.png", scale_rope=False))):
        outcome = run(registry, env, parse(graph))
        out[key] = outcome.results["14"][0].numpy()
        if key == "start":
            out["video"] = outcome.results["13"][0].numpy()
    return pictures, out


def test_key_table_is_diffusers_converter_and_round_trips():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    original = tiny_wan.original_state()
    assert wan_keys.is_original(original) and wan_keys.I2V_MARKER in original
    theirs = convert_wan_transformer_to_diffusers({"model.diffusion_model." + k: v for k, v in original.items()})
    ours = wan_keys.original_to_diffusers(original)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert wan_keys.diffusers_to_original(ours).keys() == original.keys()


def test_chronoedit_graph_equals_the_pipelines_last_frame(registry, env):
    pictures, kiln = _kiln(registry, env)
    want = _reference(pictures["start.png"])
    got = kiln["start"][0]
    assert kiln["video"].shape == (LENGTH, SIZE, SIZE, 3)  # VAEDecode gives every frame of the video
    assert np.allclose(kiln["video"][-1], got)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1 / 255, np.abs(got - want).max()
    # not vacuous: the start image and ScaleROPE's positions both change the picture
    assert np.abs(got - kiln["other"][0]).max() > 0.02
    assert np.abs(got - kiln["plain-rope"][0]).max() > 0.02


def _failure(registry, env, graph: dict) -> str:
    from engine.executor import Executor

    outcome = Executor(registry, env).run(parse(graph))
    assert outcome.status != "succeeded"
    return outcome.error.message


def test_bad_inputs_are_named(registry, env):
    Image.fromarray(_picture(0)).save(env.paths.input.root / "start.png")
    no_vision = _graph("start.png")
    del no_vision["11"]["inputs"]["clip_vision_output"]
    assert "clip_vision_output" in _failure(registry, env, no_vision)
    image_latent = _graph("start.png")
    image_latent["16"] = {"class_type": "EmptySD3LatentImage",
                          "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    image_latent["12"]["inputs"]["latent_image"] = ["16", 0]
    assert "WanImageToVideo" in _failure(registry, env, image_latent)
    t2v = _graph("start.png")
    t2v["1"]["inputs"]["unet_name"] = "tiny-wan-t2v.safetensors"
    assert "text-to-video" in _failure(registry, env, t2v)


def test_scale_rope_refuses_a_model_without_wans_positions(env):
    from dataclasses import replace

    from node_call import call
    from nodes import split_loaders, wan_nodes

    (model,) = call(split_loaders.unet_loader, env, unet_name=tiny_wan.UNET, weight_dtype="default")
    (scaled,) = call(wan_nodes.scale_rope, env, model=model, scale_x=1.0, shift_x=0.0, scale_y=1.0, shift_y=0.0,
                     scale_t=7.0, shift_t=0.0)
    assert scaled is not model and scaled.family is model.family
    # a network patch, as ComfyUI's rope_options: the sampling loop sets it on the network for the run
    # (and DualModelGuider's on both networks), the handle it came from keeps plain positions
    assert dict(scaled.patches.rope)["scale_t"] == 7.0 and model.patches.rope is None
    from nodes.checkpoint.wan_rope import applied, rope_of

    with model.unet() as network:
        rope = rope_of(network)
        with applied(network, scaled.patches.rope):
            assert rope.options["scale_t"] == 7.0
        assert rope.options is None
    other = replace(model, _peek=lambda: torch.nn.Linear(2, 2))
    with pytest.raises(NodeError) as info:
        call(wan_nodes.scale_rope, env, model=other, scale_x=1.0, shift_x=0.0, scale_y=1.0, shift_y=0.0,
             scale_t=7.0, shift_t=0.0)
    assert info.value.input_name == "model" and "ScaleROPE" in str(info.value)


def test_rope_reads_integer_positions_from_the_table_and_computes_the_others_by_the_same_rule():
    from nodes.checkpoint.wan_rope import WanRope

    x = torch.zeros(1, 36, 2, 4, 6)
    tabled = WanRope(128, (1, 2, 2), tiny_wan.components()["transformer"].rope)
    computed = WanRope(128, (1, 2, 2))
    for options in (None, {"scale_t": 7.0}, {"scale_t": 2.5, "shift_y": 0.5, "scale_x": 3.0}):
        tabled.options = computed.options = options
        (a, b), (c, d) = tabled(x), computed(x)
        assert a.shape == (1, 2 * 2 * 3, 1, 128) and torch.allclose(a, c, atol=1e-6) and torch.allclose(b, d, atol=1e-6)
    assert not torch.allclose(a, tabled.__class__(128, (1, 2, 2))(x)[0])  # the options move the positions
