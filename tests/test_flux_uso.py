"""USO's style reference (USOStyleReference + ModelPatchLoader) on the tiny FLUX, against diffusers'
FluxPipeline given the same style tokens by hand.

A tiny SigLIP with 20 layers (USO reads its layers -20, -11 and -2) and a tiny USO projector with random
weights are saved as ComfyUI keeps them (models/clip_vision, models/model_patches with
``feature_embedder.`` keys) and loaded through the real nodes. The reference is written out here, not
taken from Kiln: the projector's formula on transformers' hidden states, and the tokens placed in front
of the embedded prompt at text position 0 by giving FluxPipeline a context embedder that returns them
before the prompt's own (the prompt embeddings get as many leading placeholder rows, so the pipeline's
text ids are as long as the text it embeds).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux
from engine.context import NodeError
from flow_family_files import env, registry, run  # noqa: F401 (fixtures)
from node_call import call
from nodes import model_patch_nodes, style_model, uso
from test_flux_redux import _comfy_layout, _picture

PROMPT = "a lighthouse on a cliff"
PICTURE, PATCH = 32, 4  # 64 image tokens
LAYERS = 20
STYLE_TOKENS = 4
SIZE = 64
VISION, USO, SHALLOW = "tiny-sigclip-20.safetensors", "tiny-uso.safetensors", "tiny-sigclip-2.safetensors"
#: the latents agree this closely (both float32, the same operations); what the style changes is far more
LATENT_TOL, EFFECT = 1e-4, 0.01


def _siglip(layers: int = LAYERS):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                                     num_attention_heads=16, image_size=PICTURE, patch_size=PATCH,
                                                     hidden_act="gelu_pytorch_tanh"))
    return model.eval()


def _projector_state() -> dict[str, torch.Tensor]:
    """USO's projector keys at tiny sizes (64 tokens of 64 -> 4 style tokens per level, the tiny FLUX's
    width 64), random and large enough to matter in the tiny model."""
    tokens, features, width = (PICTURE // PATCH) ** 2, 64, tiny_flux.HEADS * tiny_flux.HEAD_DIM
    g = torch.Generator().manual_seed(6)
    state = {}
    for level in ("high", "mid", "low"):
        state[f"{level}_embedding_linear.0.weight"] = torch.randn(STYLE_TOKENS, tokens, generator=g) * 0.3
        state[f"{level}_embedding_linear.0.bias"] = torch.randn(STYLE_TOKENS, generator=g) * 0.1
        state[f"{level}_layer_norm.weight"] = 1 + torch.randn(features, generator=g) * 0.1
        state[f"{level}_layer_norm.bias"] = torch.randn(features, generator=g) * 0.1
        state[f"{level}_projection.weight"] = torch.randn(width, features, generator=g) * 0.5
        state[f"{level}_projection.bias"] = torch.randn(width, generator=g) * 0.1
    return state


@pytest.fixture(scope="module")
def parts():
    return {"vision": _siglip(), "projector": _projector_state()}


@pytest.fixture(scope="module")
def root(tmp_path_factory, parts, tiny_models_dir) -> Path:
    import shutil

    from safetensors.torch import save_file

    import tiny_models

    root = tmp_path_factory.mktemp("uso-models")
    tiny_flux._save(root / "diffusion_models" / "tiny-flux-dev.safetensors", tiny_flux.bfl_transformer("dev"))
    tiny_flux._save(root / "text_encoders" / "tiny-clip_l.safetensors", tiny_flux.clip_l_state())
    tiny_flux._save(root / "text_encoders" / "tiny-t5xxl.safetensors", tiny_flux.t5_state())
    tiny_flux._save(root / "vae" / "tiny-flux-ae.safetensors", tiny_flux.vae_state())
    for folder in ("clip_vision", "model_patches", "checkpoints"):
        (root / folder).mkdir(exist_ok=True)
    for name, model in ((VISION, parts["vision"]), (SHALLOW, _siglip(2))):
        save_file({k: v.contiguous() for k, v in _comfy_layout(model).items()}, str(root / "clip_vision" / name))
    save_file({uso.PREFIX + k: v for k, v in parts["projector"].items()}, str(root / "model_patches" / USO))
    sd1 = tiny_models.checkpoint_name("sd1")
    shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / sd1, root / "checkpoints" / sd1)  # links are refused
    return root


def _graph(pictures: tuple[str, ...], cfg: float = 1.0) -> dict:
    """ComfyUI's USO template at the tests' size (API format): one USOStyleReference per picture, chained."""
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-flux-dev.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "tiny-clip_l.safetensors",
                                                         "clip_name2": "tiny-t5xxl.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-flux-ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}},
        "8": {"class_type": "ModelPatchLoader", "inputs": {"name": USO}},
        "10": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["3", 0]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
    }
    model = ["1", 0]
    for i, picture in enumerate(pictures):
        graph[f"20{i}"] = {"class_type": "LoadImage", "inputs": {"image": picture}}
        graph[f"21{i}"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["6", 0], "image": [f"20{i}", 0],
                                                                       "crop": "center"}}
        graph[f"22{i}"] = {"class_type": "USOStyleReference", "inputs": {"model": model, "model_patch": ["8", 0],
                                                                        "clip_vision_output": [f"21{i}", 0]}}
        model = [f"22{i}", 0]
    graph["15"] = {"class_type": "ConditioningAverage", "inputs": {"conditioning_to": ["10", 0],
                                                                   "conditioning_from": ["16", 0],
                                                                   "conditioning_to_strength": 0.5}}
    graph["16"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["10", 0]}}
    graph["12"] = {"class_type": "KSampler", "inputs": {"model": model, "seed": 3, "steps": 4, "cfg": cfg,
                                                        "sampler_name": "euler", "scheduler": "simple",
                                                        "positive": ["10", 0], "negative": ["15", 0],
                                                        "latent_image": ["11", 0], "denoise": 1.0}}
    return graph


def _run(registry, env, pictures: tuple[str, ...], cfg: float = 1.0):
    from engine.workflow import parse

    return run(registry, env, parse(json.loads(json.dumps(_graph(pictures, cfg)))))


def _style_tokens(parts, picture) -> torch.Tensor:
    """The projector's formula on the encoder's hidden states: per level, mix the tokens (SiLU), LayerNorm,
    project; high (-2), mid (-11), low (-20) in that order."""
    import torch.nn.functional as F

    pixels = (torch.from_numpy(np.array(picture)).float().div(255).movedim(-1, 0)[None] - 0.5) / 0.5
    with torch.no_grad():
        hidden = parts["vision"](pixel_values=pixels, output_hidden_states=True).hidden_states
    w = parts["projector"]
    out = []
    for level, layer in (("high", -2), ("mid", -11), ("low", -20)):
        x = F.silu(F.linear(hidden[layer].transpose(1, 2), w[f"{level}_embedding_linear.0.weight"],
                            w[f"{level}_embedding_linear.0.bias"])).transpose(1, 2)
        x = F.layer_norm(x, (x.shape[-1],), w[f"{level}_layer_norm.weight"], w[f"{level}_layer_norm.bias"])
        out.append(F.linear(x, w[f"{level}_projection.weight"], w[f"{level}_projection.bias"]))
    return torch.cat(out, dim=1)


class _Prefixed(torch.nn.Module):
    """A context embedder whose first ``len(style)`` outputs are the style tokens, the rest the prompt's."""

    def __init__(self, embedder: torch.nn.Module, style: torch.Tensor) -> None:
        super().__init__()
        self.embedder, self.style = embedder, style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.style.shape[1]
        return torch.cat([self.style.to(x.dtype), self.embedder(x[:, n:])], dim=1)


