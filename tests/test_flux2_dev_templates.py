"""ComfyUI's FLUX.2 [dev] templates (comfyui-workflow-templates-json), as its editor saved them.

``image_flux2_text_to_image``, ``image_flux2`` (one reference picture) and ``image_flux2_fp8`` (two) run
unchanged on the tiny [dev] (tests/tiny_flux2dev.py) saved under the names they ask for: UNETLoader,
CLIPLoader type flux2 (bf16 / scaled fp8 Mistral), VAELoader (flux2-vae, full_encoder_small_decoder),
FluxGuidance 4, BasicGuider, Flux2Scheduler, EmptyFlux2LatentImage, ReferenceLatent, RandomNoise,
KSamplerSelect euler, SamplerCustomAdvanced, and the Turbo-LoRA switch (LoraLoaderModelOnly). Only
sizes, steps and seeds are set. Each equals Flux2Pipeline within 1/255 on ComfyUI's prompt embeddings
(tiny_flux2dev.prompt_embeds, zero-padded to 512 as ComfyUI's model does); with the switch on, the
pipeline's transformer has the LoRA merged by hand.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux2dev
from engine.formats import parse_document
from flow_family_files import env, registry, run, save_state, template  # noqa: F401 (fixtures)

SIZE = 64
STEPS = 3
#: ImageScaleToTotalPixels' least (0.01 MP) at 16-pixel steps: the edit templates' 64-pixel pictures become 96.
SCALE, SCALED = {"megapixels": 0.01, "resolution_steps": 16}, 96
NAMES = tiny_flux2dev.NAMES
#: The Turbo LoRA here: rank-2 deltas in ComfyUI's layout on an MLP and the image input.
LORA = {name: (torch.randn(2, cols, generator=torch.Generator().manual_seed(3 + i)) * 0.3,
               torch.randn(rows, 2, generator=torch.Generator().manual_seed(13 + i)) * 0.3)
        for i, (name, rows, cols) in enumerate([("double_blocks.0.img_mlp.0", 384, 64), ("img_in", 64, 128)])}
#: Where each LoRA module's delta lands in diffusers' transformer.
MERGED = {"double_blocks.0.img_mlp.0": "transformer_blocks.0.ff.linear_in.weight", "img_in": "x_embedder.weight"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_flux2dev.make_models_folder(tmp_path_factory.mktemp("flux2dev-templates"))
    lora = {f"diffusion_model.{name}.lora_{ab}.weight": t for name, (down, up) in LORA.items()
            for ab, t in (("A", down), ("B", up))}
    for name in (NAMES["lora"], "Flux2TurboComfyv2.safetensors"):
        save_state(root / "loras" / name, lora)
    return root


def test_the_lora_modules_exist_in_the_tiny_model():
    state = tiny_flux2dev.components()["transformer"].state_dict()
    original = tiny_flux2dev.original_transformer()
    for name, (down, up) in LORA.items():
        assert tuple(original[name + ".weight"].shape) == (up.shape[0], down.shape[1])
        assert state[MERGED[name]].shape == original[name + ".weight"].shape


def _transformer(lora: bool) -> torch.nn.Module:
    net = tiny_flux2dev.components()["transformer"]
    if not lora:
        return net
    merged = copy.deepcopy(net)
    with torch.no_grad():
        params = dict(merged.named_parameters())
        for name, (down, up) in LORA.items():
            params[MERGED[name]].add_(up @ down)
    return merged


def pipeline(prompt: str, seed: int, lora: bool = False, images: list | None = None,
             embeds: torch.Tensor | None = None, size: int = SIZE) -> np.ndarray:
    from PIL import Image

    from flow_family_files import quiet_pipeline

    pipe = quiet_pipeline("Flux2Pipeline", {**tiny_flux2dev.components(), "transformer": _transformer(lora)})
    embeds = tiny_flux2dev.prompt_embeds(prompt) if embeds is None else embeds
    kwargs = {}
    if images:
        kwargs["image"] = [Image.fromarray((i[0].numpy() * 255).round().astype(np.uint8)) for i in images]
    with torch.no_grad():
        return pipe(prompt_embeds=tiny_flux2dev.padded(embeds), height=size, width=size, num_inference_steps=STEPS,
                    guidance_scale=4.0, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
                    **kwargs).images


def _pictures(env, *names: str) -> None:
    from nodes.sample_image import draw_landscape

    for i, name in enumerate(names):
        picture = draw_landscape(SIZE, SIZE)
        if i:  # a second, different picture
            picture = picture.transpose(0)
        picture.save(env.paths.input.root / name)


@pytest.mark.parametrize("turbo", [False, True])
def test_text_to_image_template_equals_flux2_pipeline(registry, env, turbo):
    wf = parse_document(template("image_flux2_text_to_image.json"), registry).with_overrides({
        "98:47.width": SIZE, "98:47.height": SIZE, "98:48.width": SIZE, "98:48.height": SIZE,
        "98:100.value": STEPS, "98:99.value": STEPS, "98:25.noise_seed": 7, "98:104.value": turbo})
    assert wf.nodes["98:26"].inputs["guidance"] == 4 and wf.nodes["98:10"].inputs["vae_name"] == NAMES["vae_small"]
    outcome = run(registry, env, wf)
    ours = outcome.results["98:8"][0].numpy()
    prompt = wf.nodes["98:6"].inputs["text"]
    assert outcome.results["98:48"][0].shape == (STEPS + 1,)
    assert np.abs(ours - pipeline(prompt, 7, lora=turbo)).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - pipeline(prompt, 7, lora=not turbo)).max() > 0.01  # the switch's LoRA moves it


def test_edit_template_with_one_reference_equals_flux2_pipeline(registry, env):
    _pictures(env, "image_flux2_input_image.png")
    wf = parse_document(template("image_flux2.json"), registry).with_overrides({
        **{f"45.{k}": v for k, v in SCALE.items()}, "68:91.value": STEPS, "68:25.noise_seed": 5})
    outcome = run(registry, env, wf)
    ours, scaled = outcome.results["68:8"][0].numpy(), outcome.results["45"][0]
    assert scaled.shape == ours.shape == (1, SCALED, SCALED, 3)
    prompt = wf.nodes["68:6"].inputs["text"]
    assert np.abs(ours - pipeline(prompt, 5, images=[scaled], size=SCALED)).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - pipeline(prompt, 5, size=SCALED)).max() > 0.01  # the reference moves it


def test_fp8_template_with_two_references_equals_flux2_pipeline(registry, env):
    """The scaled fp8 Mistral (its text checked against its dequantised twin in test_flux2_dev.py): the
    pipeline gets Kiln's conditioning from that file, and both pictures, first the one GetImageSize reads."""
    from node_call import call
    from nodes import split_loaders

    _pictures(env, "image_flux2_input_ref_image.png", "image_flux2_input_Illustration.png")
    wf = parse_document(template("image_flux2_fp8.json"), registry).with_overrides({
        **{f"62:{n}.{k}": v for n in (45, 41) for k, v in SCALE.items()}, "62:90.value": STEPS,
        "62:25.noise_seed": 9})
    outcome = run(registry, env, wf)
    ours = outcome.results["62:8"][0].numpy()
    first, second = outcome.results["62:45"][0], outcome.results["62:41"][0]
    assert not torch.equal(first, second)
    (clip,) = call(split_loaders.clip_loader, env, clip_name=NAMES["clip_fp8"], type="flux2")
    embeds = clip.encode(wf.nodes["62:6"].inputs["text"])[0][0]
    assert ours.shape == (1, SCALED, SCALED, 3)
    both = pipeline("", 9, images=[first, second], embeds=embeds, size=SCALED)
    assert np.abs(ours - both).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - pipeline("", 9, images=[first], embeds=embeds, size=SCALED)).max() > 2 / 255  # both count
