"""Qwen-Image 2.1 on a tiny random model, from ComfyUI's split files through the real loaders, against
QwenImage21Pipeline.

The tiny model (tests/tiny_qwen_image21.py) is written as ComfyUI's files: the transformer with its
fused ``gate_up`` (bare and under ``model.diffusion_model.``) and in diffusers' names, Qwen3-VL as
ComfyUI's qwen3vl_8b file, the 64-channel VAE in ComfyUI's layout and in diffusers'. Graphs
(UNETLoader, CLIPLoader type qwen_image, VAELoader, CLIPTextEncode or TextEncodeQwenImage21,
KSampler) equal the pipeline's images within 1/255 per pixel; each parity test also checks that what
it varies changes the picture.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_qwen_image21 as tiny
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run, same_state, save_state  # noqa: F401 (fixtures)
from node_call import call
from nodes import loaders, split_loaders
from nodes.checkpoint import qwen_image21_keys as keys
from nodes.checkpoint.load import CheckpointError
from nodes.families import qwen_image21

PROMPT = "a fox in the snow"
NEGATIVE = "blurry, dark"
SIZE = 64
UNET, CLIP, VAE = "tiny-qwen21.safetensors", "tiny-qwen3vl_8b.safetensors", "tiny-qwen_image_2.1_vae.safetensors"

root = models_root(tiny.make_models_folder, "qwen21-models")


def _reference(prompt: str, seed: int, steps: int, cfg: float = 1.0, negative: str | None = None) -> np.ndarray:
    """The pipeline's RGBA picture (its VAE decodes RGBA, as Kiln's and ComfyUI's VAEDecode give it)."""
    with torch.no_grad():
        return tiny.pipeline()(prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg, height=SIZE, width=SIZE,
                                 num_inference_steps=steps, output_type="np",
                                 generator=torch.Generator("cpu").manual_seed(seed)).images


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, *, unet: str = UNET,
           node: bool = False, vae: str = VAE) -> dict:
    """ComfyUI's text-to-image graph: CLIPTextEncode twice and EmptyLatentImage, or (``node``) the
    template's TextEncodeQwenImage21 (its latent) behind QwenImage21Cache."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "qwen_image"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "qwen21"}},
    }
    if node:
        for k in ("2", "3", "4"):
            del graph[k]
        graph["10"] = {"class_type": "TextEncodeQwenImage21", "inputs": {
            "clip": ["8", 0], "vae": ["9", 0], "prompt": prompt, "negative_prompt": negative, "resolution": SIZE}}
        graph["11"] = {"class_type": "QwenImage21Cache", "inputs": {"model": ["1", 0], "device": "auto",
                                                                   "dtype": "default"}}
        graph["5"]["inputs"].update(model=["11", 0], positive=["10", 0], negative=["10", 1], latent_image=["10", 2])
    return graph


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


# -- loading ------------------------------------------------------------------------------------------


def test_comfy_layout_fuses_gate_then_up_and_round_trips():
    original = tiny.original_state()
    block = "transformer_blocks.1.img_mlp."
    want = tiny.components()["transformer"].state_dict()
    assert block + "gate_up.weight" in original and block + "proj.weight" not in original
    assert torch.equal(original[block + "gate_up.weight"],
                       torch.cat([want[block + "gate_layer.weight"], want[block + "proj.weight"]]))
    back = keys.original_to_diffusers(original)
    assert same_state(back, want)
    names = keys.original_names(want)  # every diffusers tensor under the name of the ComfyUI tensor holding it
    assert set(names.values()) == set(original) and names[block + "proj.weight"] == block + "gate_up.weight"
    config = keys.transformer_config({k: tuple(v.shape) for k, v in original.items()})
    assert config["axes_dims_rope"] == (4, 14, 14) and config["num_layers"] == tiny.LAYERS
    release = {"img_in.weight": (4096, 64), "transformer_blocks.0.attn.norm_q.weight": (128,),
               "transformer_blocks.0.img_mlp.out.weight": (4096, 12288), "proj_out.weight": (64, 4096),
               keys.MARKER: (4096,)}
    assert keys.transformer_config(release)["axes_dims_rope"] == (16, 56, 56)


@pytest.mark.parametrize("name", [UNET, "tiny-qwen21-prefixed.safetensors", "tiny-qwen21-diffusers-keys.safetensors"])
def test_unet_loader_detects_qwen_image21_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is qwen_image21.FAMILY and model.scheduler_config["base_shift"] == qwen_image21.MU
    assert model.latent_channels == 64
    want = tiny.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
    assert same_state(got, want)


def test_clip_loader_qwen_image_reads_a_qwen3_vl_file_as_qwen_image21(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    with clip.encoder("text_encoder") as qwen:
        kind, got = type(qwen).__name__, qwen.state_dict()
    assert clip.family is qwen_image21.FAMILY and kind == "Qwen3VLTextModel"
    assert same_state(got, tiny.components()["text_encoder"].model.language_model.state_dict())


def test_a_text_only_qwen3_vl_8b_file_loads_and_a_4b_one_is_refused(env, root):
    """Without its vision tower the 8B file has a Qwen3's keys; type qwen_image reads it as Qwen3-VL. A file
    neither 4096 wide nor holding its own lm_head (Krea 2's tied 4B) is not Qwen-Image 2.1's."""
    state = tiny.comfy_text_state()
    save_state(root / "text_encoders" / "tiny-qwen3vl_8b-text.safetensors",
               {k: v for k, v in state.items() if not k.startswith("visual.")})
    save_state(root / "text_encoders" / "tiny-qwen3vl_4b-like.safetensors",
               {k: v for k, v in state.items() if k != "lm_head.weight"})
    (clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_8b-text.safetensors", type="qwen_image")
    (full,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    assert clip.family is qwen_image21.FAMILY and torch.equal(clip.encode(PROMPT)[0][0], full.encode(PROMPT)[0][0])
    with pytest.raises(Exception, match=r"needs Qwen2.5-VL, got tiny-qwen3vl_4b-like.safetensors \(Qwen3-VL\)"):
        call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_4b-like.safetensors", type="qwen_image")


def test_the_transformer_in_checkpoint_loader_names_its_loaders(root):
    from nodes.checkpoint.load import load_checkpoint

    with pytest.raises(CheckpointError, match=r"Qwen-Image 2\.1 transformer.*UNETLoader.*qwen3vl_8b.*qwen_image"):
        load_checkpoint(root / "diffusion_models" / UNET, torch.float32)


@pytest.mark.parametrize("name", [VAE, "tiny-qwen_image_2.1_vae-diffusers.safetensors"])
def test_vae_loader_reads_both_layouts_as_the_64_channel_vae(env, name):
    (vae,) = call(loaders.vae_loader, env, vae_name=name)
    assert vae.latent_channels == 64 and vae.downscale == 16
    want = tiny.components()["vae"].state_dict()
    with vae.module() as module:
        got = module.vae.state_dict()
    assert same_state(got, want)


def test_vae_encode_pads_an_opaque_alpha_and_decode_gives_rgba(env):
    """ComfyUI's rule for an RGB picture on the RGBA VAE: alpha 1 appended before encoding."""
    (vae,) = call(loaders.vae_loader, env, vae_name=VAE)
    pixels = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    x = torch.cat([pixels.permute(0, 3, 1, 2) * 2 - 1, torch.ones(1, 1, 32, 32)], dim=1).unsqueeze(2)
    with torch.no_grad():
        want = tiny.components()["vae"].encode(x).latent_dist.mean[:, :, 0]
    latent = vae.encode(pixels)
    assert latent.shape == (1, 64, 2, 2) and torch.allclose(latent, want, atol=1e-5)
    assert vae.decode(latent).shape == (1, 32, 32, 4)


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_conditioning_equals_the_pipelines_encode_prompt(env, prompt):
    """The last layer before the final norm, the system turn dropped (an empty prompt is " ")."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    [[ours, extra]] = clip.encode(prompt)
    with torch.no_grad():
        theirs, mask, _ = tiny.pipeline().encode_prompt(prompt, device=torch.device("cpu"))
    assert mask is None and ours.shape == theirs.shape and bool(extra[qwen_image21.MASK].all())
    assert torch.allclose(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    with clip.encoder("text_encoder") as qwen, torch.no_grad():  # not the normed last_hidden_state
        ids = clip.tokenizers["tokenizer"]([qwen_image21.TEMPLATE.format(prompt or " ")], return_tensors="pt").input_ids
        normed = qwen(input_ids=ids).last_hidden_state[:, -ours.shape[1]:]
    assert (normed - ours).abs().max() > 0.1


# -- sampling ---------------------------------------------------------------------------------------------


def test_clip_text_encode_cfg1_equals_the_pipeline(registry, env):
    """The template's settings (KSampler euler/simple, cfg 1; EmptyLatentImage resized to 16 px a cell)."""
    ours = _run(registry, env, _graph(PROMPT, "", 3, 4, 1.0))
    reference = _reference(PROMPT, 3, 4)
    gap = np.abs(ours - reference).max()
    print(f"cfg1 gap {gap * 255:.5f}/255")
    assert ours.shape == reference.shape == (1, SIZE, SIZE, 4) and gap <= 1 / 255, gap
    assert 0.02 < ours.std() and np.abs(ours - _run(registry, env, _graph(PROMPT, "", 4, 4, 1.0))).max() > 0.02
    assert np.abs(ours - _run(registry, env, _graph("a red car", "", 3, 4, 1.0))).max() > 0.02


def test_text_encode_node_with_negative_and_cfg_equals_the_pipelines_true_cfg(registry, env):
    """TextEncodeQwenImage21's positive, negative and latent, through QwenImage21Cache, at cfg 3."""
    ours = _run(registry, env, _graph(PROMPT, NEGATIVE, 5, 3, 3.0, node=True,
                                      unet="tiny-qwen21-prefixed.safetensors"))
    gap = np.abs(ours - _reference(PROMPT, 5, 3, cfg=3.0, negative=NEGATIVE)).max()
    print(f"true cfg gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other = _run(registry, env, _graph(PROMPT, "a cat", 5, 3, 3.0, node=True, unet="tiny-qwen21-prefixed.safetensors"))
    assert np.abs(ours - other).max() > 0.02  # the negative matters


def test_a_same_length_negative_batched_with_the_prompt_and_a_batch_of_two(registry, env):
    """A negative of the prompt's length (which may share the positive's call: two rows, two texts) is still
    the pipeline's true CFG; an EmptyLatentImage batch of two samples two different pictures."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    assert clip.encode("a red fox")[0][0].shape == clip.encode("a blue cat")[0][0].shape
    ours = _run(registry, env, _graph("a red fox", "a blue cat", 6, 3, 2.5))
    gap = np.abs(ours - _reference("a red fox", 6, 3, cfg=2.5, negative="a blue cat")).max()
    assert gap <= 1 / 255, gap
    graph = _graph(PROMPT, "", 3, 3, 1.0)
    graph["4"]["inputs"]["batch_size"] = 2
    two = _run(registry, env, graph)
    assert two.shape == (2, SIZE, SIZE, 4) and np.abs(two[0] - two[1]).max() > 0.02


def test_a_diffusers_folder_through_checkpoint_loader_equals_the_pipeline_with_its_scheduler(registry, env, root):
    """The folder's own scheduler (the release's size rule) sets the shift, as QwenImage21Pipeline's does."""
    folder = tiny.make_pipeline_folder(root / "checkpoints" / "tiny-qwen21-diffusers")
    graph = _graph(PROMPT, "", 7, 3, 1.0)
    graph["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": folder.name}}
    for node, socket in (("2", "clip"), ("3", "clip"), ("6", "vae")):
        graph[node]["inputs"][socket] = ["1", 1 if socket == "clip" else 2]
    ours = _run(registry, env, graph)
    pipe = tiny.pipeline()
    pipe.scheduler = type(pipe.scheduler).from_config(tiny.RELEASE_SCHEDULER)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(7)).images
    gap = np.abs(ours - theirs).max()
    print(f"folder gap {gap * 255:.4f}/255")
    assert gap <= 1 / 255
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, "", 7, 3, 1.0))).max() > 1e-3  # mu 0.69 differs