def _reference(style: torch.Tensor, cfg: float = 1.0) -> tuple[np.ndarray, torch.Tensor]:
    """(the pipeline's image, its final latent in the VAE's own space, as Kiln's LATENT holds it); with
    ``cfg`` above 1, true classifier-free guidance against the same prompt at half strength, the style
    tokens on both sides (ComfyUI's patch acts on every call of the model)."""
    import copy

    from diffusers import FluxPipeline

    flux_parts = dict(tiny_flux.components("dev"))
    flux_parts["transformer"] = copy.deepcopy(flux_parts["transformer"])
    flux_parts["transformer"].context_embedder = _Prefixed(flux_parts["transformer"].context_embedder, style)
    pipe = FluxPipeline(**flux_parts)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, device="cpu", max_sequence_length=512)
        embeds = torch.cat([embeds.new_zeros(1, style.shape[1], embeds.shape[2]), embeds], dim=1)
        extra = {} if cfg == 1.0 else dict(negative_prompt_embeds=embeds * 0.5, true_cfg_scale=cfg,
                                           negative_pooled_prompt_embeds=pooled * 0.5)
        packed = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE, **extra,
                      num_inference_steps=4, guidance_scale=3.5, output_type="latent",
                      generator=torch.Generator().manual_seed(3)).images
        config = pipe.vae.config
        latent = pipe._unpack_latents(packed, SIZE, SIZE, pipe.vae_scale_factor) / config.scaling_factor \
            + config.shift_factor
        image = pipe.image_processor.postprocess(pipe.vae.decode(latent, return_dict=False)[0], output_type="np")
    return image, latent


