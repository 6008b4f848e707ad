"""The sampler and schedule tables: every name a workflow may use, and what runs it.

Stability's API names its samplers ``k_euler``, ``k_dpmpp_2m``, ...; ComfyUI names
the same methods ``euler``, ``dpmpp_2m``, .... Both spellings resolve to one
:class:`SamplerSpec`, so a workflow written for either runs unchanged. The
editor lists ComfyUI's spellings (that is what ComfyUI workflows store); the
``k_`` aliases are accepted wherever a sampler name is.

Each sampler is backed by a diffusers scheduler class where diffusers has one
(the math then is diffusers' own, which is what makes Kiln's output equal to
diffusers' pipelines). Where diffusers has none, or has it wrong (``dpmpp_3m_sde``), Kiln
runs ComfyUI's published algorithm (its ``comfy/k_diffusion/sampling.py``) as a
sigma-space stepper of its own (``kiln_stepper``): ``kdiffusion.py`` (``ipndm``,
``res_multistep``, ``dpm_fast``, ``lcm``, the Euler ancestral and CFG++ Euler forms, ...),
``adaptive.py`` (``dpm_adaptive``), ``steppers.py`` (``dpmpp_2s_ancestral``),
``multistep.py`` (the other deterministic ones), ``sde.py`` (the DPM-Solver++ SDE family)
and ``stochastic.py`` (``er_sde``, ``seeds_*``, ``sa_solver*``, the ancestral RES and the
stochastic CFG++ forms). The Kiln steppers also run what ComfyUI's Sampler* nodes set
(eta, s_noise, orders: ``SamplerSpec.options``). Timestep-based schedulers (DDIM, PNDM,
DDPM, LCM) cannot follow an arbitrary sigma list; on such a schedule they run a
sigma-space counterpart (``sigma_fallback``): ComfyUI's own definitions of ``ddim``,
``ddpm`` and ``lcm`` are sigma-space ones.

The ``_cfg_pp`` samplers step with the unguided prediction as well, which the loop hands
them (``Denoiser.last_uncond``) when their ``step`` takes ``uncond``.

``dpm_adaptive`` chooses its own number of model evaluations: its stepper's timestep list
grows as it goes (adaptive.DPMAdaptive).

Flow models (FLUX) run the subset ``nodes.samplers.flow.SAMPLERS`` names.
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
    #: A Kiln sigma-space stepper (steppers.kiln_stepper_class) that runs this sampler when
    #: there is no diffusers class, on sigma lists the class cannot follow, on flow models, and
    #: with the settings of ComfyUI's Sampler* nodes (``options``; steppers.runs_kiln_stepper).
    kiln_stepper: str = ""
    #: ComfyUI computes steps+1 sigmas for these and drops the penultimate one
    #: (its KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS); Kiln does the same in its
    #: ComfyUI (``denoise``) mode so a ComfyUI workflow gets ComfyUI's grid.
    discard_penultimate_sigma: bool = False
    #: Settings a ComfyUI Sampler* node changed from the name's defaults, as (name, value)
    #: pairs set on the Kiln stepper (``steppers.with_settings``); empty for a plain name.
    options: tuple[tuple[str, Any], ...] = ()


_SDE_2M = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
           "final_sigmas_type": "zero"}
_SDE_2M_HEUN = {**_SDE_2M, "solver_type": "heun"}

#: ComfyUI's order (comfy/samplers.py SAMPLER_NAMES) for the ones Kiln has; plms last.
#: The ``_gpu`` variants differ in ComfyUI only in the device of the Brownian tree
#: their noise comes from; in Kiln a ``_gpu`` name runs the same sampler as the plain
#: one (dpmpp_2m_sde/3m_sde draw from each image's CPU generator, so their results do
#: not depend on the device; dpmpp_sde's tree lives on the latent's device, plan.py).
SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", "k_euler", "EulerDiscreteScheduler"),
    SamplerSpec("euler_cfg_pp", "euler_cfg_pp", "", kiln_stepper="euler_cfg_pp"),
    SamplerSpec("euler_ancestral", "k_euler_ancestral", "EulerAncestralDiscreteScheduler", stochastic=True,
                kiln_stepper="euler_ancestral"),
    SamplerSpec("euler_ancestral_cfg_pp", "euler_ancestral_cfg_pp", "", stochastic=True,
                kiln_stepper="euler_ancestral_cfg_pp"),
    SamplerSpec("heun", "k_heun", "HeunDiscreteScheduler"),
    SamplerSpec("heunpp2", "heunpp2", "", kiln_stepper="heunpp2"),
    SamplerSpec("exp_heun_2_x0", "exp_heun_2_x0", "", kiln_stepper="exp_heun_2_x0"),
    SamplerSpec("exp_heun_2_x0_sde", "exp_heun_2_x0_sde", "", stochastic=True, kiln_stepper="exp_heun_2_x0_sde"),
    SamplerSpec("dpm_2", "k_dpm_2", "KDPM2DiscreteScheduler", discard_penultimate_sigma=True, kiln_stepper="dpm_2"),
    SamplerSpec("dpm_2_ancestral", "k_dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", stochastic=True,
                discard_penultimate_sigma=True),
    SamplerSpec("lms", "k_lms", "LMSDiscreteScheduler", kiln_stepper="lms"),
    SamplerSpec("dpm_fast", "dpm_fast", "", kiln_stepper="dpm_fast"),
    SamplerSpec("dpm_adaptive", "dpm_adaptive", "", kiln_stepper="dpm_adaptive"),
    SamplerSpec("dpmpp_2s_ancestral", "k_dpmpp_2s_ancestral", "", stochastic=True, kiln_stepper="dpmpp_2s_ancestral"),
    SamplerSpec("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "", stochastic=True,
                kiln_stepper="dpmpp_2s_ancestral_cfg_pp"),
    SamplerSpec("dpmpp_sde", "k_dpmpp_sde", "DPMSolverSDEScheduler", stochastic=True, kiln_stepper="dpmpp_sde"),
    SamplerSpec("dpmpp_sde_gpu", "dpmpp_sde_gpu", "DPMSolverSDEScheduler", stochastic=True,
                kiln_stepper="dpmpp_sde"),
    SamplerSpec("dpmpp_2m", "k_dpmpp_2m", "DPMSolverMultistepScheduler",
                config={"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}),
    SamplerSpec("dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp", "", kiln_stepper="dpmpp_2m_cfg_pp"),
    SamplerSpec("dpmpp_2m_sde", "dpmpp_2m_sde", "DPMSolverMultistepScheduler", config=_SDE_2M, stochastic=True,
                kiln_stepper="dpmpp_2m_sde"),
    SamplerSpec("dpmpp_2m_sde_gpu", "dpmpp_2m_sde_gpu", "DPMSolverMultistepScheduler", config=_SDE_2M,
                stochastic=True, kiln_stepper="dpmpp_2m_sde"),
    SamplerSpec("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "DPMSolverMultistepScheduler", config=_SDE_2M_HEUN,
                stochastic=True, kiln_stepper="dpmpp_2m_sde_heun"),
    SamplerSpec("dpmpp_2m_sde_heun_gpu", "dpmpp_2m_sde_heun_gpu", "DPMSolverMultistepScheduler",
                config=_SDE_2M_HEUN, stochastic=True, kiln_stepper="dpmpp_2m_sde_heun"),
    # Not diffusers' DPM-Solver++(3M) SDE: its third-order term has the wrong sign (sde.DPMpp3MSDE says how).
    SamplerSpec("dpmpp_3m_sde", "dpmpp_3m_sde", "", stochastic=True, kiln_stepper="dpmpp_3m_sde"),
    SamplerSpec("dpmpp_3m_sde_gpu", "dpmpp_3m_sde_gpu", "", stochastic=True, kiln_stepper="dpmpp_3m_sde"),
    SamplerSpec("ddpm", "ddpm", "DDPMScheduler", stochastic=True, kiln_stepper="ddpm"),
    SamplerSpec("lcm", "lcm", "LCMScheduler", stochastic=True, kiln_stepper="lcm"),
    SamplerSpec("ipndm", "ipndm", "", kiln_stepper="ipndm"),
    SamplerSpec("ipndm_v", "ipndm_v", "", kiln_stepper="ipndm_v"),
    # ComfyUI's deis runs up to third order; diffusers' DEIS defaults to second.
    SamplerSpec("deis", "deis", "DEISMultistepScheduler", config={"solver_order": 3}, kiln_stepper="deis"),
    SamplerSpec("res_multistep", "res_multistep", "", kiln_stepper="res_multistep"),
    SamplerSpec("res_multistep_cfg_pp", "res_multistep_cfg_pp", "", kiln_stepper="res_multistep_cfg_pp"),
    SamplerSpec("res_multistep_ancestral", "res_multistep_ancestral", "", stochastic=True,
                kiln_stepper="res_multistep_ancestral"),
    SamplerSpec("res_multistep_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp", "", stochastic=True,
                kiln_stepper="res_multistep_ancestral_cfg_pp"),
    SamplerSpec("gradient_estimation", "gradient_estimation", "", kiln_stepper="gradient_estimation"),
    SamplerSpec("gradient_estimation_cfg_pp", "gradient_estimation_cfg_pp", "",
                kiln_stepper="gradient_estimation_cfg_pp"),
    SamplerSpec("er_sde", "er_sde", "", stochastic=True, kiln_stepper="er_sde"),
    SamplerSpec("seeds_2", "seeds_2", "", stochastic=True, kiln_stepper="seeds_2"),
    SamplerSpec("seeds_3", "seeds_3", "", stochastic=True, kiln_stepper="seeds_3"),
    SamplerSpec("sa_solver", "sa_solver", "", stochastic=True, kiln_stepper="sa_solver"),
    SamplerSpec("sa_solver_pece", "sa_solver_pece", "", stochastic=True, kiln_stepper="sa_solver_pece"),
    SamplerSpec("ddim", "ddim", "DDIMScheduler", sigma_fallback="euler"),
    # ComfyUI runs UniPC at order 3 (lower orders for the final steps), B(h) = h ("bh1") or e^h - 1 ("bh2").
    # diffusers' bh1 step onto sigma 0 divides by zero (NaN); ComfyUI stops its UniPC at
    # sigma 0.001 for the same reason, so bh1 here stops at the training sigma_min.
    SamplerSpec("uni_pc", "uni_pc", "UniPCMultistepScheduler",
                config={"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
                discard_penultimate_sigma=True),
    SamplerSpec("uni_pc_bh2", "uni_pc_bh2", "UniPCMultistepScheduler",
                config={"solver_type": "bh2", "solver_order": 3, "final_sigmas_type": "zero"},
                discard_penultimate_sigma=True),
    SamplerSpec("plms", "plms", "PNDMScheduler", config={"skip_prk_steps": True}, sigma_fallback="lms"),
)

#: ComfyUI's schedule list (comfy/samplers.py SCHEDULER_NAMES), in its order but with
#: Kiln's long-standing first entry kept first (it is the default).
SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "simple", "sgm_uniform", "ddim_uniform", "beta",
                               "linear_quadratic", "kl_optimal")

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
