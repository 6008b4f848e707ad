"""DiffSynth's Qwen-Image blockwise ControlNet through ModelPatchLoader and QwenImageDiffsynthControlnet.

There is no diffusers pipeline for it: the reference is QwenImagePipeline on the tiny Qwen-Image with
forward hooks that restate ComfyUI's rule by hand (tests only, written from the rule, not from Kiln's
module): the control image's VAE posterior mean, normalised by the VAE's latent statistics, 2x2-packed,
through ``img_in``; after transformer block i the image stream's first tokens get
``output_proj(gelu(input_proj(rms(x) * wx + rms(hint) * wy))) * strength``. The inpainting variant
appends the kept mask (1 - mask, bilinear at the latent's size) to the latent before packing.
Kiln samples with KSampler (euler, cfg 2.5 with a negative: both sides controlled) and must agree
within 1/255 per pixel; the patch, the control image and the strength each move the image.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch

import test_qwen_image
import tiny_flux
import tiny_qwen_image
from engine.context import NodeError
from flow_family_files import env  # noqa: F401 (a fixture)
from node_call import call
from nodes.model_patch_nodes import model_patch_loader, qwen_image_diffsynth_controlnet
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PATCH, INPAINT = "tiny-qwen-canny-diffsynth.safetensors", "tiny-qwen-inpaint-diffsynth.safetensors"
SIZE, CFG, STEPS, SEED = 64, 2.5, 4, 5
DIM = tiny_qwen_image.HEADS * tiny_qwen_image.HEAD_DIM


@functools.lru_cache(maxsize=None)
def patch_state(mask: bool = False) -> dict:
    g = torch.Generator().manual_seed(3 if mask else 2)

    def rnd(*shape, scale=0.2, base=0.0):
        return (base + torch.randn(*shape, generator=g) * scale).contiguous()

    state = {"img_in.weight": rnd(DIM, 64 + (4 if mask else 0)), "img_in.bias": rnd(DIM)}
    for i in range(tiny_qwen_image.LAYERS):
        p = f"controlnet_blocks.{i}."
        state |= {p + "x_rms.weight": rnd(DIM, base=1.0), p + "y_rms.weight": rnd(DIM, base=1.0),
                  p + "input_proj.weight": rnd(DIM, DIM), p + "input_proj.bias": rnd(DIM),
                  p + "output_proj.weight": rnd(DIM, DIM), p + "output_proj.bias": rnd(DIM)}
    return state


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_qwen_image.make_models_folder(tmp_path_factory.mktemp("qwen-blockwise"))
    tiny_flux._save(root / "model_patches" / PATCH, patch_state())
    tiny_flux._save(root / "model_patches" / INPAINT, patch_state(True))
    return root


def control_image(kind: str = "edges") -> torch.Tensor:
    image = torch.zeros(1, SIZE, SIZE, 3)
    if kind == "edges":
        image[:, 20:22, 4:60] = 1.0
        image[:, 4:60, 36:38] = 1.0
    else:
        image[:, :, 10:14] = 1.0
    return image


def hole() -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 8:40] = 1.0
    return mask


def kiln(env, strength: float = 1.0, image: torch.Tensor | None = None, patched: bool = True,
         name: str = PATCH, mask: torch.Tensor | None = None) -> torch.Tensor:
    clip, model, vae = test_qwen_image._clip(), test_qwen_image._model(), test_qwen_image._vae()
    if patched:
        (patch,) = call(model_patch_loader, env, name=name)
        (model,) = call(qwen_image_diffsynth_controlnet, env, model=model, model_patch=patch, vae=vae,
                        image=control_image() if image is None else image, strength=strength, mask=mask)
    (out,) = call(ksampler, env, model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                  scheduler="normal", positive=clip.encode(test_qwen_image.PROMPT),
                  negative=clip.encode(test_qwen_image.NEGATIVE),
                  latent_image={"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}, denoise=1.0)
    return vae.decode(out["samples"])


@contextlib.contextmanager
def restated(state: dict, strength: float, image: torch.Tensor, mask: torch.Tensor | None = None):
    """Hooks on the tiny transformer's blocks doing ComfyUI's rule, written out here."""
    parts = tiny_qwen_image.components()
    vae, transformer = parts["vae"], parts["transformer"]
    with torch.no_grad():
        raw = vae.encode((image.permute(0, 3, 1, 2) * 2 - 1)[:, :, None]).latent_dist.mean[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        lat = (raw - mean) / std
        b, _, h, w = lat.shape
        if state["img_in.weight"].shape[1] > 64:
            keep = torch.ones(b, 1, h, w) if mask is None else torch.nn.functional.interpolate(
                (1 - mask)[:, None], size=(h, w), mode="bilinear", align_corners=False)
            lat = torch.cat([lat, keep], 1)
        c = lat.shape[1]
        packed = lat.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        hint = packed @ state["img_in.weight"].T + state["img_in.bias"]

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def hook(i):
        p = f"controlnet_blocks.{i}."

        def after(module, args, output):
            text, img = output
            n = hint.shape[1]
            x = img[:, :n]
            y = rms(x, state[p + "x_rms.weight"]) + rms(hint.expand(x.shape[0], -1, -1), state[p + "y_rms.weight"])
            y = torch.nn.functional.gelu(y @ state[p + "input_proj.weight"].T + state[p + "input_proj.bias"])
            y = y @ state[p + "output_proj.weight"].T + state[p + "output_proj.bias"]
            return text, torch.cat([x + y * strength, img[:, n:]], 1)

        return after

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(transformer.transformer_blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference(strength: float = 1.0, mask: torch.Tensor | None = None, inpaint: bool = False) -> torch.Tensor:
    with restated(patch_state(inpaint), strength, control_image(), mask):
        return test_qwen_image.diffusers(test_qwen_image.PROMPT, test_qwen_image.NEGATIVE, CFG, steps=STEPS,
                                         seed=SEED)


def test_blockwise_controlnet_equals_comfyuis_rule_restated(env):
    ours = kiln(env)
    assert (ours - reference()).abs().max() <= PIXEL_TOL
    plain = kiln(env, patched=False)
    assert (plain - test_qwen_image.diffusers(test_qwen_image.PROMPT, test_qwen_image.NEGATIVE, CFG, steps=STEPS,
                                              seed=SEED)).abs().max() <= PIXEL_TOL  # hooks gone after the run
    assert (ours - plain).abs().max() > 0.02  # the patch acts
    assert (ours - kiln(env, image=control_image("other"))).abs().max() > 0.02  # the control image matters
    assert (ours - kiln(env, strength=0.4)).abs().max() > 0.02  # and the strength
    assert torch.equal(kiln(env, strength=0.0), plain)


def test_inpainting_variant_reads_the_kept_mask(env):
    ours = kiln(env, name=INPAINT, mask=hole())
    assert (ours - reference(mask=hole(), inpaint=True)).abs().max() <= PIXEL_TOL
    assert (ours - kiln(env, name=INPAINT)).abs().max() > 0.02  # the mask matters (ones without it)
    assert (kiln(env, name=INPAINT) - reference(inpaint=True)).abs().max() <= PIXEL_TOL


def test_a_blockwise_patch_on_z_image_is_refused_by_name(env):
    import test_z_image

    (patch,) = call(model_patch_loader, env, name=PATCH)
    with pytest.raises(NodeError) as err:
        call(qwen_image_diffsynth_controlnet, env, model=test_z_image._model(), model_patch=patch,
             vae=test_qwen_image._vae(), image=control_image(), strength=1.0)
    assert err.value.input_name == "model" and PATCH in str(err.value) and "qwen_image model patch" in str(err.value)


def test_comfyui_controlnet_patch_template_runs_and_equals_the_rule(env, root):
    """ComfyUI's image_qwen_image_controlnet_patch template (editor format): LoadImage, ImageScaleToTotalPixels,
    Canny, VAEEncode as the latent, ModelPatchLoader, QwenImageDiffsynthControlnet at strength 1,
    ModelSamplingAuraFlow 3.1, KSampler euler/simple cfg 2.5 (the Lightning LoRA bypassed). On the tiny
    split files it equals QwenImagePipeline at shift 3.1 with the restated hooks on the template's Canny
    image; strength 0 gives another image."""
    import importlib
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from engine.executor import Executor
    from engine.formats import parse_document
    from engine.registry import default_registry
    from nodes.sample_image import draw_landscape

    registry = default_registry()
    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    doc = json.loads((folder / "image_qwen_image_controlnet_patch.json").read_text(encoding="utf-8"))
    (root / "loras").mkdir(exist_ok=True)  # the bypassed LoRA must exist to validate; it never loads
    save_file({}, str(root / "loras" / "Qwen-Image-Lightning-4steps-V1.0.safetensors"))
    draw_landscape(96, 96).save(env.paths.input.root / "control.png")
    base = {"71.image": "control.png", "75.megapixels": 0.01, "75.resolution_steps": 16,
            "37.unet_name": "tiny-qwen_image.safetensors", "38.clip_name": "tiny-qwen_2.5_vl.safetensors",
            "39.vae_name": "tiny-qwen_image_vae.safetensors", "70.name": PATCH, "3.seed": 9, "3.steps": STEPS,
            "6.text": test_qwen_image.PROMPT, "7.text": test_qwen_image.NEGATIVE}

    def run(**overrides):
        wf = parse_document(doc, registry).with_overrides(dict(base, **overrides))
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        return wf, outcome

    wf, first = run()
    assert wf.nodes["69"].inputs["strength"] == 1 and wf.nodes["3"].inputs["cfg"] == 2.5
    ours, edges = first.results["8"][0], first.results["72"][0]
    _, h, w, _ = ours.shape
    assert h % 16 == 0 and w % 16 == 0 and edges.shape[1:3] == (h, w)
    pipe = tiny_qwen_image.pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.1,
                                                                 use_dynamic_shifting=False, shift_terminal=None)
    with restated(patch_state(), 1.0, edges), torch.no_grad():
        theirs = pipe(prompt=test_qwen_image.PROMPT, negative_prompt=test_qwen_image.NEGATIVE, height=h,
                      width=w, num_inference_steps=STEPS, true_cfg_scale=2.5, output_type="pt",
                      generator=torch.Generator().manual_seed(9)).images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    _, off = run(**{"69.strength": 0.0})
    assert (ours - off.results["8"][0]).abs().max() > 0.02