def test_uso_equals_flux_pipeline_with_the_style_tokens_before_the_prompt(registry, env, parts):
    _picture(0).save(env.paths.input.root / "style.png")
    outcome = _run(registry, env, ("style.png",))
    image, latent = _reference(_style_tokens(parts, _picture(0)))
    assert np.abs(outcome.results["13"][0].numpy() - image).max() <= 1 / 255 + 1e-6
    assert (outcome.results["12"][0]["samples"] - latent).abs().max() <= LATENT_TOL
    # the style matters far beyond the agreement, and another picture gives another image (not vacuous)
    plain = _run(registry, env, ()).results["12"][0]["samples"]
    assert (outcome.results["12"][0]["samples"] - plain).abs().max() > EFFECT
    _picture(1).save(env.paths.input.root / "other.png")
    other = _run(registry, env, ("other.png",)).results["12"][0]["samples"]
    assert (outcome.results["12"][0]["samples"] - other).abs().max() > EFFECT


def test_two_references_each_add_their_tokens(registry, env, parts):
    """Both pictures' tokens are there (ComfyUI puts the later one's first; at text position 0 for all,
    FLUX's attention cannot tell their order, so only their presence shows in the image)."""
    _picture(0).save(env.paths.input.root / "style.png")
    _picture(1).save(env.paths.input.root / "other.png")
    outcome = _run(registry, env, ("style.png", "other.png"))
    tokens = torch.cat([_style_tokens(parts, _picture(1)), _style_tokens(parts, _picture(0))], dim=1)
    image, latent = _reference(tokens)
    assert np.abs(outcome.results["13"][0].numpy() - image).max() <= 1 / 255 + 1e-6
    assert (outcome.results["12"][0]["samples"] - latent).abs().max() <= LATENT_TOL
    one = _run(registry, env, ("other.png",)).results["12"][0]["samples"]
    assert (outcome.results["12"][0]["samples"] - one).abs().max() > EFFECT


def test_guidance_puts_the_style_on_both_sides(registry, env, parts):
    _picture(0).save(env.paths.input.root / "style.png")
    outcome = _run(registry, env, ("style.png",), cfg=2.0)
    image, latent = _reference(_style_tokens(parts, _picture(0)), cfg=2.0)
    assert np.abs(outcome.results["13"][0].numpy() - image).max() <= 1 / 255 + 1e-6
    assert (outcome.results["12"][0]["samples"] - latent).abs().max() <= LATENT_TOL
    assert (outcome.results["12"][0]["samples"] - _run(registry, env, ("style.png",)).results["12"][0]["samples"]) \
        .abs().max() > EFFECT


def test_the_loader_says_what_the_projector_is_and_other_patch_nodes_refuse_it(env):
    from node_call import Called

    rec = Called()
    (patch,) = call(model_patch_nodes.model_patch_loader, env, rec, name=USO)
    assert "USO style projector" in rec.messages[0] and f"{3 * STYLE_TOKENS} style tokens" in rec.messages[0]
    from nodes import loaders, split_loaders

    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    (vae,) = call(loaders.vae_loader, env, vae_name="tiny-flux-ae.safetensors")
    with pytest.raises(NodeError, match="USOStyleReference") as err:
        call(model_patch_nodes.qwen_image_diffsynth_controlnet, env, model=model, model_patch=patch, vae=vae,
             image=torch.rand(1, 32, 32, 3), strength=1.0)
    assert err.value.input_name == "model_patch"


def test_wrong_inputs_are_errors_naming_the_input(env):
    import tiny_models
    from nodes import loaders, split_loaders

    (patch,) = call(model_patch_nodes.model_patch_loader, env, name=USO)
    (flux_model,) = call(split_loaders.unet_loader, env, unet_name="tiny-flux-dev.safetensors")
    (vision,) = call(style_model.clip_vision_loader, env, clip_name=VISION)
    picture = torch.rand(1, PICTURE, PICTURE, 3)
    (encoded,) = call(style_model.clip_vision_encode, env, clip_vision=vision, image=picture, crop="center")
    assert set(encoded.layers) == {-20, -11}
    (shallow,) = call(style_model.clip_vision_loader, env, clip_name=SHALLOW)
    (two_layers,) = call(style_model.clip_vision_encode, env, clip_vision=shallow, image=picture, crop="center")
    sd1, _, _ = call(loaders.checkpoint_loader, env, ckpt_name=tiny_models.checkpoint_name("sd1"))

    def refused(**inputs) -> str:
        with pytest.raises(NodeError) as err:
            call(uso.uso_style_reference, env, **{"model": flux_model, "model_patch": patch,
                                                  "clip_vision_output": encoded, **inputs})
        return err.value.input_name

    assert refused(model=sd1) == "model"
    assert refused(model_patch="not a patch") == "model_patch"
    assert refused(clip_vision_output=two_layers) == "clip_vision_output"
    (applied,) = call(uso.uso_style_reference, env, model=flux_model, model_patch=patch, clip_vision_output=encoded)
    assert flux_model.patches.style_references == () and len(applied.patches.style_references) == 1


