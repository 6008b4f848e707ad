"""Z-Image Fun ControlNet Union through ModelPatchLoader and QwenImageDiffsynthControlnet, on tiny random models.

A tiny ZImageControlNetModel (2 control blocks over the tiny Z-Image's 2 layers, 2 plain refiner blocks: the
1.0 release's structure) is saved as alibaba-pai ship theirs (its own state dict, diffusers' names) in
models/model_patches; the tiny Z-Image is the split file in diffusion_models. Kiln loads both through its
loader nodes, applies the patch and samples with KSampler; diffusers runs ZImageControlNetPipeline on the
same weights, control image, seed, steps and guidance. The decoded images agree within 1/255 per pixel;
the control image, the strength and the patch itself each move the image; strength 0 is the model as it was.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import pytest
import torch

import test_z_image
import tiny_flux
import tiny_models
import tiny_z_image
from engine.context import NodeError
from flow_family_files import env  # noqa: F401 (a fixture)
from node_call import call
from nodes import split_loaders
from nodes.handles import VaeHandle
from nodes.model_patch_nodes import model_patch_loader, qwen_image_diffsynth_controlnet
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
PROMPT, NEGATIVE = "a red barn in a field", "blurry, low quality"
PATCH = "tiny-z-image-fun-controlnet-union.safetensors"
SIZE = 64


#: The 2.1 release's structure: a 33-channel hint, refiner blocks with their own projections.
PATCH_21 = "tiny-z-image-fun-controlnet-union-2.1.safetensors"


@functools.lru_cache(maxsize=None)
def controlnet(version: str = "1.0") -> torch.nn.Module:
    """The tiny Fun ControlNet, its zero-initialised projections perturbed so that it acts."""
    from diffusers import ZImageControlNetModel

    two = version == "2.1"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        net = ZImageControlNetModel(control_layers_places=[0, 1], control_in_dim=33 if two else 16,
                                    add_control_noise_refiner="control_noise_refiner" if two else None,
                                    control_refiner_layers_places=[0, 1] if two else None, dim=tiny_z_image.DIM,
                                    n_refiner_layers=2, n_heads=tiny_z_image.HEADS, n_kv_heads=tiny_z_image.HEADS)
        tiny_flux._perturb(net, 0.05)
    return net.eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tiny_z_image.make_models_folder(tmp_path_factory.mktemp("z-image-cn"))
    tiny_flux._save(root / "model_patches" / PATCH, dict(controlnet().state_dict()))
    tiny_flux._save(root / "model_patches" / PATCH_21, dict(controlnet("2.1").state_dict()))
    tiny_flux._save(root / "model_patches" / "not-a-patch.safetensors", tiny_flux.vae_state())
    return root


def hint(kind: str = "edges") -> torch.Tensor:
    """A control image [1, 64, 64, 3] in 0..1: Canny-like white lines on black, or another drawing."""
    image = torch.zeros(1, SIZE, SIZE, 3)
    if kind == "edges":
        image[:, 16:18, 8:56] = 1.0
        image[:, 8:56, 40:42] = 1.0
    else:
        image[:, 30:34, :] = 1.0
        image[:, :, 10:12] = 1.0
    return image


def vae() -> VaeHandle:
    net = tiny_z_image.components()["vae"]
    return VaeHandle(latent_scale=0.3611, latent_channels=16, _use_vae=lambda: contextlib.nullcontext(net))


def kiln(env, strength: float = 0.75, image: torch.Tensor | None = None, cfg: float = 1.0, seed: int = 5,
         steps: int = 4, patched: bool = True, name: str = PATCH, mask: torch.Tensor | None = None) -> torch.Tensor:
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-z-image.safetensors")
    if patched:
        (patch,) = call(model_patch_loader, env, name=name)
        (model,) = call(qwen_image_diffsynth_controlnet, env, model=model, model_patch=patch, vae=vae(),
                        image=hint() if image is None else image, strength=strength, mask=mask)
    clip = test_z_image._clip()
    (out,) = call(ksampler, env, model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="simple", positive=clip.encode(PROMPT), negative=clip.encode(NEGATIVE if cfg != 1 else ""),
                  latent_image={"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}, denoise=1.0)
    return tiny_models.decode(tiny_z_image.components()["vae"], out["samples"])


def diffusers(strength: float = 0.75, cfg: float = 1.0, seed: int = 5, steps: int = 4,
              version: str = "1.0") -> torch.Tensor:
    from diffusers import ZImageControlNetPipeline

    pipe = ZImageControlNetPipeline(**dict(tiny_z_image.components()), controlnet=copy.deepcopy(controlnet(version)))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE if cfg != 1 else None, height=SIZE, width=SIZE,
                   control_image=hint().permute(0, 3, 1, 2) * 2 - 1, controlnet_conditioning_scale=strength,
                   num_inference_steps=steps, guidance_scale=cfg - 1.0, generator=torch.Generator().manual_seed(seed),
                   output_type="pt").images
    return out.permute(0, 2, 3, 1)


def test_txt2img_with_the_fun_controlnet_equals_z_image_controlnet_pipeline(env):
    ours = kiln(env)
    assert (ours - diffusers()).abs().max() <= PIXEL_TOL
    assert (ours - kiln(env, patched=False)).abs().max() > 0.02  # the ControlNet acts
    assert (ours - kiln(env, image=hint("other"))).abs().max() > 0.02  # the control image matters
    assert (ours - kiln(env, strength=0.3)).abs().max() > 0.02  # and the strength


def test_the_2_1_layout_equals_the_pipeline(env):
    """A 2.1-shaped file (refiner blocks with projections, a 33-channel hint given zeros after the control
    latent, as ZImageControlNetPipeline fills it) loads by its shapes and samples as the pipeline does."""
    ours = kiln(env, name=PATCH_21)
    assert (ours - diffusers(version="2.1")).abs().max() <= PIXEL_TOL
    assert (ours - kiln(env, name=PATCH_21, strength=0.3)).abs().max() > 0.02


def hole() -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 8:40, 20:52] = 1.0
    return mask


def test_the_2_1_layout_with_a_mask_equals_the_inpaint_pipeline(env):
    """QwenImageDiffsynthControlnet's mask on a 2.x file: the kept mask and a grey image's latent after the
    control latent (the node has no image to repaint: ComfyUI's grey), as ZImageControlNetInpaintPipeline
    builds it given that grey image and the mask."""
    from diffusers import ZImageControlNetInpaintPipeline

    ours = kiln(env, name=PATCH_21, mask=hole())
    pipe = ZImageControlNetInpaintPipeline(**dict(tiny_z_image.components()),
                                           controlnet=copy.deepcopy(controlnet("2.1")))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, height=SIZE, width=SIZE, image=torch.zeros(1, 3, SIZE, SIZE),
                      mask_image=hole()[:, None], control_image=hint().permute(0, 3, 1, 2) * 2 - 1,
                      controlnet_conditioning_scale=0.75, num_inference_steps=4, guidance_scale=0.0,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    assert (ours - kiln(env, name=PATCH_21)).abs().max() > 0.01  # the mask is read
    assert torch.equal(kiln(env, mask=hole()), kiln(env))  # the 1.0 file has no mask input: ignored


def test_with_cfg_and_a_negative_prompt_equals_the_pipeline(env):
    """Both sides of guidance are controlled (one ControlNet call over the negative and positive rows)."""
    ours = kiln(env, cfg=3.0, strength=1.0, seed=7)
    assert (ours - diffusers(cfg=3.0, strength=1.0, seed=7)).abs().max() <= PIXEL_TOL
    assert (ours - kiln(env, cfg=3.0, strength=1.0, seed=7, patched=False)).abs().max() > 0.02


def test_two_patches_stack_by_adding_their_samples(env):
    """Applied twice, the patch's samples add up: the same image at 0.375 twice is the image at 0.75
    (the samples are linear in the strength)."""
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-z-image.safetensors")
    (patch,) = call(model_patch_loader, env, name=PATCH)
    for _ in range(2):
        (model,) = call(qwen_image_diffsynth_controlnet, env, model=model, model_patch=patch, vae=vae(), image=hint(),
                        strength=0.375)
    clip = test_z_image._clip()
    (out,) = call(ksampler, env, model=model, seed=5, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                  positive=clip.encode(PROMPT), negative=clip.encode(""),
                  latent_image={"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}, denoise=1.0)
    stacked = tiny_models.decode(tiny_z_image.components()["vae"], out["samples"])
    assert (stacked - kiln(env)).abs().max() <= PIXEL_TOL
    assert (stacked - kiln(env, strength=0.375)).abs().max() > 0.02


def test_strength_0_is_the_model_unchanged_bit_for_bit(env):
    (model,) = call(split_loaders.unet_loader, env, unet_name="tiny-z-image.safetensors")
    (patch,) = call(model_patch_loader, env, name=PATCH)
    (same,) = call(qwen_image_diffsynth_controlnet, env, model=model, model_patch=patch, vae=vae(), image=hint(),
                   strength=0.0)
    assert same is model
    assert torch.equal(kiln(env, strength=0.0), kiln(env, patched=False))


def test_loader_says_what_it_read_and_refuses_other_files(env):
    from node_call import Called

    rec = Called()
    (patch,) = call(model_patch_loader, env, rec, name=PATCH)
    assert patch.family.name == "z-image" and any("Fun ControlNet Union 1.0, 2 blocks" in m for m in rec.messages)
    with pytest.raises(NodeError) as err:
        call(model_patch_loader, env, name="not-a-patch.safetensors")
    text = str(err.value)
    assert err.value.input_name == "name" and "not-a-patch.safetensors" in text
    assert "Z-Image Fun ControlNet" in text and "decoder." in text  # what it found


def test_the_patch_on_a_non_z_image_model_is_refused_by_name(env):
    flux = test_z_image._model()
    flux = type(flux)(tiny_flux_family(), scheduler_config={}, latent=flux.latent, _use_unet=flux._use_unet)
    (patch,) = call(model_patch_loader, env, name=PATCH)
    with pytest.raises(NodeError) as err:
        call(qwen_image_diffsynth_controlnet, env, model=flux, model_patch=patch, vae=vae(), image=hint(),
             strength=1.0)
    assert err.value.input_name == "model" and PATCH in str(err.value) and "flux" in str(err.value)


def tiny_flux_family():
    from nodes.families import flux

    return flux.FAMILY


def _editor_template(name: str) -> dict:
    import importlib
    import json

    folder = Path(importlib.import_module("comfyui_workflow_templates_json").__file__).parent / "templates"
    return json.loads((folder / name).read_text(encoding="utf-8"))


def test_comfyui_fun_controlnet_template_runs_and_equals_the_pipeline(env):
    """ComfyUI's image_z_image_turbo_fun_union_controlnet template (editor format, a subgraph): LoadImage
    (its ImageScaleToMaxDimension bypassed), Canny, GetImageSize, ModelPatchLoader, QwenImageDiffsynthControlnet at
    strength 1, KSampler res_multistep 8 steps cfg 1. On the tiny files it runs; with euler it equals
    ZImageControlNetPipeline given the template's Canny image; strength 0 gives another image."""
    from diffusers import ZImageControlNetPipeline

    from engine.executor import Executor
    from engine.formats import parse_document
    from engine.registry import default_registry
    from nodes.sample_image import draw_landscape

    registry = default_registry()
    draw_landscape(SIZE, SIZE).save(env.paths.input.root / "control.png")
    base = {"58.image": "control.png", "70:46.unet_name": "tiny-z-image.safetensors",
            "70:39.clip_name": "tiny-qwen_3_4b.safetensors", "70:40.vae_name": "tiny-flux-ae.safetensors",
            "70:64.name": PATCH, "70:44.seed": 21}

    def run(**overrides):
        wf = parse_document(_editor_template("image_z_image_turbo_fun_union_controlnet.json"), registry)
        wf = wf.with_overrides(dict(base, **overrides))
        outcome = Executor(registry, env).run(wf)
        assert outcome.status == "succeeded", outcome.error and outcome.error.message
        return wf, outcome

    wf, first = run()
    assert wf.nodes["70:60"].inputs["strength"] == 1 and wf.nodes["70:44"].inputs["sampler_name"] == "res_multistep"
    assert first.results["70:43"][0].shape == (1, SIZE, SIZE, 3)
    wf, euler = run(**{"70:44.sampler_name": "euler"})
    ours, edges = euler.results["70:43"][0], euler.results["57"][0]
    pipe = ZImageControlNetPipeline(**dict(tiny_z_image.components()), controlnet=copy.deepcopy(controlnet()))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt=wf.nodes["70:45"].inputs["text"], height=SIZE, width=SIZE,
                      control_image=edges.permute(0, 3, 1, 2) * 2 - 1, controlnet_conditioning_scale=1.0,
                      num_inference_steps=8, guidance_scale=0.0, generator=torch.Generator().manual_seed(21),
                      output_type="pt").images.permute(0, 2, 3, 1)
    assert (ours - theirs).abs().max() <= PIXEL_TOL
    _, off = run(**{"70:44.sampler_name": "euler", "70:60.strength": 0.0})
    assert (ours - off.results["70:43"][0]).abs().max() > 0.02
