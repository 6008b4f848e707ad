"""A variance-exploding solver stepping a flow state: how ComfyUI runs ``uni_pc`` and
``uni_pc_bh2`` on flow models (FLUX).

A flow state x_t = (1 - t) x0 + t n satisfies dx/dt = (x - x0) / t, the probability-flow
equation of a variance-exploding state at sigma = t, so a solver written for one runs on
the other if it is handed the state as if it were variance-exploding: the network's
velocity is then that state's noise prediction (x - x0) / t. ComfyUI's UniPC does exactly
this (its SigmaConvert); Kiln hands the flow state to diffusers' UniPCMultistepScheduler,
which steps in the variance-preserving scale x / sqrt(1 + t^2), and converts back after
each step. bh1 stops at t = 0.001, as ComfyUI's does (its step onto 0 divides by zero).

Importing this module does not import torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from nodes.samplers.kdiffusion import StepOutput

if TYPE_CHECKING:
    import torch

    from nodes.samplers.names import SamplerSpec

#: Where bh1 stops instead of 0 (ComfyUI's uni_pc on a list ending in 0).
BH1_END = 1e-3


class VEFrame:
    """A diffusers multistep scheduler over a flow list, on the loop's surface: the loop's
    state and the network's input are the flow state; the scheduler sees its VP form."""

    order = 1

    def __init__(self, inner: Any, steps: int, num_train_timesteps: int = 1000) -> None:
        self.inner = inner
        self.sigmas = inner.sigmas  # the flow times visited, the end included
        self.timesteps = inner.sigmas[:steps] * num_train_timesteps
        self._index = 0

    def set_begin_index(self, index: int = 0) -> None:
        self._index = index

    def scale_model_input(self, sample: "torch.Tensor", timestep: Any = None) -> "torch.Tensor":
        return sample

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             generator: Any = None, return_dict: bool = True) -> StepOutput:
        i = self._index
        self._index += 1
        t, t_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        vp = self.inner.step(model_output, self.inner.timesteps[i], sample / math.sqrt(1 + t * t)).prev_sample
        return StepOutput(vp * math.sqrt(1 + t_next * t_next), sample - t * model_output)


def unipc(spec: "SamplerSpec", sigmas: "torch.Tensor", num_train_timesteps: int = 1000) -> VEFrame:
    """diffusers' UniPC with ``spec``'s variant over ``sigmas`` (flow times), in the VE frame."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    steps = len(sigmas) - 1
    ends_above = float(sigmas[-1]) > 0
    visited = sigmas if ends_above else sigmas[:-1]  # a split list's end is one more step's start
    config = {**spec.config, "final_sigmas_type": "zero"}
    inner = UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type="epsilon",
                                    use_karras_sigmas=True, **config)
    wanted = np.asarray(visited.tolist(), dtype=np.float64)
    inner._convert_to_karras = lambda *args, **kwargs: wanted.copy()
    inner.set_timesteps(len(wanted))
    if not ends_above and spec.config.get("solver_type") == "bh1":
        inner.sigmas[-1] = BH1_END
    return VEFrame(inner, steps, num_train_timesteps)
