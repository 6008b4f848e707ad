"""The model-family seam: each family recognises its own files, and nothing else names a family.

The parity of each family with diffusers is in test_workflows_end_to_end.py and
test_sampling.py; here: detection is exclusive, the latent format round-trips,
the denoiser's ``predict`` is the k-diffusion denoised value of the same network
call, and the sampling loop, AddNoise, previews and latent nodes name no family.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from nodes import families
from nodes.checkpoint.to_original import components_to_original
from nodes.families.denoiser import Denoiser

REPO = Path(__file__).resolve().parents[1]
FAMILY_BLIND = ["nodes/samplers", "nodes/sampling.py", "nodes/latent.py", "nodes/families/denoiser.py",
                "nodes/families/conditioning.py", "nodes/families/text.py", "nodes/lora.py", "nodes/lora_keys.py",
                "nodes/runtime"]


@pytest.mark.parametrize("variant", tm.VARIANTS)
def test_exactly_one_family_claims_each_checkpoint_and_its_unet(variant):
    shapes = {k: tuple(v.shape) for k, v in components_to_original(tm.components(variant)).items()}
    expected = "sd2" if variant.startswith("sd2") else variant
    assert [f.name for f in families.ALL if f.claims(shapes)] == [expected]
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    assert families.for_unet(unet_only).name == expected


def test_latent_format_round_trips_and_previews_every_channel():
    fmt = families.by_name("sdxl").latent
    raw = torch.randn(1, 4, 8, 8)
    assert torch.allclose(fmt.from_model(fmt.to_model(raw)), raw, atol=1e-6)
    rgb = fmt.preview_rgb(fmt.to_model(raw)[0])
    assert rgb.shape == (8, 8, 3) and rgb.dtype == torch.uint8 and rgb.float().std() > 0
    shifted = type(fmt)(channels=4, scale=0.5, shift=0.25, rgb=fmt.rgb)
    assert torch.allclose(shifted.to_model(raw), (raw - 0.25) * 0.5)


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_predict_is_the_denoised_value_of_one_guided_call(variant):
    parts = tm.components(variant)
    unet = parts["unet"]
    fam = families.by_name(variant)
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    extra = {"pooled_output": torch.randn(1, 64, generator=g)} if variant == "sdxl" else {}
    pos = [[torch.randn(1, 77, width, generator=g), dict(extra)]]
    neg = [[torch.randn(1, 77, width, generator=g), dict(extra)]]
    den = Denoiser(unet, fam, positive=pos, negative=neg, cfg=4.0, image_size=(64, 64), batch=1)
    x, sigma, t = torch.randn(1, 4, 8, 8, generator=g) * 3, 2.5, torch.tensor(600.0)
    with torch.no_grad():
        eps = den.model_output(x / math.sqrt(sigma ** 2 + 1), t)
        denoised = den.predict(x, sigma, "epsilon", t)
        kwargs = fam.network_kwargs([neg[0][1], pos[0][1]], 1, (64, 64), "cpu", torch.float32)
        out = unet(torch.cat([x, x]) / math.sqrt(sigma ** 2 + 1), t, encoder_hidden_states=torch.cat(
            [neg[0][0], pos[0][0]]), return_dict=False, **kwargs)[0]
    uncond, cond = out.chunk(2)
    assert torch.equal(eps, uncond + 4.0 * (cond - uncond))
    assert torch.allclose(denoised, x - sigma * eps, atol=1e-4)


def test_the_family_blind_modules_name_no_family():
    names = re.compile(r"""["'](sd1|sd2|sdxl|flux|sd3)["']""")
    offending = []
    for entry in FAMILY_BLIND:
        for path in sorted((REPO / entry).rglob("*.py")) if (REPO / entry).is_dir() else [REPO / entry]:
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if names.search(line):
                    offending.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offending == []
