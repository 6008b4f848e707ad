"""Kohya's Deep Shrink, ComfyUI's PatchModelAddDownscale (nodes/families/deep_shrink.py, the
node in nodes/model_patches.py).

One network evaluation must equal the UNet written out here block by block as ComfyUI runs it
(input blocks with the shrink at ``block_number``, before or after the skip; output blocks
resizing to each skip; upsamplers told the next skip's size), inside the noise window and
exactly the plain network outside it. Through KSampler a factor of 1 or an empty window gives
the unpatched bytes and another setting another image; FLUX and bad input are refused by name;
a ComfyUI API prompt with the node validates and runs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.context import NodeError
from nodes.families import deep_shrink as ds
from nodes.handles import DeepShrinkSettings
from nodes.model_patches import patch_model_add_downscale
from nodes.sampling import ksampler
from test_sampling import Recorder, sd1, sdxl  # noqa: F401 (fixtures)

METHODS = {"bilinear": "bilinear", "nearest-exact": "nearest-exact", "bicubic": "bicubic", "area": "area"}


def _by_hand(unet, x, t, context, n, factor, after_skip, down, up):
    """The UNet's forward as ComfyUI's UNetModel runs it with Deep Shrink's two patches."""
    def shrink(h):
        return F.interpolate(h, size=(round(h.shape[-2] / factor), round(h.shape[-1] / factor)), mode=METHODS[down])

    emb = unet.time_embedding(unet.time_proj(t.reshape(1)).to(x.dtype))
    hs = []

    def input_block(h):
        if len(hs) == n and not after_skip:
            h = shrink(h)
        hs.append(h)
        if len(hs) == n + 1 and after_skip:
            h = shrink(h)
        return h

    h = input_block(unet.conv_in(x))
    for level in unet.down_blocks:
        for j, resnet in enumerate(level.resnets):
            h = resnet(h, emb)
            if hasattr(level, "attentions"):
                h = level.attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
            h = input_block(h)
        if level.downsamplers:
            h = input_block(level.downsamplers[0](h))
    h = unet.mid_block(h, emb, encoder_hidden_states=context)
    for level in unet.up_blocks:
        for j, resnet in enumerate(level.resnets):
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode=METHODS[up])
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if hasattr(level, "attentions"):
                h = level.attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
        if level.upsamplers:
            h = level.upsamplers[0](h, hs[-1].shape[-2:])  # ComfyUI's Upsample to the next skip's size
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def _settings(n, factor, after_skip, down="bilinear", up="bicubic", window=(1e9, 0.0)):
    return DeepShrinkSettings(n, factor, window[0], window[1], after_skip, down, up)


def _schedule(tiny):
    from nodes.samplers.schedules import TrainingSchedule

    return TrainingSchedule(tiny.model.scheduler_config)


@pytest.mark.parametrize("n,factor,after_skip,down,up", [
    (1, 2.0, True, "bilinear", "bicubic"), (1, 1.5, False, "area", "nearest-exact"),
    (2, 1.5, True, "bicubic", "bilinear"), (3, 2.0, False, "nearest-exact", "bilinear"),
    (3, 2.0, True, "bilinear", "bilinear")])  # 3: the last input block, shrunk on its way to the middle
def test_one_evaluation_is_comfyui_s_unet_with_the_patches(sd1, n, factor, after_skip, down, up):
    unet = sd1.parts["unet"]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context, t = sd1.pos[0][0], torch.tensor(600.0)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        expected = _by_hand(unet, x, t, context, n, factor, after_skip, down, up)
        with ds.applied(unet, _settings(n, factor, after_skip, down, up), _schedule(sd1)):
            ours = unet(x, t, encoder_hidden_states=context).sample
        again = unet(x, t, encoder_hidden_states=context).sample
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2
    assert torch.equal(again, plain)  # the hooks are gone


