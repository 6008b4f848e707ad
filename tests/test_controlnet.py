"""ControlNet on tiny random-weight models: loading every layout, parity with diffusers, the
strength/stack/range rules, bad input, and the Canny preprocessor.

Parity convention: Kiln's ControlNetApplyAdvanced with strength s on the whole range
(ComfyUI's node: the same control on positive and negative, residuals times s) is
diffusers' ControlNet img2img pipeline with ``controlnet_conditioning_scale=s``,
``guess_mode=False`` (the pipeline's default 0.8 scale is passed explicitly). diffusers'
guess mode (control on the conditional pass only, residuals scaled 0.1..1 by depth) has
no ComfyUI counterpart and is not compared. Ranges differ on purpose: diffusers counts
``control_guidance_start/end`` in step fractions, ComfyUI (and Kiln) in the model's
noise levels, so ranges are checked by their limits (end 0 = no ControlNet) instead.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_models
from engine.context import NodeError
from node_call import Called, call
from nodes.canny import canny, canny_node
from nodes.control.apply import ControlNetHandle
from nodes.controlnet import (controlnet_apply, controlnet_apply_advanced, controlnet_loader,
                              diff_controlnet_loader)
from nodes.latent import add_noise
from nodes.sampling import ksampler
from test_sampling import PIXEL_TOL, Recorder, Tiny, sd1, sdxl  # noqa: F401 (the two are fixtures)

SIZE = 64
STEPS, STRENGTH, CFG, SEED = 8, 0.7, 6.0, 42


def hint_image() -> torch.Tensor:
    """IMAGE [1, 64, 64, 3]: a white square and a bar on black (an edge-map-like hint)."""
    img = torch.zeros(1, SIZE, SIZE, 3)
    img[:, 12:40, 16:44] = 1.0
    img[:, 48:56, 4:60] = 1.0
    return img


def handle(variant: str, net=None, name: str = "tiny-cn") -> ControlNetHandle:
    from nodes import families

    net = net if net is not None else tiny_models.controlnet(variant)
    return ControlNetHandle(name=name, family=families.by_name(variant), config=dict(net.config),
                            _use=lambda: contextlib.nullcontext(net))


def kiln(tiny: Tiny, pos, neg, sampler: str = "euler") -> torch.Tensor:
    rec = Recorder()
    lat, = add_noise(rec.ctx, tiny.model, {"samples": tiny.init}, STRENGTH, SEED)
    out, = ksampler(rec.ctx, tiny.model, SEED, STEPS, CFG, sampler, "normal", pos, neg, lat)
    return tiny.decode(out["samples"])


def advanced(tiny: Tiny, cn: ControlNetHandle, strength: float = 1.0, start: float = 0.0, end: float = 1.0,
             pos=None, neg=None, image=None):
    return call(controlnet_apply_advanced, None, positive=pos or tiny.pos, negative=neg or tiny.neg, control_net=cn,
                image=hint_image() if image is None else image, strength=strength, start_percent=start,
                end_percent=end)


def diffusers_reference(tiny: Tiny, variant: str, scale: float) -> torch.Tensor:
    import diffusers

    cls = (diffusers.StableDiffusionXLControlNetImg2ImgPipeline if tiny.sdxl
           else diffusers.StableDiffusionControlNetImg2ImgPipeline)
    parts = dict(tiny.parts, controlnet=tiny_models.controlnet(variant))
    pipe = tiny_models.pipeline(variant, cls=cls, parts=parts)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = pipe(image=tiny.init * tiny.scale, control_image=hint_image().movedim(-1, 1), strength=STRENGTH,
               num_inference_steps=STEPS, guidance_scale=CFG, controlnet_conditioning_scale=scale, guess_mode=False,
               generator=torch.Generator().manual_seed(SEED), output_type="pt", **tiny.embeds).images
    return ref.permute(0, 2, 3, 1)


# -- numerics: equal to diffusers' ControlNet img2img pipelines --------------------------------

@pytest.mark.parametrize("variant,scale", [("sd1", 1.0), ("sd1", 0.5), ("sdxl", 1.0)])
def test_controlnet_img2img_equals_diffusers(variant, scale, sd1, sdxl):
    tiny = sd1 if variant == "sd1" else sdxl
    pos, neg = advanced(tiny, handle(variant), strength=scale)
    ours = kiln(tiny, pos, neg)
    ref = diffusers_reference(tiny, variant, scale)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # Not vacuous: the ControlNet changed the image.
    plain = kiln(tiny, tiny.pos, tiny.neg)
    assert (ours - plain).abs().max().item() > 0.02


def test_strength_zero_and_end_zero_are_no_controlnet_and_ranges_matter(sd1):
    cn = handle("sd1")
    plain = kiln(sd1, sd1.pos, sd1.neg)
    assert torch.equal(kiln(sd1, *advanced(sd1, cn, strength=0.0)), plain)
    assert torch.equal(kiln(sd1, *advanced(sd1, cn, end=0.0)), plain)
    assert torch.equal(kiln(sd1, *advanced(sd1, cn, start=1.0, end=1.0)), plain)
    full = kiln(sd1, *advanced(sd1, cn))
    early = kiln(sd1, *advanced(sd1, cn, end=0.5))
    late = kiln(sd1, *advanced(sd1, cn, start=0.5))
    for a, b in ((full, plain), (early, plain), (late, plain), (early, full), (late, full), (early, late)):
        assert (a - b).abs().max().item() > 0.005


def test_two_controlnets_stack_as_the_sum_of_their_residuals(sd1):
    """Chained apply nodes add their residuals: two halves of one ControlNet equal it at full strength."""
    cn = handle("sd1")
    full = kiln(sd1, *advanced(sd1, cn, strength=1.0))
    p, n = advanced(sd1, cn, strength=0.5)
    stacked = kiln(sd1, *advanced(sd1, cn, strength=0.5, pos=p, neg=n))
    assert (stacked - full).abs().max().item() <= PIXEL_TOL
    # and a second, different ControlNet stacked on the first changes the image
    other = handle("sd1", tiny_models.controlnet("sd1", seed=2), name="other")
    p2, n2 = advanced(sd1, other, pos=p, neg=n)
    assert (kiln(sd1, p2, n2) - kiln(sd1, p, n)).abs().max().item() > 0.005
    assert p2[0][1]["control"].previous is p[0][1]["control"] and p2[0][1]["control"] is n2[0][1]["control"]


def test_old_apply_node_controls_the_negative_too(sd1):
    """ComfyUI's ControlNetApply on the positive only: the negative borrows it (control_apply_to_uncond),
    so it equals ControlNetApplyAdvanced on both."""
    cn = handle("sd1")
    (pos,) = call(controlnet_apply, None, conditioning=sd1.pos, control_net=cn, image=hint_image(), strength=1.0)
    assert (kiln(sd1, pos, sd1.neg) - kiln(sd1, *advanced(sd1, cn))).abs().max().item() <= PIXEL_TOL


def test_controlnet_of_another_family_is_refused_naming_the_input(sdxl):
    pos, neg = advanced(sdxl, handle("sd1"))
    rec = Recorder()
    lat, = add_noise(rec.ctx, sdxl.model, {"samples": sdxl.init}, STRENGTH, SEED)
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, sdxl.model, SEED, 2, CFG, "euler", "normal", pos, neg, lat)
    assert err.value.input_name in ("positive", "negative")
    assert "sd1 ControlNet" in str(err.value) and "sdxl" in str(err.value) and "tiny-cn" in str(err.value)


def test_apply_node_input_errors(sd1):
    with pytest.raises(NodeError) as err:
        advanced(sd1, "not a controlnet")
    assert err.value.input_name == "control_net"
    with pytest.raises(NodeError) as err:
        advanced(sd1, handle("sd1"), start=0.8, end=0.2)
    assert err.value.input_name == "start_percent"
    with pytest.raises(NodeError) as err:
        advanced(sd1, handle("sd1"), image=torch.zeros(1, 8, 8))
    assert err.value.input_name == "image"


# -- files: every layout loads to the same network, through the nodes --------------------------

@pytest.fixture(scope="module")
def cn_env(tmp_path_factory):
    from engine.context import Environment, Paths
    from nodes.runtime.models import ModelManager

    root = tmp_path_factory.mktemp("cn")
    models = root / "models"
    tiny_models.save_single_file("sd1", models / "checkpoints" / tiny_models.checkpoint_name("sd1"))
    net, unet = tiny_models.controlnet("sd1"), tiny_models.components("sd1")["unet"]
    for layout, name in (("original", "cn.pth.safetensors"), ("plain", "cn-plain.safetensors"),
                         ("diffusers-file", "cn-diffusers.safetensors"), ("diffusers", "cn-folder"),
                         ("diff", "cn-diff.safetensors")):
        tiny_models.save_controlnet(net, models / "controlnet" / name, layout, unet)
    tiny_models.save_controlnet(tiny_models.controlnet("sdxl"), models / "controlnet" / "xl.safetensors")
    (models / "controlnet" / "junk.safetensors").write_bytes(b"not a safetensors file")
    env = Environment(paths=Paths.under(root / "data", models=models), models=ModelManager(device="cpu"))
    yield env
    env.models.unload_all(collect=False)


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["cn.pth.safetensors", "cn-plain.safetensors", "cn-diffusers.safetensors",
                                  "cn-folder"])
def test_every_layout_loads_the_same_network_once(cn_env, name):
    from nodes.controlnet import _controlnets

    assert name in _controlnets(cn_env)
    rec = Called()
    (h,) = call(controlnet_loader, cn_env, rec, control_net_name=name)
    assert h.family.name == "sd1" and "sd1 ControlNet" in rec.messages[0]
    with h.use() as network:
        _same_weights(network, tiny_models.controlnet("sd1"))
    loads = cn_env.models.counters["loads"]
    call(controlnet_loader, cn_env, control_net_name=name)
    assert cn_env.models.counters["loads"] == loads  # the model manager holds it once


def test_diff_controlnet_needs_the_model_and_adds_its_weights(cn_env):
    from nodes.loaders import checkpoint_loader

    with pytest.raises(NodeError) as err:
        call(controlnet_loader, cn_env, control_net_name="cn-diff.safetensors")
    assert err.value.input_name == "control_net_name" and "DiffControlNetLoader" in str(err.value)
    model, _, _ = call(checkpoint_loader, cn_env, ckpt_name=tiny_models.checkpoint_name("sd1"))
    (h,) = call(diff_controlnet_loader, cn_env, model=model, control_net_name="cn-diff.safetensors")
    with h.use() as network:
        want = tiny_models.controlnet("sd1").state_dict()
        for k, v in network.state_dict().items():
            assert torch.allclose(v, want[k], atol=1e-6), k


def test_bad_controlnet_files_name_the_input(cn_env):
    with pytest.raises(NodeError) as err:
        call(controlnet_loader, cn_env, control_net_name="junk.safetensors")
    assert err.value.input_name == "control_net_name" and "junk.safetensors" in str(err.value)
    with pytest.raises(NodeError) as err:
        call(controlnet_loader, cn_env, control_net_name="missing.safetensors")
    assert err.value.input_name == "control_net_name"
    (xl,) = call(controlnet_loader, cn_env, control_net_name="xl.safetensors")
    assert xl.family.name == "sdxl"


# -- Canny ------------------------------------------------------------------------------------------

def test_canny_finds_the_edges_of_a_hand_made_image():
    img = torch.zeros(1, 32, 40, 3)
    img[:, :, 20:] = 1.0  # a vertical step between columns 19 and 20
    (edges,) = call(canny_node, None, image=img, low_threshold=0.4, high_threshold=0.8)
    assert edges.shape == (1, 32, 40, 3) and torch.equal(edges[..., 0], edges[..., 2])
    e = edges[0, :, :, 0]
    cols = torch.nonzero(e.sum(0)).flatten().tolist()
    assert len(cols) == 1 and cols[0] in (19, 20)  # one thin line at the step
    assert e[:, cols[0]].sum().item() == 32  # unbroken, top to bottom
    # a square: edges only within a pixel of its outline, and on all four sides
    sq = torch.zeros(1, 3, 24, 24)
    sq[:, :, 6:18, 6:18] = 1.0
    e = canny(sq, 0.4, 0.8)[0, 0]
    ys, xs = torch.nonzero(e, as_tuple=True)
    near = ((ys - 5.5).abs() <= 1.5) | ((ys - 17.5).abs() <= 1.5) | ((xs - 5.5).abs() <= 1.5) | ((xs - 17.5).abs() <= 1.5)
    assert bool(near.all()) and len(ys) >= 40
    for rows in (e[4:8], e[16:20], e[:, 4:8].t(), e[:, 16:20].t()):
        assert rows.amax(0)[8:16].all()  # each side covered along its middle
    assert canny(torch.full((1, 3, 16, 16), 0.5), 0.4, 0.8).sum() == 0  # a flat image has no edge
    # thresholds: a faint step is below the defaults, found with low ones
    faint = img * 0.1
    assert call(canny_node, None, image=faint, low_threshold=0.4, high_threshold=0.8)[0].sum() == 0
    assert call(canny_node, None, image=faint, low_threshold=0.05, high_threshold=0.1)[0].sum() > 0
    with pytest.raises(NodeError) as err:
        call(canny_node, None, image=img, low_threshold=0.9, high_threshold=0.2)
    assert err.value.input_name == "low_threshold"
