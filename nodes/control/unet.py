"""SD-style (UNet) ControlNets: the RGB hint goes in, residuals for the UNet's skip
connections (down blocks) and middle block come out. The family seam
(:meth:`nodes.families.base.Family.run_controlnet`) calls :func:`run` per ControlNet and
:func:`inputs` on the sum of all of them."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DOWN = "down_block_additional_residuals"
MID = "mid_block_additional_residual"


def _accepted(network: Any) -> set[str]:
    return set(inspect.signature(network.forward).parameters)


def run(network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor", kwargs: dict) -> dict[str, list]:
    """The ControlNet's down and mid residuals (times the link's strength) for rows ``x``, float32."""
    import torch

    from nodes.control.apply import hint_for

    dtype = network.dtype
    hint = hint_for(link, x.shape[0], x.shape[2] * 8, x.shape[3] * 8).to(x.device, dtype)
    accepted = _accepted(network)
    extra = {k: v for k, v in kwargs.items() if k in accepted}
    if hasattr(network, "task_embedding"):  # SDXL ControlNet Union
        from nodes.control import sdxl_union

        down, mid = sdxl_union.run(network, link, x, t, context, extra, hint)
        return {DOWN: [d.to(torch.float32) for d in down], MID: [mid.to(torch.float32)]}
    down, mid = network(x.to(dtype), t, encoder_hidden_states=context.to(dtype), controlnet_cond=hint,
                        conditioning_scale=float(link.strength), return_dict=False, **extra)
    return {DOWN: [d.to(torch.float32) for d in down], MID: [mid.to(torch.float32)]}


def inputs(totals: dict[str, list]) -> dict[str, Any]:
    """The UNet's keywords: a tuple of down residuals and the one mid residual."""
    return {DOWN: tuple(totals[DOWN]), MID: totals[MID][0]}
