"""Krea 2 on a tiny random model, from ComfyUI's split files through the real loaders, against Krea2Pipeline.

The tiny Krea 2 (tests/tiny_krea2.py) is written as ComfyUI's files: the transformer in Krea's key
layout (bare and under ``model.diffusion_model.``) and in diffusers', Qwen3-VL as ComfyUI's
qwen3vl_4b file (language model under ``model.``, vision tower under ``visual.``), the Qwen-Image VAE
in the Wan layout. Graphs (UNETLoader, CLIPLoader type krea2, VAELoader, KSampler) equal
Krea2Pipeline's images within 1/255 per pixel: Turbo at cfg 1 with a ConditioningZeroOut negative,
Raw with a negative at cfg > 1 and ModelSamplingFlux's size shift. Each parity test also checks that
what it varies changes the picture.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

import tiny_krea2
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import split_loaders
from nodes.checkpoint import krea2_keys
from nodes.families import krea2

PROMPT = "a fox in the snow"
NEGATIVE = "blurry, dark"
SIZE = 64
UNET, CLIP, VAE = "tiny-krea2.safetensors", "tiny-qwen3vl_4b.safetensors", "tiny-qwen_image_vae.safetensors"

root = models_root(tiny_krea2.make_models_folder, "krea2-models")


@functools.lru_cache(maxsize=None)
def _reference(prompt: str, seed: int, steps: int, guidance: float, distilled: bool, negative: str | None = None,
               size: int = SIZE) -> np.ndarray:
    """Krea2Pipeline's image (deterministic: cached, read only; the folder test's two cases each ask for both the
    Turbo and the Raw picture at the same settings)."""
    with torch.no_grad():
        return tiny_krea2.pipeline(distilled)(
            prompt=prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=steps,
            guidance_scale=guidance, output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images


def _graph(prompt: str, negative: str | None, seed: int, steps: int, cfg: float, *, unet: str = UNET,
           clip: str = CLIP, size: int = SIZE, shift_by_size: bool = False, scheduler: str = "simple", custom: bool = False) -> dict:
    """ComfyUI's Krea 2 graphs: a ConditioningZeroOut negative when ``negative`` is None (Turbo),
    ModelSamplingFlux(1.15, 0.5) at the image size when ``shift_by_size``, and with ``custom`` the Raw
    template's sampling (CFGGuider, BasicScheduler, KSamplerSelect, RandomNoise, SamplerCustomAdvanced)
    instead of KSampler."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "krea2"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["8", 0]}},
        "3": ({"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}} if negative is None else
              {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["8", 0]}}),
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": scheduler,
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["9", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "krea2"}},
    }
    model = ["1", 0]
    if shift_by_size:
        graph["10"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15,
                                                                     "base_shift": 0.5, "width": size, "height": size}}
        graph["5"]["inputs"]["model"] = model = ["10", 0]
    if custom:
        graph["5"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["11", 0], "guider": ["12", 0], "sampler": ["13", 0], "sigmas": ["14", 0],
            "latent_image": ["4", 0]}}
        graph["11"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        graph["12"] = {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["2", 0],
                                                             "negative": ["3", 0], "cfg": cfg}}
        graph["13"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        graph["14"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler,
                                                                  "steps": steps, "denoise": 1.0}}
    return graph


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


# -- loading ------------------------------------------------------------------------------------------


def test_key_table_is_diffusers_converters_and_round_trips():
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    original = tiny_krea2.original_state()
    assert krea2_keys.ORIGINAL_MARKER in original and original["blocks.0.mod.lin"].ndim == 1
    theirs = convert_krea2_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v
                                                                 for k, v in original.items()})
    ours = krea2_keys.original_to_diffusers(original)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = krea2_keys.diffusers_to_original(ours)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("name", [UNET, "tiny-krea2-prefixed.safetensors", "tiny-krea2-diffusers-keys.safetensors"])
def test_unet_loader_detects_krea2_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is krea2.FAMILY and model.scheduler_config["base_shift"] == 1.15
    want = tiny_krea2.components()["transformer"].state_dict()
    with model._use_unet() as net:
        got = net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_clip_loader_krea2_builds_the_qwen3_vl_text_model(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    assert clip.family is krea2.FAMILY
    tiny_krea2.check_text_model(clip)


def test_a_bf16_load_keeps_the_norm_scales_in_float32_as_diffusers_does():
    from nodes.checkpoint.krea2_load import build_transformer

    net = build_transformer(tiny_krea2.original_state(), "tiny", torch.bfloat16)
    norms = {n: p.dtype for n, p in net.named_parameters() if n.rsplit(".", 2)[-2] in net._keep_in_fp32_modules}
    assert len(norms) > 10 and set(norms.values()) == {torch.float32}
    assert net.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 12 * tiny_krea2.TEXT, generator=g)
    all_bf16 = copy.deepcopy(tiny_krea2.components()["transformer"]).to(torch.bfloat16)  # norms rounded too
    diffusers_bf16 = copy.deepcopy(all_bf16)
    for name, module in diffusers_bf16.named_modules():  # what from_pretrained(torch_dtype=bf16) keeps
        if name.rsplit(".", 1)[-1] in net._keep_in_fp32_modules:
            module.weight.data = tiny_krea2.components()["transformer"].get_submodule(name).weight.data.clone()
    with torch.no_grad():
        (ours,), (theirs,), (rounded,) = (krea2.FAMILY.wrap_network(m)(x, torch.tensor(600.0), text)
                                          for m in (net, diffusers_bf16, all_bf16))
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    assert (ours.float() - rounded.float()).abs().max() > 0.01  # the fp32 scales matter


