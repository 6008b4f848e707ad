"""FLUX.2 [dev] on a tiny random model: Kiln's loaders and nodes against diffusers' Flux2Pipeline.

Text: CLIPLoader type flux2 on Comfy-Org's Mistral file layout (tokenizer from its ``tekken_model``)
gives the pipeline's ``_get_mistral_3_small_prompt_embeds`` at the token ids ComfyUI's Flux2Tokenizer
makes (``<s>``, the system prompt, the prompt in [INST], no padding). What differs from the pipeline
is the padding: diffusers pads the ids to 512 and encodes the pad tokens (masked); ComfyUI encodes
only the prompt and its FLUX.2 model puts zero tokens before it up to 512. The images are compared
with the pipeline given those ComfyUI embeddings (its own encoder's, zero-padded), within 1/255.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import tiny_flux2dev
from engine.context import NodeError
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from node_call import Recorder, call
from nodes import split_loaders
from nodes.families import flux2, flux2_dev

PROMPT = "a red barn in a field"
SIZE = 64
NAMES = tiny_flux2dev.NAMES
TOL = 1 / 255 + 1e-6

root = models_root(tiny_flux2dev.make_models_folder, "flux2dev-models")


def _clip(env, name: str = NAMES["clip"]):
    (clip,) = call(split_loaders.clip_loader, env, clip_name=name, type="flux2")
    return clip


@functools.lru_cache(maxsize=None)
def reference(seed: int, guidance: float, prompt: str = PROMPT, steps: int = 3,
              image: bytes | None = None) -> np.ndarray:
    """Flux2Pipeline's image on ComfyUI's prompt embeddings (see the module docstring)."""
    from PIL import Image

    kwargs = {}
    if image is not None:
        kwargs["image"] = Image.fromarray(np.frombuffer(image, dtype=np.uint8).reshape(SIZE, SIZE, 3))
    with torch.no_grad():
        return tiny_flux2dev.pipeline()(
            prompt_embeds=tiny_flux2dev.padded(tiny_flux2dev.prompt_embeds(prompt)), height=SIZE, width=SIZE,
            num_inference_steps=steps, guidance_scale=guidance, output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def _graph(unet: str, guidance: float, seed: int, prompt: str = PROMPT, steps: int = 3) -> dict:
    return {
        "10": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "11": {"class_type": "CLIPLoader", "inputs": {"clip_name": NAMES["clip"], "type": "flux2"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": NAMES["vae"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["11", 0]}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["12", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "flux2dev"}},
    }


# -- the text encoder -----------------------------------------------------------------------------


def test_conditioning_equals_the_pipelines_prompt_embeds_at_comfyuis_token_ids(env):
    clip = _clip(env)
    assert clip.family is flux2_dev.FAMILY
    tok = clip.tokenizers["tokenizer"]
    ids = [tok.bos_token_id] + tok(flux2_dev.TEMPLATE.format(PROMPT), add_special_tokens=False)["input_ids"]
    assert ids[:2] == [1, 17] and ids[-1] == 4 and 11 not in ids  # <s> [SYSTEM_PROMPT] ... [/INST], no <pad>
    ((cond, extra),) = clip.encode(PROMPT)
    want = tiny_flux2dev.prompt_embeds(PROMPT)
    assert cond.shape == want.shape == (1, len(ids), 3 * tiny_flux2dev.MISTRAL)
    assert torch.allclose(cond, want.float(), atol=1e-5)
    other = clip.encode("the cat sat on the mat")[0][0]
    assert other.shape[1] != cond.shape[1] or (other - cond).abs().max() > 1e-3  # the prompt matters
    # diffusers' own padding: 512 ids, the pads first (Kiln's tokenizer pads left, as ComfyUI's); the prompt's
    # states are the same (relative positions), the pads' are not zeros
    parts = tiny_flux2dev.components()
    with torch.no_grad():
        full = tiny_flux2dev.pipeline()._get_mistral_3_small_prompt_embeds(
            parts["text_encoder"], parts["tokenizer"], PROMPT, device=torch.device("cpu"))
    n = cond.shape[1]
    assert full.shape[1] == 512 and torch.allclose(full[:, -n:], cond, atol=1e-4)
    assert full[:, :-n].abs().max() > 1e-3


def test_pruned_whole_and_scaled_fp8_files_read_the_same_encoder(env):
    """The 30-layer file (no final norm) gives the 40-layer file's conditioning; a whole
    Mistral3ForConditionalGeneration file (vision tower, projector, lm_head) reads its language model
    alone; ComfyUI's scaled fp8 and fp8mixed files compute with their dequantised twins' weights."""
    full = _clip(env).encode(PROMPT)[0][0]
    assert torch.allclose(_clip(env, "mistral_pruned.safetensors").encode(PROMPT)[0][0], full, atol=1e-6)
    assert torch.equal(_clip(env, "mistral_whole.safetensors").encode(PROMPT)[0][0], full)
    scaled = _clip(env, NAMES["clip_fp8"])
    with scaled.encoder("text_encoder") as net:
        assert net.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    fp8 = scaled.encode(PROMPT)[0][0]
    assert torch.allclose(fp8, _clip(env, "mistral_dequantised.safetensors").encode(PROMPT)[0][0], atol=1e-5)
    assert not torch.equal(fp8, full)
    mixed = _clip(env, "mistral_fp8mixed.safetensors").encode(PROMPT)[0][0]  # ComfyUI's fp8mixed (comfy_quant)
    assert torch.allclose(mixed, _clip(env, "mistral_fp8mixed_dequantised.safetensors").encode(PROMPT)[0][0], atol=1e-5)
    assert not torch.equal(mixed, full)


def test_a_file_without_its_tokenizer_names_cliploader_and_the_input(env):
    with pytest.raises(NodeError) as err:
        _clip(env, "mistral_notekken.safetensors")
    assert "tekken_model" in str(err.value) and "CLIPLoader" in str(err.value)
    assert err.value.input_name == "clip_name"


# -- the transformer and the graph --------------------------------------------------------------


@pytest.mark.parametrize("unet", [NAMES["unet"], "flux2-dev-tiny-diffusers-keys.safetensors"])
def test_graph_with_flux_guidance_equals_flux2_pipeline(registry, env, unet):
    outcome = run(registry, env, parse(_graph(unet, 4.0, 8)))
    kiln = outcome.results["6"][0].numpy()
    assert np.abs(kiln - reference(8, 4.0)).max() <= TOL
    assert np.abs(kiln - reference(8, 2.0)).max() > 0.01  # the guidance value matters: not vacuous
    assert np.abs(kiln - reference(9, 4.0)).max() > 0.02  # so does the seed
    if unet == NAMES["unet"]:  # ComfyUI's zero padding to 512 is what matched: unpadded embeddings differ
        with torch.no_grad():
            unpadded = tiny_flux2dev.pipeline()(
                prompt_embeds=tiny_flux2dev.prompt_embeds(PROMPT), height=SIZE, width=SIZE, num_inference_steps=3,
                guidance_scale=4.0, output_type="np", generator=torch.Generator("cpu").manual_seed(8)).images
        assert np.abs(kiln - unpadded).max() > 2 / 255


def test_diffusers_folder_loads_as_dev_and_equals_flux2_pipeline(registry, env):
    """Flux2Pipeline.save_pretrained: Mistral3 in text_encoder/, tekken.json in tokenizer/."""
    graph = _graph(NAMES["unet"], 4.0, 8)
    graph["10"] = {"class_type": "DiffusersLoader", "inputs": {"model_path": "flux2-dev-tiny"}}
    graph["2"]["inputs"]["clip"], graph["6"]["inputs"]["vae"] = ["10", 1], ["10", 2]
    del graph["11"], graph["12"]
    kiln = run(registry, env, parse(graph)).results["6"][0].numpy()
    assert np.abs(kiln - reference(8, 4.0)).max() <= TOL
    assert np.abs(kiln - reference(8, 4.0, "the cat sat on the mat")).max() > 0.01  # the prompt matters


def test_reference_image_equals_flux2_pipeline_image_path(env):
    """ReferenceLatent on the VAE-encoded picture: the pipeline's ``image`` (reference at time 10)."""
    from nodes import loaders
    from nodes.flux_nodes import flux_guidance
    from nodes.kontext import reference_latent
    from nodes.sampling import ksampler

    (model,) = call(split_loaders.unet_loader, env, unet_name=NAMES["unet"])
    assert model.family is flux2_dev.FAMILY
    (vae,) = call(loaders.vae_loader, env, vae_name=NAMES["vae"])
    g = torch.Generator().manual_seed(11)
    picture = (torch.rand(1, SIZE, SIZE, 3, generator=g) * 255).round() / 255

    def kiln(image):
        ctx = Recorder().ctx
        (positive,) = flux_guidance(ctx, _clip(env).encode(PROMPT), 4.0)
        if image is not None:
            (positive,) = reference_latent(ctx, positive, {"samples": vae.encode(image)})
        latent = {"samples": torch.zeros(1, 128, SIZE // 16, SIZE // 16)}
        (out,) = ksampler(ctx, model, 5, 3, 1.0, "euler", "simple", positive, positive, latent)
        return vae.decode(out["samples"]).numpy()

    ours = kiln(picture)
    raw = (picture[0].numpy() * 255).round().astype(np.uint8).tobytes()
    assert np.abs(ours - reference(5, 4.0, image=raw)).max() <= TOL
    assert np.abs(ours - kiln(None)).max() > 0.01  # the reference moves it


def test_dev_has_no_guidance_note_and_klein_keeps_its_own():
    cond = [[torch.zeros(1, 4, 96), {"guidance": 4.0}]]
    assert flux2_dev.FAMILY.conditioning_notes([cond]) == []
    assert "klein" in flux2.FAMILY.conditioning_notes([cond])[0]
    kwargs = flux2_dev.FAMILY.network_kwargs([{"guidance": 4.0}, {}], 2, (4, 4), "cpu", torch.float32)
    assert kwargs["guidance"].tolist() == [4.0, 4.0, 3.5, 3.5]  # ComfyUI's 3.5 where none is set
    assert "guidance" not in flux2_dev.FAMILY.network_kwargs([{"guidance": None}], 1, (4, 4), "cpu", torch.float32)
    from nodes.families.base import ConditioningError

    with pytest.raises(ConditioningError, match="FluxDisableGuidance on one side only") as err:
        flux2_dev.FAMILY.network_kwargs([{"guidance": None, "_input": "negative"}, {"guidance": 4.0}], 1, (4, 4), "cpu",
                                        torch.float32)
    assert err.value.input_name == "negative"