TEMPLATE = "flux1_dev_uso_reference_image_gen.json"
#: the template's files -> the tiny stand-ins written under their names
TEMPLATE_FILES = {("checkpoints", "flux1-dev-fp8.safetensors"), ("loras", "uso-flux1-dit-lora-v1.safetensors"),
                  ("clip_vision", "sigclip_vision_patch14_384.safetensors"),
                  ("model_patches", "uso-flux1-projector-v1.safetensors")}


def _xlabs_lora() -> dict[str, torch.Tensor]:
    """A random LoRA on the tiny FLUX in XLabs' layout, as USO's DiT LoRA is saved."""
    width, rank = tiny_flux.HEADS * tiny_flux.HEAD_DIM, 4
    g = torch.Generator().manual_seed(7)
    out = {}
    for module, rows in (("double_blocks.0.processor.qkv_lora1", 3), ("double_blocks.0.processor.qkv_lora2", 3),
                         ("double_blocks.0.processor.proj_lora1", 1), ("double_blocks.0.processor.proj_lora2", 1),
                         ("single_blocks.0.processor.qkv_lora", 3), ("single_blocks.0.processor.proj_lora", 1)):
        inputs = 5 * width if module.endswith("proj_lora") else width  # a single block's linear2 reads attn + MLP
        out[f"{module}.down.weight"] = torch.randn(rank, inputs, generator=g) * 0.3
        out[f"{module}.up.weight"] = torch.randn(rows * width, rank, generator=g) * 0.3
    return out


def test_comfyui_uso_template_runs_with_its_xlabs_lora(registry, env, root, parts):
    """The template as shipped (its active graph: subject reference through ReferenceLatent 'uxo/uno' and USO's
    DiT LoRA) on tiny files under its names, at the tests' size; the LoRA changes the image."""
    from safetensors.torch import save_file

    from engine.executor import Executor
    from engine.formats import parse_document
    from flow_family_files import template, template_file_errors

    document = template(TEMPLATE)
    _, missing = template_file_errors(registry, document, root / "empty")
    # only what the active graph needs: the style branch's CLIPVisionLoader and ModelPatchLoader feed no output in
    # the template as shipped, so (as in ComfyUI) their files are not asked for
    assert missing == {("CheckpointLoader", "ckpt_name"), ("LoraLoaderModelOnly", "lora_name"),  # Simple: an alias
                       ("LoadImage", "image")}
    models = env.paths.models.root
    aio = {"model.diffusion_model." + k: v for k, v in tiny_flux.bfl_transformer("dev").items()}
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in tiny_flux.clip_l_state().items()})
    aio.update({"text_encoders.t5xxl.transformer." + k: v for k, v in tiny_flux.t5_state().items()})
    aio.update({"vae." + k: v for k, v in tiny_flux.vae_state().items()})
    tiny_flux._save(models / "checkpoints" / "flux1-dev-fp8.safetensors", aio)
    (models / "loras").mkdir(exist_ok=True)
    save_file(_xlabs_lora(), str(models / "loras" / "uso-flux1-dit-lora-v1.safetensors"))
    for folder, name in TEMPLATE_FILES - {("checkpoints", "flux1-dev-fp8.safetensors"),
                                          ("loras", "uso-flux1-dit-lora-v1.safetensors")}:
        source = VISION if folder == "clip_vision" else USO
        (models / folder / name).write_bytes((models / folder / source).read_bytes())
    _picture(0, (48, 40)).save(env.paths.input.root / "flux1_dev_uso_reference_image_gen_input_image.png")
    wf = parse_document(document, registry).with_overrides(
        {"112:110.width": SIZE, "112:110.height": SIZE, "112:109.largest_size": SIZE, "112:31.steps": 3})
    outcome = Executor(registry, env).run(wf)
    assert outcome.status == "succeeded", outcome.error and outcome.error.message
    without = Executor(registry, env).run(wf.with_overrides({"112:43.strength_model": 0.0}))
    assert (outcome.results["112:31"][0]["samples"] - without.results["112:31"][0]["samples"]).abs().max() > EFFECT
