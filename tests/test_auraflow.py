"""AuraFlow on a tiny random model: Kiln's family and loaders against diffusers' AuraFlowPipeline.

Both sides get the same weights, seed, steps and guidance. Text to image is compared with the pipeline itself;
image to image (the pipeline has none; AddNoise + KSampler, called and as a VAEEncode graph) with the pipeline's
own parts driven by hand: its encode_prompt, its
scheduler (FlowMatchEuler, shift 1.73, set_timesteps(N), the strength rule of diffusers' flow img2img pipelines:
start at index int(N - N * strength), ``scale_noise`` of the init latent) and its transformer with CFG. The tiny
files (tests/tiny_auraflow.py) load through UNETLoader + CLIPLoader + VAELoader, CheckpointLoaderSimple (the
all-in-one file, with its tokenizer in it or beside it, and the diffusers folder); the pictures must agree
within 1/255 per pixel, and each test shows that what it varies matters.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import tiny_auraflow
import tiny_models
import tiny_wan
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import (checkpoint_loader, clip_over, env, model_over, models_root,  # noqa: F401 (fixtures)
                               registry, run, txt2img_graph, unet_weights)
from node_call import Recorder, call
from nodes import loaders, split_loaders
from nodes.checkpoint import auraflow_keys
from nodes.checkpoint.spiece_file import SpieceTokenizer
from nodes.families import auraflow
from nodes.latent import add_noise
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT = "a photo of a cat on a mat"
NEGATIVE = "the quick brown fox"
SIZE, STEPS, CFG = 64, 4, 3.5
SPLIT = {"unet_name": "tiny-auraflow.safetensors", "clip_name": "tiny-pile-t5.safetensors",
         "vae_name": "tiny-sdxl-vae.safetensors"}

root = models_root(tiny_auraflow.make_models_folder, "auraflow-models")


def _clip():
    return clip_over(auraflow.FAMILY, SpieceTokenizer(tiny_wan.spiece_model(), eos=True),
                     tiny_auraflow.components()["text_encoder"])


def _model():
    return model_over(auraflow.FAMILY, tiny_auraflow.components()["transformer"])


def _decode(samples: torch.Tensor) -> torch.Tensor:
    return tiny_models.decode(tiny_auraflow.components()["vae"], samples)


def kiln(prompt: str, negative: str, cfg: float = CFG, *, seed: int = 5, steps: int = STEPS) -> torch.Tensor:
    clip = _clip()
    (out,) = ksampler(Recorder().ctx, _model(), seed, steps, cfg, "euler", "simple", clip.encode(prompt),
                      clip.encode(negative), {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)})
    return _decode(out["samples"])


def diffusers(prompt: str, negative: str, cfg: float = CFG, *, seed: int = 5, steps: int = STEPS,
              output_type: str = "pt"):
    with torch.no_grad():
        images = tiny_auraflow.pipeline()(
            prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
            guidance_scale=cfg, output_type=output_type, generator=torch.Generator().manual_seed(seed)).images
    return images.permute(0, 2, 3, 1) if output_type == "pt" else images


@functools.lru_cache(maxsize=None)
def pipeline_picture() -> np.ndarray:
    """The pipeline's picture for PROMPT/NEGATIVE at the defaults (seed 5, STEPS, CFG) as numpy, made once: the
    graph tests on every loader and ComfyUI's graph shape all compare against this same reference."""
    return diffusers(PROMPT, NEGATIVE, output_type="np")


def _init_raw() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(11)) * 4.0


