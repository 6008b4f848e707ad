"""Prompts of other lengths on the two sides of CFG (Family.repeats_text).

ComfyUI repeats the shorter of two prompts to a common length only for its UNet models (CONDCrossAttn:
cross-attention over a key list repeated k times gives the same result); its transformer models take
their text as CONDRegular, so prompts of other lengths run in calls of their own. On a transformer a
repeated prompt is another prompt (the text is weighed against the image in joint attention), so Kiln's
flow families evaluate them apart: one CFG evaluation equals the two sides evaluated alone. Shown on
FLUX.1 and FLUX.2 [dev], whose families repeated them before.
"""
from __future__ import annotations

import pytest
import torch

from nodes.families import flux, flux2_dev
from nodes.families.denoiser import Denoiser
from nodes.samplers.schedules import training_schedule

T = torch.tensor([500.0])
CFG = 3.0


def _tiny(name: str):
    if name == "flux":
        import tiny_flux

        return flux.FAMILY, tiny_flux.components()["transformer"], tiny_flux.TEXT
    import tiny_flux2dev

    return flux2_dev.FAMILY, tiny_flux2dev.components()["transformer"], 3 * tiny_flux2dev.MISTRAL


@pytest.mark.parametrize("name", ["flux", "flux2_dev"])
def test_a_negative_twice_as_long_is_evaluated_apart_not_repeated(name, monkeypatch):
    family, transformer, width = _tiny(name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, family.latent.channels, 8, 8, generator=gen)
    pos, neg = torch.randn(1, 5, width, generator=gen), torch.randn(1, 10, width, generator=gen)
    extra = {"pooled_output": torch.randn(1, width, generator=gen)} if name == "flux" else {}
    schedule = training_schedule(family.scheduler_config())

    def output(positive, negative=None, cfg=1.0):
        with torch.inference_mode():
            return Denoiser(transformer, family, positive=[[positive, dict(extra)]],
                            negative=None if negative is None else [[negative, dict(extra)]], cfg=cfg,
                            image_size=(64, 64), batch=1, schedule=schedule).model_output(x, T)

    cond, uncond = output(pos), output(neg)
    want = uncond + CFG * (cond - uncond)
    assert (output(pos, neg, CFG) - want).abs().max() <= 1e-4 * want.abs().max()
    monkeypatch.setattr(type(family), "repeats_text", True)  # the rule is what gives the separate result:
    assert (output(pos, neg, CFG) - want).abs().max() > 1e-3 * want.abs().max()  # repeated, it moves