# -- refusals ---------------------------------------------------------------------------------------------


def test_text_encode_node_refuses_pictures_by_input_and_other_clips(env):
    from nodes.qwen21_nodes import text_encode_qwen_image21

    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    with pytest.raises(NodeError) as err:
        call(text_encode_qwen_image21, env, clip=clip, prompt="x", negative_prompt="", resolution=64,
             **{"images.image_1": torch.zeros(1, 32, 32, 3)})
    assert err.value.input_name == "images.image_1" and "vision tower" in str(err.value)
    positive, negative, latent = call(text_encode_qwen_image21, env, clip=clip, prompt="x", negative_prompt="",
                                      resolution=0)
    assert latent["samples"].shape == (1, 64, 64, 64)


def test_a_transformer_missing_a_layer_is_named_with_family_and_file(tmp_path):
    from nodes.checkpoint.qwen_image21_load import build_transformer

    state = dict(tiny.original_state())
    del state["proj_out.weight"]
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*Qwen-Image 2\.1.*proj_out"):
        build_transformer(state, "broken.safetensors", torch.float32)


def test_a_vae_with_deeper_kernels_is_refused_by_name():
    from nodes.checkpoint.qwen_image21_load import build_vae

    state = dict(tiny.comfy_vae_state())
    state["encoder.conv1.weight"] = state["encoder.conv1.weight"].expand(-1, -1, 3, -1, -1).contiguous()
    with pytest.raises(CheckpointError, match=r"wan\.safetensors.*Qwen-Image 2\.1 VAE.*encoder\.conv1\.weight"):
        build_vae(state, "wan.safetensors", torch.float32)
    shapes = {k: tuple(v.shape) for k, v in tiny.comfy_vae_state().items()}
    assert keys.is_vae(shapes) and not keys.is_vae({**shapes, "decoder.head.2.weight": (12, 12, 3, 3, 3)})  # Wan 2.2