def by_hand_img2img(strength: float, *, seed: int = 9, steps: int = 6, cfg: float = CFG,
                    raw: torch.Tensor | None = None) -> torch.Tensor:
    """The pipeline's parts driven step by step (see the module docstring) from the raw latent ``raw``
    (default :func:`_init_raw`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts, pipe = tiny_auraflow.components(), tiny_auraflow.pipeline()
    sched = FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler"].config)
    sched.set_timesteps(steps)
    start = int(max(steps - steps * strength, 0))  # diffusers' get_timesteps
    timesteps = sched.timesteps[start:]
    sched.set_begin_index(start)
    clean = (_init_raw() if raw is None else raw) * parts["vae"].config.scaling_factor
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    x = sched.scale_noise(clean, timesteps[:1], noise)
    with torch.no_grad():
        pe, _, ne, _ = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, device="cpu")
        for t in timesteps:
            out = parts["transformer"](torch.cat([x, x]), encoder_hidden_states=torch.cat([ne, pe]),
                                       timestep=torch.tensor([t / 1000]).expand(2), return_dict=False)[0]
            uncond, cond = out.chunk(2)
            x = sched.step(uncond + cfg * (cond - uncond), t, x, return_dict=False)[0]
    return _decode(x / parts["vae"].config.scaling_factor)


def kiln_img2img(strength: float, *, seed: int = 9, steps: int = 6, cfg: float = CFG) -> torch.Tensor:
    clip, model = _clip(), _model()
    (latent,) = add_noise(Recorder().ctx, model, {"samples": _init_raw()}, strength=strength, seed=seed)
    (out,) = ksampler(Recorder().ctx, model, seed, steps, cfg, "euler", "simple", clip.encode(PROMPT),
                      clip.encode(NEGATIVE), latent)
    return _decode(out["samples"])


def _split_loaders(clip_name: str = SPLIT["clip_name"], clip_type: str = "stable_diffusion") -> dict:
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": SPLIT["unet_name"], "weight_dtype": "default"}},
            "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": clip_type}},
            "9": {"class_type": "VAELoader", "inputs": {"vae_name": SPLIT["vae_name"]}},
            "_model": ["1", 0], "_clip": ["8", 0], "_vae": ["9", 0]}


# -- keys and text ---------------------------------------------------------------------------------


def test_key_map_matches_diffusers_converter_and_the_shapes_give_the_release_config():
    """Our table gives the tensors diffusers' converter gives (the tiny model, values compared), and release-sized
    shapes (4 joint and 32 single blocks, 12 heads of 256, Pile-T5-XL's 2048; built on meta) give that config back."""
    from diffusers import AuraFlowTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers as theirs

    original = tiny_auraflow.original_transformer()
    assert "modF.1.weight" in original and "double_layers.0.attn.w2q.weight" in original
    ours, want = auraflow_keys.original_to_diffusers(original), theirs(dict(original))
    assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want)
    release = dict(sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=4, num_single_dit_layers=32,
                   attention_head_dim=256, num_attention_heads=12, joint_attention_dim=2048,
                   caption_projection_dim=3072, out_channels=4, pos_embed_max_size=1024)
    with torch.device("meta"):
        big = AuraFlowTransformer2DModel(**release)
    shapes = {k: tuple(v.shape) for k, v in auraflow_keys.diffusers_to_original(big.state_dict()).items()}
    assert auraflow_keys.transformer_config(shapes) == release


def test_a_damaged_file_is_named_with_its_keys(env, root):
    from flow_family_files import save_state

    state = tiny_auraflow.original_transformer()
    state.pop("single_layers.0.attn.w1k.weight")
    state["double_layers.0.attn.extra.weight"] = torch.zeros(2, 2)
    save_state(root / "diffusion_models" / "tiny-auraflow-damaged.safetensors", state)
    with pytest.raises(NodeError) as err:
        call(split_loaders.unet_loader, env, unet_name="tiny-auraflow-damaged.safetensors")
    message = str(err.value)
    assert "tiny-auraflow-damaged.safetensors" in message and "single_layers.0.attn.w1k.weight" in message
    assert "double_layers.0.attn.extra.weight" in message


def test_the_files_sentencepiece_tokenizes_as_the_pipelines_tokenizer():
    ours, theirs = SpieceTokenizer(tiny_wan.spiece_model(), eos=True), tiny_auraflow.components()["tokenizer"]
    for text in (PROMPT, "", NEGATIVE, "make the  sky blue"):
        assert ours(text)["input_ids"] == theirs(text).input_ids


def test_prompt_encoding_is_the_pipelines_zero_padded_256_tokens():
    with torch.no_grad():
        embeds, mask, neg, neg_mask = tiny_auraflow.pipeline().encode_prompt(PROMPT, NEGATIVE, device="cpu")
    for text, want in ((PROMPT, embeds), (NEGATIVE, neg)):
        (ours, extra), = _clip().encode(text)
        assert ours.shape == (1, 256, tiny_auraflow.TEXT) and extra == {}
        assert torch.allclose(ours, want, atol=1e-5)
    count = int(mask.reshape(1, 256, -1)[0, :, 0].sum())  # the pipeline's mask, expanded over the width
    assert 1 < count < 256 and ours[0, count:].abs().max() == 0 and embeds[0, :count].abs().min() > 0


