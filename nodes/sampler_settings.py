"""ComfyUI's Sampler* nodes: a SAMPLER with its settings changed (eta, s_noise, orders, ...).

KSamplerSelect gives a sampler by name with the settings KSampler runs it with; these
nodes give one with settings of the user's, for SamplerCustom and SamplerCustomAdvanced.
Names, inputs, defaults and ranges are ComfyUI's. The defaults of each setting live on
Kiln's stepper class (``steppers.with_settings`` keeps only what differs), so at the
defaults the SAMPLER is KSamplerSelect's and runs diffusers' scheduler where it has one;
a changed setting runs Kiln's stepper for the name (``nodes.samplers.sde`` and the others).

``noise_device`` picks ComfyUI's ``_gpu`` name or the plain one; both draw the same
noise in Kiln (each image's CPU generator).
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node

CATEGORY = "sampling/samplers"  # beside KSamplerSelect (ComfyUI files them under sampling/custom_sampling/)
NOISE_DEVICES = ("gpu", "cpu")


def _amount(name: str, default: float = 1.0, high: float = 100.0, tip: str = "") -> Input:
    return Input(name, T.FLOAT, default=default, min=0.0, max=high, step=0.01, tooltip=tip)


def _sampler(name: str, **settings: Any):
    from nodes.samplers.names import resolve_sampler
    from nodes.samplers.steppers import with_settings

    return (with_settings(resolve_sampler(name), **settings),)


def _on_device(name: str, noise_device: str) -> str:
    if noise_device not in NOISE_DEVICES:
        raise NodeError(f"noise_device must be one of {', '.join(NOISE_DEVICES)}, got {noise_device!r}",
                        "noise_device")
    return name if noise_device == "cpu" else f"{name}_gpu"


@define_node("SamplerEulerAncestral", category=CATEGORY, inputs=[_amount("eta"), _amount("s_noise")],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_euler_ancestral(ctx, eta: float, s_noise: float):
    """Euler ancestral with its stochasticity (eta) and noise scale (s_noise) set."""
    return _sampler("euler_ancestral", eta=eta, s_noise=s_noise)


@define_node("SamplerEulerAncestralCFGPP", category=CATEGORY,
             inputs=[_amount("eta", high=1.0), _amount("s_noise", high=10.0)],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_euler_ancestral_cfg_pp(ctx, eta: float, s_noise: float):
    """CFG++ Euler ancestral with eta and s_noise set."""
    return _sampler("euler_ancestral_cfg_pp", eta=eta, s_noise=s_noise)


@define_node("SamplerDPMPP_2S_Ancestral", category=CATEGORY, inputs=[_amount("eta"), _amount("s_noise")],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_dpmpp_2s_ancestral(ctx, eta: float, s_noise: float):
    """DPM-Solver++(2S) ancestral with eta and s_noise set."""
    return _sampler("dpmpp_2s_ancestral", eta=eta, s_noise=s_noise)


@define_node("SamplerDPMPP_SDE", category=CATEGORY,
             inputs=[_amount("eta"), _amount("s_noise"), _amount("r", default=0.5),
                     Input("noise_device", T.COMBO, default="gpu", choices=list(NOISE_DEVICES))],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_dpmpp_sde(ctx, eta: float, s_noise: float, r: float, noise_device: str):
    """DPM-Solver++ SDE with eta, s_noise and its stage fraction r set."""
    if not float(r) > 0:
        raise NodeError(f"r is where in the step the second evaluation sits and must be above 0, got {r}", "r")
    return _sampler(_on_device("dpmpp_sde", noise_device), eta=eta, s_noise=s_noise, r=r)


@define_node("SamplerDPMPP_2M_SDE", category=CATEGORY,
             inputs=[Input("solver_type", T.COMBO, default="midpoint", choices=["midpoint", "heun"]),
                     _amount("eta"), _amount("s_noise"),
                     Input("noise_device", T.COMBO, default="gpu", choices=list(NOISE_DEVICES))],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_dpmpp_2m_sde(ctx, solver_type: str, eta: float, s_noise: float, noise_device: str):
    """DPM-Solver++(2M) SDE (midpoint or heun) with eta and s_noise set."""
    if solver_type not in ("midpoint", "heun"):
        raise NodeError(f"solver_type must be midpoint or heun, got {solver_type!r}", "solver_type")
    name = "dpmpp_2m_sde" if solver_type == "midpoint" else "dpmpp_2m_sde_heun"
    return _sampler(_on_device(name, noise_device), eta=eta, s_noise=s_noise)


@define_node("SamplerDPMPP_3M_SDE", category=CATEGORY,
             inputs=[_amount("eta"), _amount("s_noise"),
                     Input("noise_device", T.COMBO, default="gpu", choices=list(NOISE_DEVICES))],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_dpmpp_3m_sde(ctx, eta: float, s_noise: float, noise_device: str):
    """DPM-Solver++(3M) SDE with eta and s_noise set."""
    return _sampler(_on_device("dpmpp_3m_sde", noise_device), eta=eta, s_noise=s_noise)


@define_node("SamplerLMS", category=CATEGORY, inputs=[Input("order", T.INT, default=4, min=1, max=100)],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_lms(ctx, order: int):
    """Linear multistep (Adams-Bashforth on the probability-flow derivative) of the given order."""
    if int(order) < 1:
        raise NodeError(f"order must be at least 1, got {order}", "order")
    return _sampler("lms", max_order=int(order))


@define_node("SamplerDPMAdaptative", category=CATEGORY,
             inputs=[Input("order", T.INT, default=3, min=2, max=3), _amount("rtol", 0.05), _amount("atol", 0.0078),
                     _amount("h_init", 0.05), _amount("pcoeff", 0.0), _amount("icoeff", 1.0),
                     _amount("dcoeff", 0.0), _amount("accept_safety", 0.81), _amount("eta", 0.0),
                     _amount("s_noise")],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_dpm_adaptive(ctx, order: int, rtol: float, atol: float, h_init: float, pcoeff: float, icoeff: float,
                         dcoeff: float, accept_safety: float, eta: float, s_noise: float):
    """Adaptive DPM-Solver with its order, tolerances, step-size controller and noise set.
    (ComfyUI spells the node "Adaptative".)"""
    if int(order) not in (2, 3):
        raise NodeError(f"order must be 2 or 3, got {order}", "order")
    if not float(h_init) > 0:
        raise NodeError(f"h_init is the first step's size and must be above 0, got {h_init}", "h_init")
    return _sampler("dpm_adaptive", solver_order=int(order), rtol=rtol, atol=atol, h_init=h_init, pcoeff=pcoeff,
                    icoeff=icoeff, dcoeff=dcoeff, accept_safety=accept_safety, eta=eta, s_noise=s_noise)


ER_SDE_SOLVERS = ("ER-SDE", "Reverse-time SDE", "ODE")


@define_node("SamplerER_SDE", category=CATEGORY,
             inputs=[Input("solver_type", T.COMBO, default="ER-SDE", choices=list(ER_SDE_SOLVERS)),
                     Input("max_stage", T.INT, default=3, min=1, max=3),
                     _amount("eta", tip="stochastic strength of the reverse-time SDE (0: the ODE); "
                                        "the ER-SDE solver type does not use it"),
                     _amount("s_noise")],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_er_sde(ctx, solver_type: str, max_stage: int, eta: float, s_noise: float):
    """ER-SDE-Solver with its noise scaler (ER-SDE's, the reverse-time SDE's x^(eta + 1), or
    none: the ODE), its highest order and its noise scale set."""
    if solver_type not in ER_SDE_SOLVERS:
        raise NodeError(f"solver_type must be one of {', '.join(ER_SDE_SOLVERS)}, got {solver_type!r}",
                        "solver_type")
    if solver_type == "Reverse-time SDE" and float(eta) == 0:
        solver_type = "ODE"  # ComfyUI's rule: without stochasticity the reverse-time SDE is the ODE
    return _sampler("er_sde", solver_type=solver_type, max_stage=int(max_stage),
                    eta=eta if solver_type == "Reverse-time SDE" else 1.0, s_noise=s_noise)


@define_node("SamplerSASolver", category=CATEGORY,
             inputs=[Input("model", T.MODEL), _amount("eta", high=10.0),
                     Input("sde_start_percent", T.FLOAT, default=0.2, min=0.0, max=1.0, step=0.001),
                     Input("sde_end_percent", T.FLOAT, default=0.8, min=0.0, max=1.0, step=0.001),
                     _amount("s_noise"), Input("predictor_order", T.INT, default=3, min=1, max=6),
                     Input("corrector_order", T.INT, default=4, min=0, max=6),
                     Input("use_pece", T.BOOLEAN, default=False), Input("simple_order_2", T.BOOLEAN, default=False)],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_sa_solver(ctx, model, eta: float, sde_start_percent: float, sde_end_percent: float, s_noise: float,
                      predictor_order: int, corrector_order: int, use_pece: bool, simple_order_2: bool):
    """SA-Solver with its stochasticity tau (eta) over the part of the schedule between the
    two percentages, its noise scale, predictor and corrector orders, PECE mode and the
    simpler order-2 coefficients set. The percentages become sigmas of the model that samples."""
    from nodes.handles import ModelHandle

    if not isinstance(model, ModelHandle):
        raise NodeError(f"expected a MODEL, got {type(model).__name__}", "model")
    if not 1 <= int(predictor_order) <= 6:
        raise NodeError(f"predictor_order must be 1 to 6, got {predictor_order}", "predictor_order")
    if not 0 <= int(corrector_order) <= 6:
        raise NodeError(f"corrector_order must be 0 to 6, got {corrector_order}", "corrector_order")
    return _sampler("sa_solver_pece" if use_pece else "sa_solver", eta=eta, sde_start_percent=sde_start_percent,
                    sde_end_percent=sde_end_percent, s_noise=s_noise, predictor_order=int(predictor_order),
                    corrector_order=int(corrector_order), simple_order_2=bool(simple_order_2))


@define_node("SamplerEulerCFGpp", category=CATEGORY, display_name="SamplerEulerCFG++",
             inputs=[Input("version", T.COMBO, default="regular", choices=["regular", "alternative"])],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_euler_cfg_pp(ctx, version: str):
    """CFG++ Euler: "regular" is KSampler's ``euler_cfg_pp``, "alternative" ComfyUI's other
    formulation (the guidance difference added to the step's direction)."""
    if version not in ("regular", "alternative"):
        raise NodeError(f"version must be regular or alternative, got {version!r}", "version")
    return _sampler("euler_cfg_pp", version=version)


LCM_UPSCALE_METHODS = ("bislerp", "nearest-exact", "bilinear", "area", "bicubic")


@define_node("SamplerLCMUpscale", category=CATEGORY,
             inputs=[Input("scale_ratio", T.FLOAT, default=1.0, min=0.1, max=20.0, step=0.01),
                     Input("scale_steps", T.INT, default=-1, min=-1, max=1000),
                     Input("upscale_method", T.COMBO, default="bislerp", choices=list(LCM_UPSCALE_METHODS))],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def sampler_lcm_upscale(ctx, scale_ratio: float, scale_steps: int, upscale_method: str):
    """LCM that grows the latent as it samples: after each of the first ``scale_steps`` steps (-1:
    about half) the prediction is resized, evenly up to ``scale_ratio`` times the start, then
    re-noised. The result is larger than the latent given (a noise mask cannot follow: refused)."""
    if upscale_method not in LCM_UPSCALE_METHODS:
        raise NodeError(f"upscale_method must be one of {', '.join(LCM_UPSCALE_METHODS)}, got {upscale_method!r}",
                        "upscale_method")
    if not float(scale_ratio) > 0:
        raise NodeError(f"scale_ratio must be above 0, got {scale_ratio}", "scale_ratio")
    return _sampler("lcm", total_upscale=float(scale_ratio), upscale_steps=int(scale_steps),
                    upscale_method=upscale_method)
