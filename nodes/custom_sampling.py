"""ComfyUI's custom-sampling nodes and KSamplerAdvanced, with ComfyUI's names, inputs and outputs.

The pieces of KSampler as separate nodes: a noise source (RandomNoise, DisableNoise),
a sampler (KSamplerSelect), a sigma list (BasicScheduler, KarrasScheduler, and
SplitSigmas / SplitSigmasDenoise / FlipSigmas to cut or turn it), a guider
(BasicGuider, CFGGuider, DualCFGGuider), and SamplerCustomAdvanced / SamplerCustom to run them.
FLUX workflows are built from these; they work for every family because the
sigmas, the starting noise and the stepper come from the model's sampling object
(``nodes.samplers.model_sampling``), never from a schedule written here.

With the same settings a custom-sampling graph gives KSampler's result:
BasicScheduler's sigmas are KSampler's (diffusers' grid at denoise 1, ComfyUI's
``steps / denoise`` tail below), noise is drawn as KSampler draws it. The running
itself is ``nodes.samplers.custom``.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.custom_schedulers import check_range, range_inputs
from nodes.latent import MAX_SEED
from nodes.samplers.names import SCHEDULERS, resolve_sampler, resolve_scheduler, sampler_choices

ENABLE = ("enable", "disable")


def _spec(name: str, input_name: str = "sampler_name"):
    try:
        return resolve_sampler(name)
    except KeyError as exc:
        raise NodeError(str(exc.args[0]), input_name) from None


def _scheduler(name: str) -> str:
    try:
        return resolve_scheduler(name)
    except KeyError as exc:
        raise NodeError(str(exc.args[0]), "scheduler") from None


def _sigmas(sigmas, input_name: str = "sigmas"):
    from nodes.samplers.custom import check_sigmas

    return check_sigmas(sigmas, input_name)


# -- noise ----------------------------------------------------------------------------------

@define_node("RandomNoise", category="sampling/noise",
             inputs=[Input("noise_seed", T.INT, default=0, min=0, max=MAX_SEED, control_after_generate=True)],
             outputs=[Output("NOISE", T.NOISE)])
def random_noise(ctx, noise_seed: int):
    """Seeded Gaussian noise: image i of a batch draws from seed + i, as KSampler does."""
    from nodes.samplers.custom import Noise

    return (Noise(int(noise_seed)),)


@define_node("VariationNoise", category="sampling/noise",
             inputs=[Input("noise_seed", T.INT, default=0, min=0, max=MAX_SEED, control_after_generate=True),
                     Input("variation_seed", T.INT, default=1, min=0, max=MAX_SEED, control_after_generate=True),
                     Input("variation_strength", T.FLOAT, default=0.1, min=0.0, max=1.0, step=0.01,
                           tooltip="0: noise_seed's image; 1: variation_seed's; between: variations of it")],
             outputs=[Output("NOISE", T.NOISE)])
def variation_noise(ctx, noise_seed: int, variation_seed: int, variation_strength: float):
    """Kiln's variation seeds (A1111's "variation seed" and "variation strength"): seeded noise
    turned a little towards another seed's, for close variations of one image. The
    sampler's own later noise (ancestral and SDE steps) still comes from noise_seed."""
    from nodes.samplers.custom import Noise

    strength = float(variation_strength)
    if not 0.0 <= strength <= 1.0:
        raise NodeError(f"variation_strength must be between 0 and 1, got {variation_strength}", "variation_strength")
    return (Noise(int(noise_seed), variation_seed=int(variation_seed), variation_strength=strength),)


@define_node("DisableNoise", category="sampling/noise", outputs=[Output("NOISE", T.NOISE)])
def disable_noise(ctx):
    """No starting noise: sampling starts from the latent as it is (e.g. a latent that
    already holds noise, or the second half of a split run)."""
    from nodes.samplers.custom import Noise

    return (Noise(0, enabled=False),)