# -- sampling ----------------------------------------------------------------------------------------


def test_txt2img_equals_auraflow_pipeline():
    ours, theirs = kiln(PROMPT, NEGATIVE), diffusers(PROMPT, NEGATIVE)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(PROMPT, NEGATIVE, seed=6)).abs().max() > 0.02  # the seed matters
    assert (ours - kiln("make the sky blue", NEGATIVE)).abs().max() > 0.02  # and the prompt


def test_img2img_equals_the_pipelines_scheduler_driven_by_hand():
    ours, theirs = kiln_img2img(0.6), by_hand_img2img(0.6)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln_img2img(0.9)).abs().max() > 0.02  # strength matters


def test_modelsamplingauraflow_sets_the_shift_and_its_default_is_the_release():
    from nodes.sd3_nodes import model_sampling_aura_flow

    model = _model()
    assert model.scheduler_config["shift"] == 1.73
    (same,) = model_sampling_aura_flow(Recorder().ctx, model)
    (other,) = model_sampling_aura_flow(Recorder().ctx, model, shift=3.0)
    assert same.scheduler_config["shift"] == 1.73 and other.scheduler_config["shift"] == 3.0
    clip = _clip()

    def sample(m):
        (out,) = ksampler(Recorder().ctx, m, 5, 3, CFG, "euler", "simple", clip.encode(PROMPT), clip.encode(""),
                          {"samples": torch.zeros(1, 4, 8, 8)})
        return out["samples"]

    assert torch.equal(sample(same), sample(model)) and (sample(other) - sample(model)).abs().max() > 1e-3


def test_a_latent_larger_than_the_position_table_is_refused_naming_the_input():
    clip = _clip()
    with pytest.raises(NodeError) as err:
        ksampler(Recorder().ctx, _model(), 5, 1, CFG, "euler", "simple", clip.encode(PROMPT), clip.encode(""),
                 {"samples": torch.zeros(1, 4, 24, 24)})  # 12 patches a side; the table is 8x8
    assert err.value.input_name == "latent_image" and "position table" in str(err.value)


# -- loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-auraflow.safetensors", "tiny-auraflow-prefixed.safetensors",
                                  "tiny-auraflow-diffusers-keys.safetensors", "tiny-auraflow-aio.safetensors"])
def test_unetloader_reads_both_layouts_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    got, want = unet_weights(model), tiny_auraflow.components()["transformer"].state_dict()
    assert model.family is auraflow.FAMILY and set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("clip_type", ["stable_diffusion", "sd3", "wan"])
def test_cliploader_under_any_type_reads_pile_t5_and_the_tokenizer_in_the_file(env, clip_type):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=SPLIT["clip_name"], type=clip_type)
    assert clip.family is auraflow.FAMILY and isinstance(clip.tokenizers["tokenizer"], SpieceTokenizer)
    assert torch.allclose(clip.encode(PROMPT)[0][0], _clip().encode(PROMPT)[0][0], atol=1e-6)


def test_a_pile_t5_file_without_a_tokenizer_is_refused_naming_the_input_and_the_place(env):
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-pile-t5-notok.safetensors", type="stable_diffusion")
    assert err.value.input_name == "clip_name"
    assert "CLIPLoader" in str(err.value) and "pile_t5_tokenizer" in str(err.value)


def test_a_checkpoint_with_no_tokenizer_anywhere_is_refused_naming_the_node_input_and_place(env):
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-auraflow-notok.safetensors")
    message = str(err.value)
    assert err.value.input_name == "ckpt_name" and "CheckpointLoaderSimple" in message
    assert "spiece_model" in message and "pile_t5_tokenizer" in message and "tiny-auraflow-notok.tokenizer" in message


@pytest.mark.parametrize("loader", ["split", "tiny-auraflow.safetensors", "tiny-auraflow-beside.safetensors",
                                    "shared/tiny-auraflow-shared.safetensors", "tiny-auraflow-diffusers"])
