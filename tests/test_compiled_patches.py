"""Model patches on a compiled UNet give the eager UNet's results, and leave no trace behind.

Compiled mode (on by default on CUDA) compiles the denoiser in place, and dynamo does not guard
on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): a graph traced while a
patch's hooks are in would be reused after they are gone, and one traced without them would
ignore them. Each patch here runs between two plain jobs on a UNet compiled with dynamo's
``eager`` backend (the same tracing and guards as inductor, without its minutes of code
generation on this CPU), and every job must equal the same job on the eager UNet.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_models
from node_call import call
from nodes import model_patches, speed_patches
from nodes.families import sd1
from nodes.handles import ModelHandle
from nodes.sampling import ksampler

#: patch node, its inputs (settings that act on the tiny UNet at 64 x 64 pixels).
PATCHES = {
    "FreeU_V2": (model_patches.freeu_v2, {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
    "PatchModelAddDownscale": (model_patches.patch_model_add_downscale,
                               {"block_number": 1, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 0.6,
                                "downscale_after_skip": True, "downscale_method": "bicubic",
                                "upscale_method": "bicubic"}),
    "HyperTile": (speed_patches.hypertile, {"tile_size": 16, "swap_size": 2, "max_depth": 1, "scale_depth": False}),
    "TomePatchModel": (speed_patches.tome_patch_model, {"ratio": 0.5}),
    "PerturbedAttentionGuidance": (model_patches.perturbed_attention_guidance, {"scale": 3.0}),
    "SelfAttentionGuidance": (model_patches.self_attention_guidance, {"scale": 0.8, "blur_sigma": 2.0}),
}


def _handle(unet) -> ModelHandle:
    parts = tiny_models.components("sd1")
    return ModelHandle(sd1.FAMILY, scheduler_config=dict(parts["scheduler"].config), latent=sd1.FAMILY.latent,
                       _use_unet=lambda: contextlib.nullcontext(unet))


def _conditioning():
    from nodes.handles import ClipHandle

    parts = tiny_models.components("sd1")
    clip = ClipHandle(sd1.FAMILY, {"tokenizer": parts["tokenizer"]},
                      _use=lambda name: contextlib.nullcontext(parts["text_encoder"]))
    return clip.encode("a lighthouse at dusk"), clip.encode("blurry")


def _job(env, model: ModelHandle) -> torch.Tensor:
    positive, negative = _conditioning()
    (out,) = call(ksampler, env, model=model, seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal",
                  positive=positive, negative=negative, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    return out["samples"]


@pytest.fixture()
def env(tmp_path):
    from engine.context import Environment

    return Environment.for_folder(tmp_path)


def _compiled(unet):
    unet.compile(backend="eager")
    torch._dynamo.reset()
    return unet


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_a_patch_on_a_compiled_unet_equals_eager_and_leaves_no_trace(env, name):
    """One compiled UNet runs patched, plain, patched, plain: the first graph would be traced with
    the patch's hooks in (the plain job after it shows whether it was), and the second patched job
    comes when a graph without the patch exists. One trace per patch (each costs seconds here)."""
    node, settings = PATCHES[name]
    eager = _handle(tiny_models.fresh_components("sd1")["unet"])
    (eager_patched,) = call(node, env, model=eager, **settings)
    plain_result, patched_result = _job(env, eager), _job(env, eager_patched)
    assert (patched_result - plain_result).abs().max() > 1e-3, f"{name} acts on the tiny UNet"
    compiled = _handle(_compiled(tiny_models.fresh_components("sd1")["unet"]))
    (patched,) = call(node, env, model=compiled, **settings)
    for k, which in enumerate(("patched", "plain", "patched", "plain")):
        got = _job(env, patched if which == "patched" else compiled)
        want = patched_result if which == "patched" else plain_result
        assert torch.allclose(got, want, atol=1e-5), f"job {k + 1} ({which}), {name} compiled"


def _flux_outputs(net, rows_off) -> list:
    from nodes.families.flux import without_guidance
    from tiny_flux import forward

    outs = [forward(net)]
    with without_guidance(net, rows_off):
        outs.append(forward(net))
    return outs + [forward(net)]


def test_flux_disable_guidance_on_a_compiled_transformer():
    """FluxDisableGuidance zeroes the guidance embedding by a hook while the call runs."""
    import tiny_flux

    rows_off = torch.tensor([True])
    eager = _flux_outputs(tiny_flux.components("dev")["transformer"], rows_off)
    assert (eager[1] - eager[0]).abs().max() > 1e-4  # the hook acts
    for first_hooked in (False, True):
        net = _compiled(tiny_flux.build("dev")["transformer"])
        if first_hooked:
            from nodes.families.flux import without_guidance
            from tiny_flux import forward

            with without_guidance(net, rows_off):
                forward(net)
        got = _flux_outputs(net, rows_off)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, eager)), first_hooked


def test_skip_layers_on_a_compiled_transformer():
    """Skip-layer guidance hands a DiT block's inputs on by a hook while the call runs."""
    import tiny_flux
    from nodes.families.skip_layers import skipping
    from tiny_flux import forward

    def outputs(net) -> list:
        blocks = {"double": list(net.transformer_blocks), "single": list(net.single_transformer_blocks)}
        outs = [forward(net)]
        with skipping(blocks, (("double", (0,)),)):
            outs.append(forward(net))
        return outs + [forward(net)]

    eager = outputs(tiny_flux.components("dev")["transformer"])
    assert (eager[1] - eager[0]).abs().max() > 1e-4  # skipping the block acts
    got = outputs(_compiled(tiny_flux.build("dev")["transformer"]))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, eager))
