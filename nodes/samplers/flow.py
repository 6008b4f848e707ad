"""Flow-matching model sampling (FLUX, and any rectified-flow family).

A flow model's state at flow time t in [0, 1] is ``x_t = (1 - t) * x0 + t * noise``
and its network predicts the velocity ``noise - x0``; sampling integrates from
t = 1 (pure noise) to 0. The sigmas of such a model *are* flow times, so a noise
level and a blend weight are the same number, and noising a latent is a blend,
not an addition. A model is a flow model when its scheduler config is diffusers'
``FlowMatchEulerDiscreteScheduler`` one (the family says so in
``Family.scheduler_config``); :func:`nodes.samplers.plan.plan` hands such models
here, so neither the loop nor AddNoise names a family.

The grid is diffusers' FluxPipeline's: ``linspace(1, 1/N, N)`` shifted by
``exp(mu) / (exp(mu) + 1/t - 1)``, where ``mu`` grows linearly with the number of
2x2 latent patches (``use_dynamic_shifting``, diffusers' ``calculate_shift``), or a
fixed shift ``s * t / (1 + (s - 1) t)`` without dynamic shifting ([schnell]).
ComfyUI's ``ModelSamplingFlux`` fixes the size the shift is computed for: the
config then carries ``kiln_shift_seq_len``.

Strength (AddNoise): FluxImg2ImgPipeline's rule, which differs from SD's by one
rounding: ``t_start = int(N - N * s)`` (SD img2img rounds the steps run down,
``int(N * s)``), and sampling starts from the image blended with the seeded noise
at the flow time of step ``t_start``. ComfyUI's ``denoise`` runs the last
``steps`` steps of the ``int(steps / denoise)``-step grid, as for SD.

Samplers: ``euler`` (diffusers' FlowMatchEulerDiscreteScheduler, the one FLUX's
pipelines use). Schedules: ``normal``, ``simple`` and ``sgm_uniform`` are the
pipeline's uniform grid; ``karras``, ``exponential`` and ``beta`` are diffusers'
flags on it. Others are refused with the list.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from nodes.families.base import ConditioningError
from nodes.samplers.kdiffusion import StepOutput

if TYPE_CHECKING:
    import torch

    from nodes.samplers.names import SamplerSpec
    from nodes.samplers.plan import Plan

FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"
SAMPLERS = ("euler",)
SCHEDULE_FLAGS: dict[str, dict[str, Any]] = {
    "normal": {}, "simple": {}, "sgm_uniform": {},
    "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
#: Kiln's own keys in a flow config (not diffusers'): the patch count ModelSamplingFlux fixed.
SHIFT_SEQ_LEN = "kiln_shift_seq_len"
#: The image side (pixels) a scheduler node shifts for when it is not told the size (ComfyUI's default).
DEFAULT_SHIFT_SIZE = 1024


def is_flow(config: Mapping[str, Any]) -> bool:
    """Whether a model with this scheduler config samples by flow matching."""
    return config.get("_class_name") == FLOW_CLASS


def calculate_mu(config: Mapping[str, Any], seq_len: int) -> float:
    """The dynamic shift for ``seq_len`` patches: linear between (base_len, base_shift) and (max_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + (base - slope * base_len)


def mu_for(config: Mapping[str, Any], h: int, w: int) -> float | None:
    """``mu`` for a latent of h x w (2x2 patches), or the one ModelSamplingFlux fixed; None: unshifted."""
    if not config.get("use_dynamic_shifting"):
        return None
    seq_len = config.get(SHIFT_SEQ_LEN) or (h // 2) * (w // 2)
    return calculate_mu(config, int(seq_len))


class FlowStepper:
    """diffusers' flow Euler scheduler on the surface the loop expects (``scale_model_input``,
    a ``step`` that also reports the clean-latent prediction for previews)."""

    order = 1

    def __init__(self, sched: Any, begin: int) -> None:
        self.sched = sched
        self.timesteps = sched.timesteps[begin:]
        self.sigmas = sched.sigmas[begin:]
        sched.set_begin_index(begin)

    def scale_model_input(self, sample: "torch.Tensor", timestep: Any = None) -> "torch.Tensor":
        return sample  # a flow model sees the state itself

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor",
             return_dict: bool = True, **_: Any) -> StepOutput:
        index = self.sched.step_index if self.sched.step_index is not None else self.sched.begin_index
        sigma = float(self.sched.sigmas[index])
        out = self.sched.step(model_output, timestep, sample, return_dict=True)
        return StepOutput(out.prev_sample, sample - sigma * model_output)


def scheduler(config: Mapping[str, Any], schedule: str, steps: int, h: int, w: int) -> Any:
    """FlowMatchEulerDiscreteScheduler with ``set_timesteps`` done as FluxPipeline does it."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    clean = {k: v for k, v in config.items() if not k.startswith("kiln_") and k != "prediction_type"}
    flags = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
             **SCHEDULE_FLAGS[schedule]}
    sched = FlowMatchEulerDiscreteScheduler.from_config(clean, **flags)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu_for(config, h, w))
    return sched


def check_sampler(spec: "SamplerSpec", input_name: str = "sampler_name") -> None:
    """Refuse a sampler flow sampling does not have, naming ``input_name``."""
    if spec.name not in SAMPLERS:
        raise ConditioningError(f"sampler {spec.name!r} does not run flow-matching models (FLUX) yet; use "
                                f"{', '.join(SAMPLERS)}", input_name)


def check_schedule(schedule: str) -> None:
    """Refuse a schedule flow sampling does not have, naming ``scheduler``."""
    if schedule not in SCHEDULE_FLAGS:
        raise ConditioningError(f"scheduler {schedule!r} has no flow-matching form; use one of "
                                f"{', '.join(SCHEDULE_FLAGS)}", "scheduler")


def check(spec: "SamplerSpec", schedule: str) -> None:
    """Refuse samplers and schedules flow sampling does not have, naming the input."""
    check_sampler(spec)
    check_schedule(schedule)


def follow(spec: "SamplerSpec", config: Mapping[str, Any], sigmas: "torch.Tensor") -> FlowStepper:
    """The flow Euler stepper over exactly ``sigmas`` (a SIGMAS list, last value included),
    for the custom-sampling nodes: diffusers' scheduler with the shift already in the list
    (shift 1, no dynamic shifting), its terminal value set to the list's last one so a
    split list stops where it says."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_sampler(spec, "sampler")
    clean = {k: v for k, v in config.items() if not k.startswith("kiln_") and k != "prediction_type"}
    sched = FlowMatchEulerDiscreteScheduler.from_config(
        clean, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False)
    values = sigmas.detach().to("cpu", dtype=torch.float32).numpy()
    sched.set_timesteps(sigmas=np.asarray(values[:-1], dtype=np.float32))
    sched.sigmas[-1] = float(values[-1])
    return FlowStepper(sched, 0)


def strength_start(steps: int, strength: float) -> int:
    """FluxImg2ImgPipeline's first step index for ``strength`` (``steps`` when nothing runs)."""
    return int(max(steps - min(steps * strength, steps), 0))


def plan(spec: "SamplerSpec", schedule: str, config: Mapping[str, Any], steps: int, *, x0: "torch.Tensor",
         noise: "torch.Tensor", strength: float | None, denoise: float) -> "Plan":
    """The flow counterpart of :func:`nodes.samplers.plan.plan` (same three modes)."""
    import torch

    from nodes.samplers.plan import MODE_COMFY, MODE_IMG2IMG, MODE_TXT2IMG, Plan

    check(spec, schedule)
    h, w = x0.shape[2], x0.shape[3]
    if strength is not None:
        mode, total, begin = MODE_IMG2IMG, steps, strength_start(steps, strength)
    elif denoise < 0.9999:
        if denoise <= 0.0:
            return Plan(MODE_COMFY, None, torch.zeros(0), None)
        total = int(steps / denoise)
        mode, begin = MODE_COMFY, total - steps
    else:
        mode, total, begin = MODE_TXT2IMG, steps, 0
    if begin >= total:
        return Plan(mode, None, torch.zeros(0), None)
    sched = scheduler(config, schedule, total, h, w)
    stepper = FlowStepper(sched, begin)
    t = float(stepper.sigmas[0])
    start = sched.scale_noise(x0, stepper.timesteps[:1].repeat(x0.shape[0]), noise)
    if not math.isfinite(t):  # pragma: no cover - a broken config
        raise ConditioningError("the flow schedule has no finite start", "model")
    return Plan(mode, stepper, stepper.timesteps, start, stepper.sigmas)