def test_graphs_on_the_files_equal_auraflow_pipeline(registry, env, loader):
    """UNETLoader + CLIPLoader + VAELoader; the all-in-one file with its tokenizer in it, in a folder beside it
    (transformers' files) and in the shared pile_t5_tokenizer/ (the SentencePiece model alone); the diffusers
    folder: KSampler euler, cfg 3.5, against the pipeline."""
    nodes = _split_loaders() if loader == "split" else checkpoint_loader(loader)
    graph = txt2img_graph(nodes, prompt=PROMPT, negative=NEGATIVE, size=SIZE, seed=5, steps=STEPS, cfg=CFG,
                          scheduler="simple", latent="EmptyLatentImage")
    ours = run(registry, env, parse(graph)).results["6"][0].numpy()
    theirs = pipeline_picture()
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    if loader == "split":  # the prompt matters: not vacuous (once: every loader meets the same reference)
        graph["2"]["inputs"]["text"] = "make the sky blue"
        other = run(registry, env, parse(graph)).results["6"][0].numpy()
        assert np.abs(ours - other).max() > 0.02


def test_diffusersloader_reads_the_folder_with_its_own_tokenizer(env):
    model, clip, vae = call(loaders.diffusers_loader, env, model_path="tiny-auraflow")
    got, want = unet_weights(model), tiny_auraflow.components()["transformer"].state_dict()
    assert model.family is auraflow.FAMILY and all(torch.equal(got[k], want[k]) for k in want)
    assert model.scheduler_config["shift"] == pytest.approx(1.73)
    assert torch.allclose(clip.encode(PROMPT)[0][0], _clip().encode(PROMPT)[0][0], atol=1e-6)


def test_weight_dtype_fp8_keeps_fp8_linears_and_stays_close(env):
    from flow_family_files import fp8_sampling_gap

    gap = fp8_sampling_gap(env, SPLIT["unet_name"], _clip(),
                           lambda net: net.joint_transformer_blocks[0].attn.to_q.weight,
                           prompt=PROMPT, negative=NEGATIVE, scheduler="simple", channels=4)
    assert 0 < gap < 0.25  # 8-bit weights on a tiny random model: close, not equal


def test_a_lone_transformer_in_checkpoints_names_the_split_loaders(env, root):
    from flow_family_files import save_state

    save_state(root / "checkpoints" / "tiny-auraflow-lone.safetensors",
               {"model.diffusion_model." + k: v for k, v in tiny_auraflow.original_transformer().items()})
    with pytest.raises(NodeError) as err:
        call(loaders.checkpoint_loader, env, ckpt_name="tiny-auraflow-lone.safetensors")
    message = str(err.value)
    assert err.value.input_name == "ckpt_name" and "Pile-T5-XL" in message and "the VAE" in message
    assert "UNETLoader" in message and "CLIPLoader" in message and "VAELoader" in message


def test_weight_syntax_is_read_as_comfyui_reads_it_for_auraflow():
    """ComfyUI's AuraT5: each word tokenized on its own, the end token last, padding masked and zeroed, and a
    weighted token moved from the empty prompt's state (its end token's state first, zeros after) by its weight.
    Written out here with transformers' tokenizer and UMT5, not Kiln's code."""
    tok, t5 = tiny_auraflow.components()["tokenizer"], tiny_auraflow.components()["text_encoder"]
    pieces = [("a photo of", 1.0), ("a cat", 1.5), ("on a mat", 1.0)]
    ids, weights = [], []
    for text, weight in pieces:
        for word in text.split(" "):
            got = tok(word, add_special_tokens=False).input_ids
            ids, weights = ids + got, weights + [weight] * len(got)
    ids, weights = ids + [tok.eos_token_id], weights + [1.0]
    with torch.no_grad():
        h = t5(torch.tensor([ids])).last_hidden_state[0]
        empty = torch.zeros_like(h)
        empty[0] = t5(torch.tensor([[tok.eos_token_id]])).last_hidden_state[0, 0]
    w = torch.tensor(weights).reshape(-1, 1)
    want = torch.where(w != 1.0, (h - empty) * w + empty, h)
    (ours, _), = _clip().encode("a photo of (a cat:1.5) on a mat")
    assert ours.shape == (1, 256, tiny_auraflow.TEXT) and torch.allclose(ours[0, :len(ids)], want, atol=1e-5)
    assert ours[0, len(ids):].abs().max() == 0
    (unit, _), = _clip().encode("a photo of (a cat:1.0) on a mat")  # the same prompt, no weight: diffusers' way
    assert torch.allclose(unit, _clip().encode(PROMPT)[0][0], atol=1e-6)
    moved = w.reshape(-1) != 1.0
    assert (unit[0, :len(ids)][moved] - ours[0, :len(ids)][moved]).abs().max() > 1e-3  # the weight moves them
    assert torch.allclose(unit[0, :len(ids)][~moved], ours[0, :len(ids)][~moved], atol=1e-5)