# -- sampler and sigmas ---------------------------------------------------------------------

@define_node("KSamplerSelect", category="sampling/samplers",
             inputs=[Input("sampler_name", T.COMBO, default="euler", choices=sampler_choices())],
             outputs=[Output("SAMPLER", T.SAMPLER)])
def ksampler_select(ctx, sampler_name: str):
    """A sampler by name, as KSampler's sampler_name lists them."""
    return (_spec(sampler_name),)


@define_node("BasicScheduler", category="sampling/schedulers",
             inputs=[Input("model", T.MODEL),
                     Input("scheduler", T.COMBO, default="normal", choices=list(SCHEDULERS)),
                     Input("steps", T.INT, default=20, min=1, max=10000),
                     Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def basic_scheduler(ctx, model, scheduler: str, steps: int, denoise: float):
    """The model's sigmas for ``steps`` steps: the ones KSampler would run with the same
    scheduler, steps and denoise (denoise < 1: always ``steps`` steps, on the quiet end
    of a ``steps / denoise`` schedule; denoise 0: an empty list)."""
    name = _scheduler(scheduler)
    if int(steps) < 1:
        raise NodeError(f"steps must be at least 1, got {steps}", "steps")
    return (_model_sigmas(model, name, int(steps), float(denoise)),)


def _model_sigmas(model, scheduler: str, steps: int, denoise: float):
    """The model's sigmas; a schedule its sampling lacks (flow) is an error naming ``scheduler``."""
    from nodes.families.base import ConditioningError
    from nodes.samplers.model_sampling import for_model

    try:
        return for_model(model).sigmas(scheduler, steps, denoise).cpu()
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None


@define_node("KarrasScheduler", category="sampling/schedulers",
             inputs=[*range_inputs(), Input("rho", T.FLOAT, default=7.0, min=0.0, max=100.0, step=0.01)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def karras_scheduler(ctx, steps: int, sigma_max: float, sigma_min: float, rho: float):
    """Karras et al.'s schedule between sigma_max and sigma_min (rho 7 as in the paper), then 0."""
    from nodes.samplers.schedules import karras

    if float(rho) <= 0:
        raise NodeError(f"rho must be above 0, got {rho}", "rho")
    check_range(float(sigma_max), float(sigma_min))
    return (karras(int(steps), float(sigma_min), float(sigma_max), float(rho)),)


@define_node("SplitSigmas", category="sampling/sigmas",
             inputs=[Input("sigmas", T.SIGMAS), Input("step", T.INT, default=0, min=0, max=10000)],
             outputs=[Output("high_sigmas", T.SIGMAS), Output("low_sigmas", T.SIGMAS)])
def split_sigmas(ctx, sigmas, step: int):
    """Cut the list at ``step``: high_sigmas are the first step + 1 values, low_sigmas the rest
    from that value on (both halves share it, so sampling one after the other is one run)."""
    sigmas = _sigmas(sigmas)
    step = int(step)
    if step >= len(sigmas):
        raise NodeError(f"step {step} is beyond the sigma list ({len(sigmas)} values, steps 0..{len(sigmas) - 1})",
                        "step")
    return (sigmas[:step + 1].clone(), sigmas[step:].clone())


@define_node("SplitSigmasDenoise", category="sampling/sigmas",
             inputs=[Input("sigmas", T.SIGMAS), Input("denoise", T.FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
             outputs=[Output("high_sigmas", T.SIGMAS), Output("low_sigmas", T.SIGMAS)])
def split_sigmas_denoise(ctx, sigmas, denoise: float):
    """Cut the list so low_sigmas holds the last round(steps * denoise) steps and high_sigmas
    the ones before (sharing the value where they meet). At denoise 0 high_sigmas is the
    whole list and low_sigmas its last value (ComfyUI's slicing gives an empty high half there)."""
    sigmas = _sigmas(sigmas)
    if not 0.0 <= float(denoise) <= 1.0:
        raise NodeError(f"denoise must be within 0..1, got {denoise}", "denoise")
    if len(sigmas) == 0:
        return (sigmas, sigmas)
    steps = len(sigmas) - 1
    low = round(steps * float(denoise))
    return (sigmas[:len(sigmas) - low].clone(), sigmas[steps - low:].clone())


@define_node("FlipSigmas", category="sampling/sigmas", inputs=[Input("sigmas", T.SIGMAS)],
             outputs=[Output("SIGMAS", T.SIGMAS)])
def flip_sigmas(ctx, sigmas):
    """The list reversed (for unsampling an image back to noise); a leading 0 becomes 0.0001,
    since sampling cannot start from sigma 0."""
    sigmas = _sigmas(sigmas)
    if len(sigmas) == 0:
        return (sigmas,)
    flipped = sigmas.flip(0).clone()
    if float(flipped[0]) == 0.0:
        flipped[0] = 0.0001
    return (flipped,)


# -- guiders ---------------------------------------------------------------------------------

@define_node("BasicGuider", category="sampling/guiders", display_name="Basic Guider",
             inputs=[Input("model", T.MODEL), Input("conditioning", T.CONDITIONING)],
             outputs=[Output("GUIDER", T.GUIDER)])
def basic_guider(ctx, model, conditioning):
    """The model led by one conditioning, without classifier-free guidance (as FLUX [dev] runs)."""
    from nodes.samplers.custom import Guider

    return (Guider(model, conditioning, None, 1.0),)


@define_node("CFGGuider", category="sampling/guiders", display_name="CFG Guider",
             inputs=[Input("model", T.MODEL), Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
                     Input("cfg", T.FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)],
             outputs=[Output("GUIDER", T.GUIDER)])
def cfg_guider(ctx, model, positive, negative, cfg: float):
    """Classifier-free guidance: uncond + cfg * (cond - uncond), as KSampler guides."""
    from nodes.samplers.custom import Guider

    return (Guider(model, positive, negative, float(cfg)),)


@define_node("DualCFGGuider", category="sampling/guiders",
             inputs=[Input("model", T.MODEL), Input("cond1", T.CONDITIONING), Input("cond2", T.CONDITIONING),
                     Input("negative", T.CONDITIONING),
                     Input("cfg_conds", T.FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("cfg_cond2_negative", T.FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("style", T.COMBO, default="regular", choices=["regular", "nested"])],
             outputs=[Output("GUIDER", T.GUIDER)])
def dual_cfg_guider(ctx, model, cond1, cond2, negative, cfg_conds: float, cfg_cond2_negative: float, style: str):
    """Guidance with two prompts: cfg_cond2_negative from the negative to cond2 and cfg_conds from
    cond2 to cond1, either added (regular) or one inside the other (nested); formulas in
    nodes.families.dual_cfg. cond2 counts as a negative-type prompt, as in ComfyUI."""
    from nodes.families import conditioning as cond_rules
    from nodes.families.base import ConditioningError
    from nodes.families.dual_cfg import STYLES, DualCFG
    from nodes.samplers.custom import Guider

    for name, cond in (("cond1", cond1), ("cond2", cond2), ("negative", negative)):
        try:
            cond_rules.entries(cond, name)
        except ConditioningError as exc:
            raise NodeError(str(exc), exc.input_name) from None
    if style not in STYLES:
        raise NodeError(f"style must be one of {', '.join(STYLES)}, got {style!r}", "style")
    middle = [[item[0], {**(item[1] or {}), "prompt_type": "negative"}] for item in cond2]
    dual = DualCFG(middle, float(cfg_cond2_negative), nested=style == "nested")
    return (Guider(model, cond1, negative, float(cfg_conds), dual=dual),)


# -- running ---------------------------------------------------------------------------------

def _guider(value):
    from nodes.samplers.custom import Guider

    if not isinstance(value, Guider):
        raise NodeError(f"expected a GUIDER, got {type(value).__name__}", "guider")
    return value


def _sampler(value, input_name: str = "sampler"):
    from nodes.samplers.names import SamplerSpec

    if not isinstance(value, SamplerSpec):
        raise NodeError(f"expected a SAMPLER (from KSamplerSelect), got {type(value).__name__}", input_name)
    return value


@define_node("SamplerCustomAdvanced", category="sampling/custom_sampling",
             inputs=[Input("noise", T.NOISE), Input("guider", T.GUIDER), Input("sampler", T.SAMPLER),
                     Input("sigmas", T.SIGMAS), Input("latent_image", T.LATENT)],
             outputs=[Output("output", T.LATENT), Output("denoised_output", T.LATENT)])
def sampler_custom_advanced(ctx, noise, guider, sampler, sigmas, latent_image):
    """Sample the latent over the sigmas with the guider's model and conditioning.
    ``output`` is where sampling stopped; ``denoised_output`` the model's clean prediction there."""
    from nodes.samplers.custom import Noise, sample

    if not isinstance(noise, Noise):
        raise NodeError(f"expected NOISE (RandomNoise or DisableNoise), got {type(noise).__name__}", "noise")
    return sample(ctx, _guider(guider), _sampler(sampler), sigmas, latent_image, noise, model_input="guider")


@define_node("SamplerCustom", category="sampling/custom_sampling",
             inputs=[Input("model", T.MODEL), Input("add_noise", T.BOOLEAN, default=True),
                     Input("noise_seed", T.INT, default=0, min=0, max=MAX_SEED, control_after_generate=True),
                     Input("cfg", T.FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
                     Input("sampler", T.SAMPLER), Input("sigmas", T.SIGMAS), Input("latent_image", T.LATENT)],
             outputs=[Output("output", T.LATENT), Output("denoised_output", T.LATENT)])
def sampler_custom(ctx, model, add_noise: bool, noise_seed: int, cfg: float, positive, negative, sampler, sigmas,
                   latent_image):
    """SamplerCustomAdvanced with its noise and CFG guider given as plain inputs."""
    from nodes.samplers.custom import Guider, Noise, sample

    return sample(ctx, Guider(model, positive, negative, float(cfg)), _sampler(sampler), sigmas, latent_image,
                  Noise(int(noise_seed), enabled=bool(add_noise)))


@define_node("KSamplerAdvanced", category="sampling",
             inputs=[Input("model", T.MODEL), Input("add_noise", T.COMBO, default="enable", choices=list(ENABLE)),
                     Input("noise_seed", T.INT, default=0, min=0, max=MAX_SEED, control_after_generate=True),
                     Input("steps", T.INT, default=20, min=1, max=10000),
                     Input("cfg", T.FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                     Input("sampler_name", T.COMBO, default="euler", choices=sampler_choices()),
                     Input("scheduler", T.COMBO, default="normal", choices=list(SCHEDULERS)),
                     Input("positive", T.CONDITIONING), Input("negative", T.CONDITIONING),
                     Input("latent_image", T.LATENT),
                     Input("start_at_step", T.INT, default=0, min=0, max=10000),
                     Input("end_at_step", T.INT, default=10000, min=0, max=10000),
                     Input("return_with_leftover_noise", T.COMBO, default="disable", choices=list(ENABLE))],
             outputs=[Output("LATENT", T.LATENT)])
def ksampler_advanced(ctx, model, add_noise: str, noise_seed: int, steps: int, cfg: float, sampler_name: str,
                      scheduler: str, positive, negative, latent_image, start_at_step: int, end_at_step: int,
                      return_with_leftover_noise: str):
    """KSampler over steps start_at_step..end_at_step of its ``steps``-step schedule, for
    two-stage and base + refiner runs: the first stage returns with its leftover noise,
    the second continues with add_noise disabled. Stopping early without leftover noise
    ends on sigma 0 (the image is finished there), as ComfyUI does."""
    from nodes.samplers.custom import Guider, Noise, check_latent, sample

    spec = _spec(sampler_name)
    name = _scheduler(scheduler)
    if add_noise not in ENABLE:
        raise NodeError(f"add_noise must be one of {', '.join(ENABLE)}, got {add_noise!r}", "add_noise")
    if return_with_leftover_noise not in ENABLE:
        raise NodeError(f"return_with_leftover_noise must be one of {', '.join(ENABLE)}", "return_with_leftover_noise")
    if int(steps) < 1:
        raise NodeError(f"steps must be at least 1, got {steps}", "steps")
    check_latent(latent_image)
    start, end = int(start_at_step), int(end_at_step)
    if start < 0 or end < 0:
        raise NodeError("start_at_step and end_at_step must not be negative", "start_at_step" if start < 0 else "end_at_step")
    sigmas = _model_sigmas(model, name, int(steps), 1.0)
    if end < len(sigmas) - 1:
        sigmas = sigmas[:end + 1].clone()
        if return_with_leftover_noise != "enable":
            sigmas[-1] = 0.0
    if start >= len(sigmas) - 1:
        ctx.message(f"start_at_step {start} is at or after the last step run ({len(sigmas) - 1}): "
                    "the latent is returned unchanged")
        return ({k: v for k, v in latent_image.items()},)
    out, _ = sample(ctx, Guider(model, positive, negative, float(cfg)), spec, sigmas[start:], latent_image,
                    Noise(int(noise_seed), enabled=add_noise == "enable"), sampler_input="sampler_name")
    return (out,)


# -- model sampling ---------------------------------------------------------------------------

#: ComfyUI's ModelSamplingDiscrete choices -> diffusers' prediction_type.
PREDICTIONS = {"eps": "epsilon", "v_prediction": "v_prediction", "lcm": "", "x0": "sample"}


@define_node("ModelSamplingDiscrete", category="advanced/model",
             inputs=[Input("model", T.MODEL),
                     Input("sampling", T.COMBO, default="eps", choices=list(PREDICTIONS)),
                     Input("zsnr", T.BOOLEAN, default=False)],
             outputs=[Output("MODEL", T.MODEL)])
def model_sampling_discrete(ctx, model, sampling: str, zsnr: bool):
    """Tell Kiln what a discrete-time model predicts (eps, v_prediction, x0) when its file does
    not say, and whether its schedule was rescaled to zero terminal SNR (zsnr: the last
    training step is pure noise, sigma_max about 4096 as diffusers sets it; ComfyUI's is
    about 4500). Returns a new MODEL; the loaded one keeps its own setting."""
    import dataclasses

    if sampling not in PREDICTIONS:
        raise NodeError(f"must be one of {', '.join(PREDICTIONS)}, got {sampling!r}", "sampling")
    if sampling == "lcm":
        raise NodeError("'lcm' (ComfyUI's 50-step distilled schedule) is not supported yet; for an LCM model "
                        "use sampling 'eps' with the lcm sampler", "sampling")
    from nodes.samplers.edm import is_edm

    base = model.scheduler_config
    if is_edm(base):  # ComfyUI's node replaces the sampling whole: back to the family's DDPM schedule
        base = model.family.scheduler_config()
    if "num_train_timesteps" not in base:
        raise NodeError("this model is not a discrete-time (DDPM-trained) one", "model")
    config = dict(base, prediction_type=PREDICTIONS[sampling], rescale_betas_zero_snr=bool(zsnr))
    return (dataclasses.replace(model, scheduler_config=config),)


#: ComfyUI's ModelSamplingContinuousEDM choices -> (prediction type, sigma_data) in Kiln's EDM sampling
#: (nodes.samplers.edm). cosmos_rflow is ComfyUI's ModelSamplingCosmosRFlow (edm.py's ``rflow`` rule, whose
#: network time is sigma / (sigma + 1) whatever the node's time rule).
EDM_SAMPLINGS = {"v_prediction": ("v_prediction", 1.0), "edm": ("edm", 0.5), "edm_playground_v2.5": ("edm", 0.5),
                 "eps": ("epsilon", 1.0), "cosmos_rflow": ("rflow", 1.0)}
_SIGMA_RANGE = dict(min=0.0, max=1000.0, step=0.001, round=False)


def _continuous(model, sampling: str, sigma_max: float, sigma_min: float, time: str, choices) -> tuple:
    """A new MODEL sampled in continuous time with ``sampling``'s preconditioning (see edm.py)."""
    import dataclasses

    from nodes.samplers import edm, flow

    if sampling not in choices:
        raise NodeError(f"must be one of {', '.join(choices)}, got {sampling!r}", "sampling")
    if flow.is_flow(model.scheduler_config):
        raise NodeError("this is a flow-matching model (FLUX): it has no EDM sampling", "model")
    low, high = float(sigma_min), float(sigma_max)
    if not low > 0.0:
        raise NodeError(f"sigma_min must be above 0 (the network's time is a function of log sigma), got {low}",
                        "sigma_min")
    if not high > low:
        raise NodeError(f"sigma_max must be above sigma_min ({low}), got {high}", "sigma_max")
    prediction, sigma_data = choices[sampling]
    config = edm.edm_config(prediction, low, high, sigma_data, "rflow" if prediction == "rflow" else time)
    changes: dict = {"scheduler_config": config}
    if sampling == "edm_playground_v2.5":
        from nodes.families.sdxl import PLAYGROUND_LATENT

        if model.latent.channels != PLAYGROUND_LATENT.channels:
            raise NodeError("edm_playground_v2.5 is Playground v2.5's SDXL latent space (4 channels); this model's "
                            f"latents have {model.latent.channels}", "sampling")
        changes["latent"] = PLAYGROUND_LATENT
    return (dataclasses.replace(model, **changes),)


@define_node("ModelSamplingContinuousEDM", category="advanced/model",
             inputs=[Input("model", T.MODEL),
                     Input("sampling", T.COMBO, default="v_prediction", choices=list(EDM_SAMPLINGS)),
                     Input("sigma_max", T.FLOAT, default=120.0, **_SIGMA_RANGE),
                     Input("sigma_min", T.FLOAT, default=0.002, **_SIGMA_RANGE)],
             outputs=[Output("MODEL", T.MODEL)])
def model_sampling_continuous_edm(ctx, model, sampling: str, sigma_max: float, sigma_min: float):
    """Sample the model in continuous time between sigma_min and sigma_max, its network told
    0.25 log(sigma) (Karras et al.'s EDM), with the preconditioning it was trained for: v_prediction
    (CosXL), edm (Karras et al.'s, data spread 0.5), edm_playground_v2.5 (edm in Playground v2.5's
    latent space), eps. Returns a new MODEL; the loaded one keeps its own sampling."""
    return _continuous(model, sampling, sigma_max, sigma_min, "log", EDM_SAMPLINGS)


@define_node("ModelSamplingContinuousV", category="advanced/model",
             inputs=[Input("model", T.MODEL),
                     Input("sampling", T.COMBO, default="v_prediction", choices=["v_prediction"]),
                     Input("sigma_max", T.FLOAT, default=500.0, **_SIGMA_RANGE),
                     Input("sigma_min", T.FLOAT, default=0.03, **_SIGMA_RANGE)],
             outputs=[Output("MODEL", T.MODEL)])
def model_sampling_continuous_v(ctx, model, sampling: str, sigma_max: float, sigma_min: float):
    """Continuous-time v-prediction whose network time is atan(sigma) * 2 / pi (0 to 1 over all
    levels), as ComfyUI's ModelSamplingContinuousV. Returns a new MODEL."""
    return _continuous(model, sampling, sigma_max, sigma_min, "atan", {"v_prediction": ("v_prediction", 1.0)})