def test_a_bf16_folder_and_file_hold_the_files_norm_scales_exactly(root):
    from nodes.checkpoint.krea2_load import load_folder
    from nodes.checkpoint.split import load_unet_file

    want = tiny_krea2.components()["transformer"].state_dict()
    for loaded in (load_folder(root / "checkpoints" / "tiny-krea2-turbo-diffusers", torch.bfloat16),
                   load_unet_file(root / "diffusion_models" / "tiny-krea2-prefixed.safetensors", torch.bfloat16)):
        got = loaded.modules["unet"].state_dict()
        norms = [k for k in want if k.rsplit(".", 2)[-2] in ("norm", "norm1", "norm2", "norm_q", "norm_k")]
        assert len(norms) > 10 and all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in norms)


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "", "a long prompt " * 40])
def test_conditioning_equals_krea2_pipelines_encode_prompt(env, prompt):
    """Kiln's tokens without padding give the pipeline's states at every real token (padding has no
    position and no attention there); the layers flatten layer-major, as ComfyUI's do."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    [[ours, extra]] = clip.encode(prompt)
    with torch.no_grad():
        theirs, mask = tiny_krea2.pipeline().encode_prompt(prompt, device=torch.device("cpu"))
    real = theirs[0][mask[0]]  # [tokens, 12, width]
    assert ours.shape == (1, real.shape[0], 12 * tiny_krea2.TEXT) and bool(extra[krea2.MASK].all())
    assert torch.allclose(ours[0].reshape(real.shape), real.float(), atol=1e-5, rtol=1e-5)


def test_a_too_long_prompt_is_cut_where_the_pipeline_cuts_it(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    [[ours, _]] = clip.encode("word " * 700)
    assert ours.shape[1] == krea2.MAX_TOKENS


# -- sampling ---------------------------------------------------------------------------------------------


def test_turbo_cfg1_with_zeroed_negative_equals_krea2_pipeline(registry, env):
    """ComfyUI's Turbo template: KSampler euler/simple, cfg 1, ConditioningZeroOut negative; the
    pipeline's Turbo (is_distilled: mu 1.15) with guidance 0."""
    ours = _run(registry, env, _graph(PROMPT, None, 3, 8, 1.0))
    gap = np.abs(ours - _reference(PROMPT, 3, 8, 0.0, distilled=True)).max()
    print(f"turbo gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, None, 4, 8, 1.0))).max() > 0.02  # the seed matters
    assert np.abs(ours - _run(registry, env, _graph("a red car", None, 3, 8, 1.0))).max() > 0.02  # so does the prompt


@pytest.mark.parametrize("custom", [True, False], ids=["SamplerCustomAdvanced", "KSampler"])
def test_raw_cfg_with_negative_and_size_shift_equals_krea2_pipeline(registry, env, custom):
    """Real CFG with a negative: Kiln's cfg is 1 + the pipeline's guidance_scale. The Raw pipeline
    shifts by size with max_image_seq_len 6400; ComfyUI's ModelSamplingFlux by 4096, so the
    reference's scheduler takes ComfyUI's line here."""
    ours = _run(registry, env, _graph(PROMPT, NEGATIVE, 5, 6, 4.0, shift_by_size=True, custom=custom))
    pipe = tiny_krea2.pipeline(distilled=False)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, max_image_seq_len=4096)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=6,
                      guidance_scale=3.0, output_type="np", generator=torch.Generator("cpu").manual_seed(5)).images
    gap = np.abs(ours - theirs).max()
    print(f"raw gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    other = _run(registry, env, _graph(PROMPT, "", 5, 6, 4.0, shift_by_size=True, custom=custom))
    assert np.abs(ours - other).max() > 0.005  # the negative matters (real CFG)
    fixed = _run(registry, env, _graph(PROMPT, NEGATIVE, 5, 6, 4.0, custom=custom))
    assert np.abs(ours - fixed).max() > 1 / 255  # and ModelSamplingFlux's shift is not Turbo's fixed one


@pytest.mark.parametrize("distilled", [True, False], ids=["turbo", "raw"])
def test_a_diffusers_folder_through_checkpoint_loader_equals_krea2_pipeline(registry, env, distilled):
    """Krea2Pipeline.save_pretrained's folder: its is_distilled picks the shift (Turbo's fixed mu, else the
    folder scheduler's size rule), as the pipeline does."""
    name = "tiny-krea2-turbo-diffusers" if distilled else "tiny-krea2-raw-diffusers"
    graph = _graph(PROMPT, NEGATIVE, 6, 5, 3.0)
    for k in ("1", "8", "9"):
        del graph[k]
    graph["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
    graph["2"]["inputs"]["clip"] = graph["3"]["inputs"]["clip"] = ["1", 1]
    graph["6"]["inputs"]["vae"] = ["1", 2]
    ours = _run(registry, env, graph)
    gap = np.abs(ours - _reference(PROMPT, 6, 5, 2.0, distilled, NEGATIVE)).max()
    print(f"{name} gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _reference(PROMPT, 6, 5, 2.0, not distilled, NEGATIVE)).max() > 1 / 255  # the shift rule


# -- bad input -------------------------------------------------------------------------------------------


def test_wrong_files_name_the_family_and_the_loader(env, root):
    from nodes.checkpoint.load import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="Krea 2 transformer.*UNETLoader.*krea2"):
        load_checkpoint(root / "diffusion_models" / UNET, torch.float32)
    with pytest.raises(Exception, match=r"needs Qwen2.5-VL, got tiny-qwen3vl_4b.safetensors \(Qwen3-VL\)"):
        call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    with pytest.raises(Exception, match=r"needs Qwen3, got tiny-qwen3vl_4b.safetensors \(Qwen3-VL\)"):
        call(split_loaders.clip_loader, env, clip_name=CLIP, type="flux2")
    import shutil

    shutil.copy(root / "diffusion_models" / "tiny-krea2-prefixed.safetensors", root / "text_encoders" / "dit.safetensors")
    with pytest.raises(Exception, match="dit.safetensors holds a diffusion model.*CLIPLoader needs a text encoder"):
        call(split_loaders.clip_loader, env, clip_name="dit.safetensors", type="krea2")


def test_a_qwen3_vl_file_without_its_vision_tower_loads_under_type_krea2(env, root):
    """Its keys are a Qwen3's; type krea2 reads it as the Qwen3-VL language model (ComfyUI does too)."""
    from safetensors.torch import save_file

    text_only = {k: v for k, v in tiny_krea2.comfy_text_state().items() if not k.startswith("visual.")}
    save_file(text_only, str(root / "text_encoders" / "tiny-qwen3vl_4b-text.safetensors"))
    (clip,) = call(split_loaders.clip_loader, env, clip_name="tiny-qwen3vl_4b-text.safetensors", type="krea2")
    (full,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="krea2")
    assert torch.equal(clip.encode(PROMPT)[0][0], full.encode(PROMPT)[0][0])


def test_a_truncated_transformer_file_names_the_missing_key(tmp_path):
    from nodes.checkpoint.krea2_load import build_transformer
    from nodes.checkpoint.load import CheckpointError

    state = tiny_krea2.original_state()
    del state["blocks.0.attn.wk.weight"]
    with pytest.raises(CheckpointError, match="blocks.0.attn.wk.weight"):
        build_transformer(state, "broken.safetensors", torch.float32)


def test_conditioning_of_another_width_names_the_input():
    from nodes.families.base import ConditioningError

    net = krea2.FAMILY.wrap_network(tiny_krea2.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 16, 8, 8), torch.tensor(500.0), torch.zeros(1, 7, 4096))
    assert err.value.input_name == "positive" and "krea2" in str(err.value)


def test_the_tokenizer_has_the_special_tokens_the_template_and_comfyui_use():
    """Qwen3-VL's ids as ComfyUI's Krea 2 / Qwen3-VL code names them (151644 <|im_start|>, 872 198 the
    user turn, 151655 <|image_pad|>), and the prefix is the 34 tokens the pipeline drops."""
    tok = tiny_krea2.components()["tokenizer"]
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                                                      "<|vision_end|>", "<|endoftext|>")}
    assert ids == {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652, "<|image_pad|>": 151655,
                   "<|vision_end|>": 151653, "<|endoftext|>": 151643}
    prefix = tok(krea2.PREFIX).input_ids
    assert len(prefix) == krea2.TEMPLATE_TOKENS and tuple(prefix[-3:]) == krea2.USER_TURN
    assert len(tok(krea2.SUFFIX).input_ids) == 5  # the pipeline's prompt_template_encode_num_suffix_tokens


def test_a_prompt_with_its_own_template_needs_a_user_turn():
    from nodes.families.base import ConditioningError

    assert krea2.template_end([1, 151644, 872, 198, 5]) == 4
    with pytest.raises(ConditioningError, match="user turn"):
        krea2.template_end([151644, 77091, 198])