def test_cliploader_given_the_transformer_names_it_a_diffusion_model(env, root):
    from flow_family_files import save_state

    save_state(root / "text_encoders" / "tiny-auraflow-misplaced.safetensors", tiny_auraflow.original_transformer())
    with pytest.raises(NodeError) as err:
        call(split_loaders.clip_loader, env, clip_name="tiny-auraflow-misplaced.safetensors", type="stable_diffusion")
    assert err.value.input_name == "clip_name" and "holds a diffusion model" in str(err.value)


def test_saved_files_name_pile_t5_as_comfyui_does():
    """CLIPSave's suffix and LoraSave's text-encoder keys use ComfyUI's name (its checkpoints'
    ``text_encoders.pile_t5xl.transformer.``)."""
    from nodes.families.encoder_names import clip_file_name

    spec = auraflow.FAMILY.text_encoders[0]
    assert clip_file_name(auraflow.FAMILY, spec) == "pile_t5xl"
    assert spec.prefix == f"text_encoders.{clip_file_name(auraflow.FAMILY, spec)}.transformer."


def test_img2img_graph_through_vaeencode_equals_the_scheduler_driven_by_hand(registry, env):
    """CheckpointLoaderSimple, LoadImage, VAEEncode (the posterior's mean), AddNoise (strength 0.6), KSampler,
    VAEDecode: against the pipeline's parts driven by hand from diffusers' VAE's own mean of the same picture."""
    from PIL import Image

    from nodes.sample_image import draw_landscape

    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "scene.png")
    nodes = checkpoint_loader("tiny-auraflow.safetensors")
    graph = txt2img_graph(nodes, prompt=PROMPT, negative=NEGATIVE, size=SIZE, seed=9, steps=6, cfg=CFG,
                          scheduler="simple", latent="EmptyLatentImage")
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "scene.png"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}}
    graph["12"] = {"class_type": "AddNoise", "inputs": {"model": ["1", 0], "latent": ["11", 0], "strength": 0.6,
                                                        "seed": 9}}
    graph["5"]["inputs"]["latent_image"] = ["12", 0]
    del graph["4"]
    ours = run(registry, env, parse(graph)).results["6"][0]
    pixels = torch.from_numpy(np.array(Image.open(env.paths.input.root / "scene.png").convert("RGB"))).float() / 255
    with torch.no_grad():
        raw = tiny_auraflow.components()["vae"].encode(pixels.permute(2, 0, 1)[None] * 2 - 1).latent_dist.mean
    assert (ours - by_hand_img2img(0.6, raw=raw)).abs().max() <= PIXEL_TOL
    graph["12"]["inputs"]["strength"] = 0.9
    assert (run(registry, env, parse(graph)).results["6"][0] - ours).abs().max() > 0.02  # strength matters


def test_comfyuis_graph_shape_with_modelsamplingauraflow_equals_the_pipeline(registry, env):
    """ComfyUI's AuraFlow example graph: CheckpointLoaderSimple, ModelSamplingAuraFlow (shift 1.73), KSampler: the
    pipeline's picture; shift 3 gives another."""
    nodes = checkpoint_loader("tiny-auraflow.safetensors") | {
        "10": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 1.73}},
        "_model": ["10", 0]}
    graph = txt2img_graph(nodes, prompt=PROMPT, negative=NEGATIVE, size=SIZE, seed=5, steps=STEPS, cfg=CFG,
                          scheduler="simple", latent="EmptyLatentImage")
    ours = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.abs(ours - pipeline_picture()).max() <= PIXEL_TOL
    graph["10"]["inputs"]["shift"] = 3.0
    assert np.abs(run(registry, env, parse(graph)).results["6"][0].numpy() - ours).max() > 0.02
