"""FreeU and FreeU_V2 (nodes/families/freeu.py, nodes/model_patches.py): which decoder resnets
they touch (ComfyUI's choice by channel count, checked on the released SD1.5 and SDXL
layouts), what they do to a resnet's input, and that they leave the network as it was."""
from __future__ import annotations


import pytest
import torch

from engine.context import NodeError
from nodes.families import freeu as fu
from nodes.handles import FreeUSettings
from nodes.latent import empty_latent_image
from nodes.model_patches import freeu, freeu_v2
from nodes.sampling import ksampler
from test_sampling import Recorder, sd1  # noqa: F401 (a fixture)

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize("config,widths", [
    (SD15, [1280] * 7 + [640, 640, 640, 320, 320]),
    (SDXL, [1280] * 4 + [640, 640, 640, 320, 320]),
])
def test_the_backbone_width_of_every_decoder_resnet_on_the_released_layouts(config, widths):
    """The width FreeU keys on: 1280 (4x the base) gets b1/s1, 640 gets b2/s2, as ComfyUI's
    output blocks see them (the first resnet of a level still carries the level below's width)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    assert [resnet.in_channels - skip for resnet, skip in fu.decoder_skips(unet)] == widths


def test_the_low_frequency_square_is_scaled_and_the_rest_kept():
    flat = torch.full((1, 2, 8, 8), 0.7)
    assert torch.allclose(fu.low_frequencies_scaled(flat, 0.3), flat * 0.3, atol=1e-6)  # all in the DC term
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    checker = checker.expand(1, 2, 8, 8)
    assert torch.allclose(fu.low_frequencies_scaled(checker, 0.3), checker, atol=1e-6)  # highest frequency


def test_the_backbone_boost():
    h = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    v1 = fu.backbone(h, 1.5, "v1")
    assert torch.equal(v1[:, :4], h[:, :4] * 1.5) and torch.equal(v1[:, 4:], h[:, 4:])
    v2 = fu.backbone(h, 1.5, "v2")
    factor = v2[:, :4] / h[:, :4]
    mean = h.mean(1, keepdim=True)
    for i in range(2):  # per image: 1.5 where the mean map peaks, 1 where it bottoms out
        top, low = mean[i].flatten().argmax(), mean[i].flatten().argmin()
        assert factor[i, 0].flatten()[top].item() == pytest.approx(1.5, rel=1e-4)
        assert factor[i, 0].flatten()[low].item() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(v2[:, 4:], h[:, 4:])


def test_the_hook_rewrites_a_decoder_resnets_input_and_is_removed_after(sd1):
    unet = sd1.parts["unet"]
    resnet, skip = fu.decoder_skips(unet)[0]
    width = resnet.in_channels - skip  # 64 on the tiny UNet: twice its base, so (b2, s2)
    seen = []
    probe = resnet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, context = torch.tensor(500.0), sd1.pos[0][0]
    try:
        with torch.no_grad():
            plain = unet(x, t, encoder_hidden_states=context).sample
            settings = FreeUSettings("v1", b1=9.0, b2=1.5, s1=9.0, s2=0.5)
            with fu.applied(unet, settings):
                hooked_probe = resnet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
                patched = unet(x, t, encoder_hidden_states=context).sample
                hooked_probe.remove()
            after = unet(x, t, encoder_hidden_states=context).sample
    finally:
        probe.remove()
    raw = seen[0]
    expected = torch.cat([fu.backbone(raw[:, :width], 1.5, "v1"), fu.low_frequencies_scaled(raw[:, width:], 0.5)], 1)
    assert width == 64 and torch.allclose(seen[2], expected, atol=1e-6)  # the probe after FreeU's hook
    assert not torch.allclose(patched, plain, atol=1e-4) and torch.equal(after, plain)


def _txt2img(tiny, model):
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, model, 5, 6, 5.0, "euler", "normal", tiny.pos, tiny.neg, empty)
    return out["samples"]


def test_through_ksampler_unit_factors_change_nothing_and_v2_changes_the_image(sd1):
    plain = _txt2img(sd1, sd1.model)
    (identity,) = freeu(Recorder().ctx, sd1.model, 1.0, 1.0, 1.0, 1.0)
    assert torch.allclose(_txt2img(sd1, identity), plain, rtol=1e-4, atol=1e-3)  # an FFT round trip apart
    (v2,) = freeu_v2(Recorder().ctx, sd1.model, 1.3, 1.4, 0.9, 0.2)
    out = _txt2img(sd1, v2)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
    assert sd1.model.patches.freeu is None


def test_a_flow_model_is_refused_naming_model():
    from test_flux import _model

    with pytest.raises(NodeError) as err:
        freeu_v2(Recorder().ctx, _model("dev"), 1.3, 1.4, 0.9, 0.2)
    assert err.value.input_name == "model"
