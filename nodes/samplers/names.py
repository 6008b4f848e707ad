"""The sampler and schedule tables: every name a workflow may use, and what runs it.

Stability's API names its samplers ``k_euler``, ``k_dpmpp_2m``, ...; ComfyUI names
the same methods ``euler``, ``dpmpp_2m``, .... Both spellings resolve to one
:class:`SamplerSpec`, so a workflow written for either runs unchanged. The
editor lists ComfyUI's spellings (that is what ComfyUI workflows store); the
``k_`` aliases are accepted wherever a sampler name is.

Each sampler is backed by a diffusers scheduler class where diffusers has one
(the math then is diffusers' own, which is what makes Kiln's output equal to
diffusers' pipelines). Two samplers are defined over sigmas inside Kiln:
``dpmpp_2s_ancestral`` (diffusers has no ancestral single-step DPM-Solver++), and
``ddim``/``plms`` whenever the schedule is not one their timestep-based schedulers
can follow (see ``sigma_fallback``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # ComfyUI's spelling, the canonical one
    stability_name: str
    #: diffusers scheduler class name, or "" for a sampler Kiln implements over sigmas.
    diffusers_class: str
    #: Config overrides the class needs to be this sampler (e.g. DPM-Solver++ order 2).
    config: dict[str, Any] = field(default_factory=dict)
    #: Draws fresh noise during sampling (ancestral / SDE): the result depends on the seed.
    stochastic: bool = False
    #: Timestep-based schedulers (DDIM, PNDM) step by a fixed timestep stride and cannot
    #: follow an arbitrary sigma list. On such a schedule they run this sigma-space
    #: sampler instead: DDIM with eta=0 *is* the Euler method in sigma space (ComfyUI
    #: defines its ``ddim`` the same way), and k-LMS is PLMS's sigma-space counterpart.
    sigma_fallback: str = ""
    #: ComfyUI computes steps+1 sigmas for these and drops the penultimate one
    #: (its KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS); Kiln does the same in its
    #: ComfyUI (``denoise``) mode so a ComfyUI workflow gets ComfyUI's grid.
    discard_penultimate_sigma: bool = False


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", "k_euler", "EulerDiscreteScheduler"),
    SamplerSpec("euler_ancestral", "k_euler_ancestral", "EulerAncestralDiscreteScheduler", stochastic=True),
    SamplerSpec("heun", "k_heun", "HeunDiscreteScheduler"),
    SamplerSpec("dpm_2", "k_dpm_2", "KDPM2DiscreteScheduler", discard_penultimate_sigma=True),
    SamplerSpec("dpm_2_ancestral", "k_dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", stochastic=True,
                discard_penultimate_sigma=True),
    SamplerSpec("lms", "k_lms", "LMSDiscreteScheduler"),
    SamplerSpec("dpmpp_2s_ancestral", "k_dpmpp_2s_ancestral", "", stochastic=True),
    SamplerSpec("dpmpp_sde", "k_dpmpp_sde", "DPMSolverSDEScheduler", stochastic=True),
    SamplerSpec("dpmpp_2m", "k_dpmpp_2m", "DPMSolverMultistepScheduler",
                config={"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}),
    SamplerSpec("ddim", "ddim", "DDIMScheduler", sigma_fallback="euler"),
    SamplerSpec("plms", "plms", "PNDMScheduler", config={"skip_prk_steps": True}, sigma_fallback="lms"),
)

#: Order follows ComfyUI's schedule list for the ones Kiln has.
SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "simple", "sgm_uniform")

_BY_NAME: dict[str, SamplerSpec] = {}
for _spec in SAMPLERS:
    _BY_NAME[_spec.name] = _spec
    _BY_NAME[_spec.stability_name] = _spec


def sampler_choices() -> list[str]:
    """Every accepted sampler name: ComfyUI's spellings first, then Stability's ``k_`` ones."""
    names = [s.name for s in SAMPLERS]
    return names + [s.stability_name for s in SAMPLERS if s.stability_name not in names]


def resolve_sampler(name: str) -> SamplerSpec:
    """The spec for a sampler name in either spelling; ``KeyError`` names the choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown sampler '{name}'; choose one of {', '.join(sampler_choices())}") from None


def resolve_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise KeyError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return name