def test_the_shrink_follows_the_noise_window(sd1):
    unet, schedule = sd1.parts["unet"], _schedule(sd1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    context = sd1.pos[0][0]
    window = (float(schedule.sigma(700.0)), float(schedule.sigma(300.0)))
    with torch.no_grad():
        with ds.applied(unet, _settings(1, 2.0, True, window=window), schedule):
            inside, outside = (unet(x, torch.tensor(t), encoder_hidden_states=context).sample for t in (500.0, 900.0))
        plain_inside, plain_outside = (unet(x, torch.tensor(t), encoder_hidden_states=context).sample
                                       for t in (500.0, 900.0))
        expected = _by_hand(unet, x, torch.tensor(500.0), context, 1, 2.0, True, "bilinear", "bicubic")
    assert torch.equal(outside, plain_outside)  # bit for bit the plain network
    assert torch.allclose(inside, expected, atol=1e-5) and (inside - plain_inside).abs().max() > 1e-2


def test_comfyui_s_block_numbers_are_the_skips_on_the_released_layouts():
    """SD1.5 has 12 input blocks, SDXL 9: the decoder's skips, block for block."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from nodes.families.freeu import decoder_skips
    from test_freeu import SD15, SDXL

    for config, count in ((SD15, 12), (SDXL, 9)):
        with init_empty_weights():
            unet = UNet2DConditionModel(**config)
        blocks = ds.encoder_blocks(unet)
        assert len(blocks) == count == len(decoder_skips(unet)) == len(ds.decoder_feeds(unet))
        assert blocks[3][0] is unet.down_blocks[0].downsamplers[0]  # the default block_number: the first downsample


# -- through KSampler ------------------------------------------------------------------------------

def _txt2img(tiny, model, size=8):
    (out,) = ksampler(Recorder().ctx, model, 5, 4, 6.0, "euler", "normal", tiny.pos, tiny.neg,
                      {"samples": torch.zeros(1, 4, size, size)})
    return out["samples"]


def _patched(tiny, *args):
    (model,) = patch_model_add_downscale(Recorder().ctx, tiny.model, *args)
    return model


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_identities_give_the_unpatched_bytes_and_the_shrink_another_image(family, request):
    tiny = request.getfixturevalue(family)
    plain = _txt2img(tiny, tiny.model)
    for identity in [(1, 1.0, 0.0, 1.0, True, "bicubic", "bicubic"),  # nothing to resize
                     (1, 2.0, 1.0, 1.0, True, "bicubic", "bicubic")]:  # a window no step falls in
        assert _txt2img(tiny, _patched(tiny, *identity)).numpy().tobytes() == plain.numpy().tobytes()
    shrunk = _txt2img(tiny, _patched(tiny, 1, 2.0, 0.0, 0.5, True, "bicubic", "bicubic"))
    assert (shrunk - plain).abs().max() > 1e-2
    assert tiny.model.patches.deep_shrink is None  # the handle it was given samples as before


def test_an_odd_size_and_factor_run(sd1):
    """A 10x14 latent shrunk by 1.3 (sizes no power of two divides): the decoder still meets every skip."""
    model = _patched(sd1, 2, 1.3, 0.0, 1.0, False, "bislerp", "area")
    (out,) = ksampler(Recorder().ctx, model, 5, 3, 6.0, "euler", "normal", sd1.pos, sd1.neg,
                      {"samples": torch.zeros(1, 4, 10, 14)})
    assert out["samples"].shape == (1, 4, 10, 14) and torch.isfinite(out["samples"]).all()


# -- refusals and the node as ComfyUI declares it ---------------------------------------------------

GOOD = dict(block_number=3, downscale_factor=2.0, start_percent=0.0, end_percent=0.35, downscale_after_skip=True,
            downscale_method="bicubic", upscale_method="bicubic")


@pytest.mark.parametrize("change,bad", [
    ({"block_number": 0}, "block_number"), ({"block_number": 33}, "block_number"), ({"block_number": 2.5},
                                                                                    "block_number"),
    ({"downscale_factor": 0.05}, "downscale_factor"), ({"downscale_factor": 9.5}, "downscale_factor"),
    ({"start_percent": -0.1}, "start_percent"), ({"end_percent": 1.1}, "end_percent"),
    ({"downscale_method": "lanczos"}, "downscale_method"), ({"upscale_method": "nearest"}, "upscale_method")])
def test_bad_input_is_refused_by_name(sd1, change, bad):
    with pytest.raises(NodeError) as err:
        patch_model_add_downscale(Recorder().ctx, sd1.model, **{**GOOD, **change})
    assert err.value.input_name == bad


def test_flux_and_non_models_are_refused_naming_model():
    from test_flux import _model

    for model in (_model("dev"), "not a model"):
        with pytest.raises(NodeError) as err:
            patch_model_add_downscale(Recorder().ctx, model, **GOOD)
        assert err.value.input_name == "model"


def test_the_node_has_comfyui_s_schema():
    from engine.registry import default_registry

    spec = default_registry().get("PatchModelAddDownscale")
    assert spec.category == "model_patches/unet" and spec.display_name == "PatchModelAddDownscale (Kohya Deep Shrink)"
    got = [(i.name, i.type, i.default, i.min, i.max) for i in spec.inputs[1:6]]
    assert got == [("block_number", "INT", 3, 1, 32), ("downscale_factor", "FLOAT", 2.0, 0.1, 9.0),
                   ("start_percent", "FLOAT", 0.0, 0.0, 1.0), ("end_percent", "FLOAT", 0.35, 0.0, 1.0),
                   ("downscale_after_skip", "BOOLEAN", True, None, None)]
    for name in ("downscale_method", "upscale_method"):
        assert spec.input(name).choice_list() == ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]
    assert [o.type for o in spec.outputs] == ["MODEL"]


def test_a_comfyui_prompt_with_deep_shrink_validates_and_runs(tiny_env):
    from engine.executor import Executor
    from engine.registry import default_registry
    from engine.validate import WorkflowInvalid
    from engine.workflow import parse
    from test_custom_sampling import _ksampler_prompt

    executor = Executor(default_registry(), tiny_env)
    plain = executor.run(parse(_ksampler_prompt(8)))
    prompt = _ksampler_prompt(8)
    prompt["50"] = {"class_type": "PatchModelAddDownscale", "inputs": {
        "model": ["4", 0], "block_number": 1, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 0.5,
        "downscale_after_skip": True, "downscale_method": "bicubic", "upscale_method": "bicubic"}}
    prompt["3"]["inputs"]["model"] = ["50", 0]
    run = executor.run(parse(prompt))
    assert run.status == "succeeded", run.error and run.error.message
    assert (run.results["8"][0] - plain.results["8"][0]).abs().max().item() > 3e-3
    prompt["50"]["inputs"]["upscale_method"] = "lanczos"
    with pytest.raises(WorkflowInvalid, match="upscale_method"):
        executor.run(parse(prompt))


# -- with a ControlNet -----------------------------------------------------------------------------

def test_a_controlnet_s_residuals_are_added_where_their_sizes_agree(sd1):
    """Inside the window Kiln adds the residuals itself (ComfyUI's way): with nothing shrunk that is
    bit for bit diffusers' own addition; shrunk, the run completes, the residuals of the unshrunk
    skips still steer it, and those of shrunk ones are left out."""
    from test_controlnet import advanced, handle

    pos, neg = advanced(sd1, handle("sd1"))

    def run(model, positive=pos, negative=neg):
        (out,) = ksampler(Recorder().ctx, model, 5, 3, 6.0, "euler", "normal", positive, negative,
                          {"samples": torch.zeros(1, 4, 8, 8)})
        return out["samples"]

    controlled = run(sd1.model)
    unshrunk = _patched(sd1, 1, 1.0, 0.0, 1.0, True, "bicubic", "bicubic")
    assert run(unshrunk).numpy().tobytes() == controlled.numpy().tobytes()
    from nodes.model_patches import freeu  # the residual joins the skip before FreeU filters it

    (with_freeu,) = freeu(Recorder().ctx, sd1.model, 1.3, 1.4, 0.5, 0.3)
    (both,) = freeu(Recorder().ctx, unshrunk, 1.3, 1.4, 0.5, 0.3)
    assert run(both).numpy().tobytes() == run(with_freeu).numpy().tobytes()
    shrunk = _patched(sd1, 1, 2.0, 0.0, 1.0, True, "bicubic", "bicubic")
    with_control, without = run(shrunk), run(shrunk, sd1.pos, sd1.neg)
    assert torch.isfinite(with_control).all()
    assert (with_control - without).abs().max() > 1e-2 and (with_control - controlled).abs().max() > 1e-2


def test_residuals_by_hand_at_one_evaluation(sd1):
    """Shrunk after block 1 (8x8 -> 4x4): skips 0 and 1 keep their size and take their residuals;
    skips 2 and 3 and the middle output are 2x2, so their 4x4 residuals are left out. (Where
    every size agrees, the bytes test above checks the middle one is added.)"""
    unet = sd1.parts["unet"]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    context, t = sd1.pos[0][0], torch.tensor(600.0)
    with torch.no_grad():
        shapes = _skip_shapes(unet, x, t, context)
        down = tuple(torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes))
        mid = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(9))
        with ds.applied(unet, _settings(1, 2.0, True), _schedule(sd1)):
            ours = unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            uncontrolled = unet(x, t, encoder_hidden_states=context).sample
        expected = _by_hand_controlled(unet, x, t, context, down)
    assert [s[-2:] for s in shapes] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert torch.allclose(ours, expected, atol=1e-5) and (ours - uncontrolled).abs().max() > 1e-2


def _skip_shapes(unet, x, t, context):
    """The unshrunk network's skip shapes, as a ControlNet sizes its residuals."""
    shapes = []

    def record(module, args, output):
        shapes.append(tuple((output[0] if isinstance(output, tuple) else output).shape))

    handles = [out.register_forward_hook(record) for _, out in ds.encoder_blocks(unet)]
    unet(x, t, encoder_hidden_states=context)
    for handle in handles:
        handle.remove()
    return shapes


def _by_hand_controlled(unet, x, t, context, down):
    """ComfyUI's forward shrinking after block 1's skip (bilinear; bicubic back), each residual
    added to its skip where the sizes agree."""
    emb = unet.time_embedding(unet.time_proj(t.reshape(1)).to(x.dtype))
    h = unet.conv_in(x)
    hs = [h]
    for level in unet.down_blocks:
        for j, resnet in enumerate(level.resnets):
            h = resnet(h, emb)
            if hasattr(level, "attentions"):
                h = level.attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
            hs.append(h)
            if len(hs) == 2:
                h = F.interpolate(h, size=(4, 4), mode="bilinear")
        if level.downsamplers:
            h = level.downsamplers[0](h)
            hs.append(h)
    hs = [skip + r if skip.shape == r.shape else skip for skip, r in zip(hs, down)]
    h = unet.mid_block(h, emb, encoder_hidden_states=context)
    for level in unet.up_blocks:
        for j, resnet in enumerate(level.resnets):
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="bicubic")
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if hasattr(level, "attentions"):
                h = level.attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
        if level.upsamplers:
            h = level.upsamplers[0](h, hs[-1].shape[-2:])
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
