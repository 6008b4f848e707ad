"""ERNIE-Image on a tiny random model, from ComfyUI's split files through the real loaders, against
ErnieImagePipeline (use_pe False).

The tiny ERNIE-Image (tests/tiny_ernie.py) is written as ComfyUI's files: the transformer (bare names and
under ``model.diffusion_model.``), Ministral 3 as Comfy-Org's ministral-3-3b file (language model under
``model.``, Tekken as ``tekken_model``), the FLUX.2 VAE in its original layout. Conditioning equals the
pipeline's encode_prompt; graphs (UNETLoader, CLIPLoader type flux2, VAELoader, EmptyFlux2LatentImage,
KSampler euler/simple) equal the pipeline's images within 1/255 per pixel, and each parity test checks
that what it varies changes the picture.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_ernie
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run, same_state, save_state, txt2img_graph  # noqa: F401
from node_call import call
from nodes import split_loaders
from nodes.families import ernie_image

PROMPT = "the fox in the snow"
NEGATIVE = "there then"
SIZE = 64
UNET, CLIP, VAE = "tiny-ernie.safetensors", "tiny-ministral-3-3b.safetensors", "tiny-flux2-vae.safetensors"

root = models_root(tiny_ernie.make_models_folder, "ernie-models")


def _reference(prompt: str, seed: int, steps: int, guidance: float, negative: str = "") -> np.ndarray:
    with torch.no_grad():
        return tiny_ernie.pipeline()(
            prompt=prompt, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps,
            guidance_scale=guidance, output_type="np", use_pe=False,
            generator=torch.Generator("cpu").manual_seed(seed)).images


def _graph(prompt: str, negative: str, seed: int, steps: int, cfg: float, unet: str = UNET) -> dict:
    """ComfyUI's ERNIE-Image graph: UNETLoader, CLIPLoader type flux2, VAELoader, EmptyFlux2LatentImage,
    KSampler euler/simple (VAEDecode "6")."""
    loader = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
              "8": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "flux2"}},
              "9": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
              "_model": ["1", 0], "_clip": ["8", 0], "_vae": ["9", 0]}
    return txt2img_graph(loader, prompt=prompt, negative=negative, size=SIZE, seed=seed, steps=steps, cfg=cfg,
                         scheduler="simple", latent="EmptyFlux2LatentImage", prefix="ernie")


def _run(registry, env, graph: dict) -> np.ndarray:
    return run(registry, env, parse(graph)).results["6"][0].numpy()


# -- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNET, "tiny-ernie-prefixed.safetensors"])
def test_unet_loader_detects_ernie_image_and_loads_the_weights_bit_for_bit(env, name):
    (model,) = call(split_loaders.unet_loader, env, unet_name=name)
    assert model.family is ernie_image.FAMILY and model.scheduler_config["shift"] == 3.0
    assert model.scheduler_config["use_dynamic_shifting"] is False
    want = tiny_ernie.components()["transformer"].state_dict()
    with model._use_unet() as net:
        assert dict(net.config)["rope_axes_dim"] == tiny_ernie.components()["transformer"].config.rope_axes_dim
        assert same_state(net.state_dict(), want)


def test_clip_loader_flux2_reads_ministral3_and_its_tekken_tokenizer(env):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="flux2")
    assert clip.family is ernie_image.FAMILY
    want = tiny_ernie.components()["text_encoder"].language_model.state_dict()
    with clip.encoder("text_encoder") as model:
        assert type(model).__name__ == "Ministral3Model"
        assert model.config.rope_parameters["rope_type"] == "yarn"  # the release's, as the pipeline's encoder
        assert same_state(model.state_dict(), want)
    tok = clip.tokenizers["tokenizer"]
    assert tok(PROMPT, add_special_tokens=False).input_ids == tiny_ernie.tokenizer()(PROMPT).input_ids[1:]


def test_a_bf16_text_encoder_keeps_its_dtype_and_fp8_scaled_weights_load(tmp_path):
    from nodes.checkpoint.ministral_text import build_ministral3

    state = tiny_ernie.comfy_text_state()
    model = build_ministral3(state, "tiny", torch.bfloat16)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    fp8 = dict(state)
    name = "model.layers.0.self_attn.q_proj.weight"
    scale = fp8[name].abs().max() / 448
    fp8[name] = (fp8[name] / scale).to(torch.float8_e4m3fn)
    fp8[name.replace(".weight", ".scale_weight")] = scale.reshape(1)
    held = build_ministral3(fp8, "tiny-fp8", torch.float32)
    x = torch.randn(1, 3, tiny_ernie.TEXT)
    with torch.no_grad():
        got = held.layers[0].self_attn.q_proj(x)
        want = torch.nn.functional.linear(x, state[name])
    assert torch.allclose(got, want, atol=0.05, rtol=0.1)  # fp8's rounding, nothing more
    assert not torch.equal(got, want)


# -- conditioning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "", "Hello wörld, café 2024! " * 8])
def test_conditioning_equals_ernie_pipelines_encode_prompt(env, prompt):
    """<s> and the prompt's tokens, no template or padding, Ministral 3's second-to-last hidden state."""
    (clip,) = call(split_loaders.clip_loader, env, clip_name=CLIP, type="flux2")
    [[ours, extra]] = clip.encode(prompt)
    with torch.no_grad():
        [theirs] = tiny_ernie.pipeline().encode_prompt(prompt, device=torch.device("cpu"))
    assert ours.shape == (1, theirs.shape[0], tiny_ernie.TEXT) and extra == {}
    assert torch.allclose(ours[0], theirs.float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # not the last layer's state: the pipeline's choice is read
        last = tiny_ernie.components()["text_encoder"](
            input_ids=tiny_ernie.tokenizer()(prompt, return_tensors="pt").input_ids).last_hidden_state
    assert (ours[0] - last[0]).abs().max() > 0.01


# -- sampling ---------------------------------------------------------------------------------------------


def test_cfg_with_negative_equals_ernie_pipeline(registry, env):
    """ComfyUI's template: KSampler euler/simple, cfg 4, a negative of another length (the pipeline pads
    and masks it; Kiln evaluates it apart)."""
    ours = _run(registry, env, _graph(PROMPT, NEGATIVE, 3, 4, 4.0))
    gap = np.abs(ours - _reference(PROMPT, 3, 4, 4.0, NEGATIVE)).max()
    print(f"cfg gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, NEGATIVE, 4, 4, 4.0))).max() > 0.02  # the seed matters
    assert np.abs(ours - _run(registry, env, _graph(PROMPT, "", 3, 4, 4.0))).max() > 0.005  # so does the negative


def test_turbo_cfg1_equals_ernie_pipeline_and_reads_the_prompt(registry, env):
    ours = _run(registry, env, _graph(PROMPT, "", 6, 4, 1.0, unet="tiny-ernie-prefixed.safetensors"))
    gap = np.abs(ours - _reference(PROMPT, 6, 4, 1.0)).max()
    print(f"turbo gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _run(registry, env, _graph("a red car", "", 6, 4, 1.0))).max() > 0.005


def test_a_diffusers_folder_through_checkpoint_loader_equals_ernie_pipeline(registry, env):
    """ErnieImagePipeline.save_pretrained's folder: its transformer, VAE, Mistral3Model's language model and
    saved tokenizer."""
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-ernie-diffusers"}},
              "_model": ["1", 0], "_clip": ["1", 1], "_vae": ["1", 2]}
    graph = txt2img_graph(loader, prompt=PROMPT, negative=NEGATIVE, size=SIZE, seed=8, steps=4, cfg=4.0,
                          scheduler="simple", latent="EmptyFlux2LatentImage", prefix="ernie")
    ours = _run(registry, env, graph)
    gap = np.abs(ours - _reference(PROMPT, 8, 4, 4.0, NEGATIVE)).max()
    print(f"folder gap {gap * 255:.5f}/255")
    assert gap <= 1 / 255, gap
    assert np.abs(ours - _reference(PROMPT, 9, 4, 4.0, NEGATIVE)).max() > 0.02  # the seed matters


@pytest.mark.parametrize("fmt", ["comfy", "peft", "kohya"])
def test_loras_in_the_modules_own_names_equal_the_weights_merged_by_hand(env, root, fmt):
    """ComfyUI's and diffusers' names are one (nodes.checkpoint.ernie_image_keys), so a LoRA addresses the
    module's own names under ``diffusion_model.``, ``transformer.`` or kohya's ``lora_unet_``."""
    import copy

    from flow_family_lora import assert_weights_merged_by_hand, lora_file, module_shapes, random_factors

    net = tiny_ernie.components()["transformer"]
    names = ("layers.0.self_attention.to_q", "layers.1.mlp.linear_fc2", "text_proj", "final_linear")
    factors = random_factors(module_shapes(net, names), seed=4)
    save_state(root / "loras" / f"ernie-{fmt}.safetensors", lora_file(factors, fmt))

    def merged(strength: float) -> torch.nn.Module:
        out = copy.deepcopy(net)
        modules = dict(out.named_modules())
        with torch.no_grad():
            for name, (down, up) in factors.items():
                modules[name].weight += strength * up @ down
        return out

    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 5, tiny_ernie.TEXT, generator=g)

    def forward(module: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return ernie_image.FAMILY.wrap_network(module)(x, torch.tensor(600.0), text)[0]

    _, _, moved = assert_weights_merged_by_hand(env, UNET, f"ernie-{fmt}.safetensors", merged, forward)
    assert moved == {name + ".weight" for name in names}


# -- bad input -------------------------------------------------------------------------------------------


def test_a_ministral_file_without_tekken_names_what_is_missing(env, root):
    """Width 3072 is Ministral 3 3B's (ComfyUI's rule), so the file is read as one; its tokenizer is missing."""
    import torch.nn.functional as F  # noqa: N812

    state = {k: v for k, v in tiny_ernie.comfy_text_state(with_tekken=False).items()}
    state["model.embed_tokens.weight"] = F.pad(state["model.embed_tokens.weight"], (0, 3072 - tiny_ernie.TEXT))
    save_state(root / "text_encoders" / "no-tekken.safetensors", state)
    with pytest.raises(Exception, match="no-tekken.safetensors carries no tekken_model.*ministral-3-3b") as err:
        call(split_loaders.clip_loader, env, clip_name="no-tekken.safetensors", type="flux2")
    assert getattr(err.value, "input_name", None) == "clip_name"


def test_type_flux2_tells_the_text_encoders_apart_by_their_keys():
    """One rule (ministral_text.mistral_kind): a Llama-style decoder with Tekken, or a release's size without
    it, is a Mistral: 3072 wide Ministral 3, 5120 wide Mistral Small 3 (ComfyUI's rule), at other widths
    Mistral Small 3 when it has the 30 layers FLUX.2 [dev] reads; Llama 3.1 and Qwen3 are not one."""
    from nodes.checkpoint.ministral_text import mistral_kind

    def decoder(width: int, tekken: bool, qwen3: bool = False, layers: int = 1, vocab: int = 100) -> dict:
        shapes = {"model.embed_tokens.weight": (vocab, width)}
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (width, width) for i in range(layers)}
        return shapes | ({"tekken_model": (10,)} if tekken else {}) | \
            ({"model.layers.0.self_attn.q_norm.weight": (128,)} if qwen3 else {})

    assert mistral_kind(decoder(32, True)) == mistral_kind(decoder(3072, False)) == "ministral3"
    assert mistral_kind(decoder(32, True, layers=26)) == "ministral3"
    assert mistral_kind(decoder(5120, True)) == mistral_kind(decoder(5120, False, vocab=131072)) == "mistral3"
    assert mistral_kind(decoder(32, True, layers=30)) == mistral_kind(decoder(32, True, layers=40)) == "mistral3"
    assert mistral_kind(decoder(32, False, layers=40)) is None  # no tokenizer, no release's size
    assert mistral_kind(decoder(4096, False)) is None  # Llama 3.1 (HiDream)
    assert mistral_kind(decoder(2560, True, qwen3=True)) is None  # Qwen3 (FLUX.2 klein)


def test_wrong_files_name_the_family_and_the_loader(env, root):
    from nodes.checkpoint.load import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="ERNIE-Image transformer.*UNETLoader.*ministral-3-3b.*flux2"):
        load_checkpoint(root / "diffusion_models" / UNET, torch.float32)
    with pytest.raises(Exception, match=r"needs Qwen2.5-VL, got tiny-ministral-3-3b.safetensors \(Ministral 3\)"):
        call(split_loaders.clip_loader, env, clip_name=CLIP, type="qwen_image")
    import shutil

    shutil.copy(root / "text_encoders" / CLIP, root / "diffusion_models" / "te.safetensors")
    with pytest.raises(Exception, match="te.safetensors holds a text encoder.*CLIPLoader"):
        call(split_loaders.unet_loader, env, unet_name="te.safetensors")


def test_a_truncated_transformer_file_names_the_missing_key():
    from nodes.checkpoint.ernie_image_load import build_transformer
    from nodes.checkpoint.load import CheckpointError

    state = dict(tiny_ernie.components()["transformer"].state_dict())
    del state["layers.1.self_attention.to_k.weight"]
    with pytest.raises(CheckpointError, match="layers.1.self_attention.to_k.weight"):
        build_transformer(state, "broken.safetensors", torch.float32)


def test_conditioning_of_another_width_names_the_input():
    from nodes.families.base import ConditioningError

    net = ernie_image.FAMILY.wrap_network(tiny_ernie.components()["transformer"])
    with pytest.raises(ConditioningError) as err:
        net(torch.zeros(1, 128, 4, 4), torch.tensor(500.0), torch.zeros(1, 7, 2560))
    assert err.value.input_name == "positive" and "flux2" in str(err.value)


def test_skip_layer_guidance_is_refused_naming_the_model():
    from nodes.families.base import ConditioningError

    with pytest.raises(ConditioningError, match="ERNIE-Image") as err:
        ernie_image.FAMILY.dit_blocks(tiny_ernie.components()["transformer"])
    assert err.value.input_name == "model"
