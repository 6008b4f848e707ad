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
config then carries ``kiln_shift_seq_len``. A config with ``kiln_train_grid`` set
takes the scheduler's own spacing instead (``set_timesteps(N)``: evenly spaced
between the shifted training range's ends, then shifted), which is what diffusers'
SD3 pipelines run; the family's config says which, the loop does not ask.

Strength (AddNoise): FluxImg2ImgPipeline's rule, which differs from SD's by one
rounding: ``t_start = int(N - N * s)`` (SD img2img rounds the steps run down,
``int(N * s)``), and sampling starts from the image blended with the seeded noise
at the flow time of step ``t_start``. ComfyUI's ``denoise`` runs the last
``steps`` steps of the ``int(steps / denoise)``-step grid, as for SD.

Samplers, each over the same grid (the network sees the state itself at timestep
``1000 * t``, and ``x - t * v`` is its clean-latent prediction, as ComfyUI's flow
sampling has it):

* ``euler``: diffusers' FlowMatchEulerDiscreteScheduler, the one FLUX's pipelines use.
* ``heun``: diffusers' FlowMatchHeunDiscreteScheduler (Heun's second-order step, two
  evaluations per step, the step to t = 0 a single Euler one), given the grid.
* ``dpmpp_2m``: diffusers' DPMSolverMultistepScheduler with ``use_flow_sigmas``
  (DPM-Solver++(2M), midpoint, in the flow's own log-SNR ``log((1 - t) / t)``), given
  the grid. ComfyUI's ``dpmpp_2m`` applies the variance-exploding formulas
  (``-log t``) to the flow state instead, so its FLUX pixels differ from these.
* ``euler_ancestral``: ComfyUI's rectified-flow ancestral Euler
  (``sample_euler_ancestral_RF``, eta 1): an Euler step to ``t_down = t'^2 / t``, the
  state rescaled by ``(1 - t') / (1 - t_down)`` and fresh noise added so its noise
  level is exactly ``t'``; the last step lands on the prediction. diffusers has no
  flow scheduler for it (``flow_ancestral.FlowEulerAncestral``; ``dpm_2_ancestral`` and
  ``dpmpp_2s_ancestral`` take ComfyUI's RF forms there too).
* Kiln's deterministic sigma-space steppers (:data:`KILN_ON_FLOW`: ``ipndm``,
  ``res_multistep``, ``dpm_fast``, ...), as ComfyUI runs them on a flow model: their
  formulas integrate ``dx/dsigma = (x - x0) / sigma``, and a flow state obeys the same
  equation in t (``x - x0 = t * v``), so only what the network sees changes (the state
  itself, at ``1000 * t``: the steppers ask the model's training schedule,
  :class:`FlowSchedule`). ``deis`` and ``lms`` run as the Adams-Bashforth methods they are
  in ComfyUI (``multistep.DEISTab``, ``multistep.LMS``); ``ddim`` is Euler and ``plms`` LMS
  here as on SD. A variance-exploding sampler's noise (``x + sigma_up * n``) makes no
  flow state, so only flow forms draw noise here: the RF ancestral steppers
  (``flow_ancestral.py``), diffusers' SDE DPM-Solver++(2M) with flow sigmas, ``lcm`` (the
  flow blend), and ``dpmpp_sde``, ``dpmpp_3m_sde`` (``sde.py``), ``er_sde``, ``seeds_2``,
  ``seeds_3``, ``exp_heun_2_x0_sde``, ``sa_solver`` and ``sa_solver_pece``, whose solvers
  read the half-log-SNR log((1 - t) / t) and the clean latent's weight 1 - t from
  :class:`FlowSchedule` (ComfyUI's flow forms; ``exp_heun_2_x0`` is the noise-free one).
  The others are refused with the list.

Schedules: ``normal``, ``simple`` and ``sgm_uniform`` are the pipeline's uniform
grid; ``karras``, ``exponential`` and ``beta`` are diffusers' flags on it. Others are
refused with the list.
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
#: Samplers with a flow form of their own (diffusers' flow schedulers, ComfyUI's RF ancestral ones).
FLOW_ANCESTRAL = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral")  # nodes.samplers.flow_ancestral
#: diffusers' DPM-Solver++ (2M, and the 2M SDE forms) with flow sigmas, in log((1 - t) / t).
DPM_SOLVER = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu")
FLOW_NATIVE = ("euler", "heun", "uni_pc", "uni_pc_bh2") + DPM_SOLVER + FLOW_ANCESTRAL
#: Kiln steppers that run on a flow state, reading its training schedule (see the module docstring).
KILN_ON_FLOW = ("dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "euler_cfg_pp",
                "euler_ancestral_cfg_pp", "heunpp2", "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "lms", "dpm_fast",
                "dpm_adaptive", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
                "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                "sa_solver_pece", "lcm")
SAMPLERS = FLOW_NATIVE + KILN_ON_FLOW
SCHEDULE_FLAGS: dict[str, dict[str, Any]] = {
    "normal": {}, "simple": {}, "sgm_uniform": {},
    "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
#: Kiln's own keys in a flow config (not diffusers'): the patch count ModelSamplingFlux fixed.
SHIFT_SEQ_LEN = "kiln_shift_seq_len"
#: Kiln's key for a flow config whose grid is the scheduler's default spacing (see the module docstring).
TRAIN_GRID = "kiln_train_grid"
#: The image side (pixels) a scheduler node shifts for when it is not told the size (ComfyUI's default).
DEFAULT_SHIFT_SIZE = 1024
#: Kiln's key for a flow config whose ``mu`` follows another rule than diffusers' ``calculate_shift``:
#: "flux2" is FLUX.2's empirical one (:func:`empirical_mu`), on latents already cut into patches;
#: "per_pixel" is ``calculate_shift`` counting one token per latent pixel (FIBO 2's patch latents);
#: "sqrt" is QwenImageLayeredPipeline's ``sqrt(tokens / 256)``, tokens counted on one frame.
MU_RULE = "kiln_mu_rule"
#: Kiln's key a sampler node sets on its copy of the config for a folded layered latent
#: (nodes.latent_layers): its frame count, so ``mu`` is sized on one frame, not the stack.
LATENT_FRAMES = "kiln_latent_frames"


def is_flow(config: Mapping[str, Any]) -> bool:
    """Whether a model with this scheduler config samples by flow matching."""
    return config.get("_class_name") == FLOW_CLASS


def calculate_mu(config: Mapping[str, Any], seq_len: int) -> float:
    """The dynamic shift for ``seq_len`` patches: linear between (base_len, base_shift) and (max_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + (base - slope * base_len)


def empirical_mu(seq_len: int, steps: int) -> float:
    """FLUX.2's shift (diffusers' Flux2 pipelines, ComfyUI's Flux2Scheduler): a line in the step count
    through two fits in the token count (at 10 and 200 steps); past 4300 tokens the 200-step fit alone."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    at_200 = a2 * seq_len + b2
    if seq_len > 4300:
        return float(at_200)
    at_10 = a1 * seq_len + b1
    slope = (at_200 - at_10) / 190.0
    return float(slope * steps + at_200 - 200.0 * slope)


def mu_of(config: Mapping[str, Any], seq_len: float) -> float:
    """``mu`` for ``seq_len`` tokens by the config's rule (:data:`MU_RULE`; FLUX.2's needs steps: see
    :func:`mu_for`): diffusers' ``calculate_shift`` or QwenImageLayeredPipeline's square root."""
    if config.get(MU_RULE) == "sqrt":
        return math.sqrt(float(seq_len) / 256.0)
    return calculate_mu(config, int(seq_len))


def mu_for(config: Mapping[str, Any], h: int, w: int, steps: int | None = None) -> float | None:
    """``mu`` for a latent of h x w (2x2 patches), or the one ModelSamplingFlux fixed; None: unshifted.
    A FLUX.2 config (:data:`MU_RULE`) counts one token per latent pixel and needs ``steps``; a folded
    layered latent (:data:`LATENT_FRAMES`) is sized on one of its frames."""
    if not config.get("use_dynamic_shifting"):
        return None
    h //= int(config.get(LATENT_FRAMES) or 1)
    if config.get(MU_RULE) == "flux2":
        return empirical_mu(int(config.get(SHIFT_SEQ_LEN) or h * w), int(steps or 1))
    seq_len = config.get(SHIFT_SEQ_LEN) or (h * w if config.get(MU_RULE) == "per_pixel" else (h // 2) * (w // 2))
    return mu_of(config, seq_len)


class FlowSchedule:
    """A flow model's training schedule, the counterpart of ``schedules.TrainingSchedule``:
    the noise level is the flow time, ``timestep / T`` (T = ``num_train_timesteps``).

    ``sigmas`` lists the levels at timestep indices 0..T. Building the 1000-step DDPM
    schedule from a flow config instead would be meaningless (and diffusers complains about
    the flow keys). :meth:`percent_to_sigma` is ComfyUI's rule for flow models.
    """

    #: What the network predicts: the velocity (the denoiser fills uncovered area pixels by it).
    prediction_type = "flow"

    def __init__(self, config: Mapping[str, Any]) -> None:
        import torch

        self.steps = int(config.get("num_train_timesteps", 1000))
        self.sigmas = torch.linspace(0.0, 1.0, self.steps + 1)
        #: The shift ComfyUI's model sampling applies to percents: FLUX's exponential one at mu (the
        #: size ModelSamplingFlux fixed, else ComfyUI's default 1024 px: mu = max_shift), or a fixed one.
        if config.get("use_dynamic_shifting"):
            seq_len = config.get(SHIFT_SEQ_LEN) or (DEFAULT_SHIFT_SIZE // 16) ** 2
            self._mu, self._shift = mu_of(config, seq_len), None
        else:
            self._mu, self._shift = None, float(config.get("shift", 1.0))
        from nodes.samplers import velocity_rule

        #: The network output -> flow velocity conversion of the model's sampling rule
        #: (nodes.samplers.velocity_rule), which the denoiser applies to every network call; None: none.
        self.from_network = velocity_rule.from_network(config)

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's fraction of sampling -> noise level for flow models (timestep ranges,
        ControlNet and skip-layer windows): the flow time ``1 - percent`` shifted as the model's
        sampling shifts it; 0 lies above every level, 1 is 0."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        return self.shifted(1.0 - percent)

    def shifted(self, t: float) -> float:
        """Flow time ``t`` (0 < t <= 1) shifted as the model's sampling shifts it (ComfyUI's rule)."""
        if self._mu is not None:
            return math.exp(self._mu) / (math.exp(self._mu) + (1.0 / t - 1.0))
        return self._shift * t / (1.0 + (self._shift - 1.0) * t)

    def level_table(self) -> "torch.Tensor":
        """ComfyUI's table of a flow model's levels (``model_sampling.sigmas``): the shifted flow times at
        timesteps 1..T over T, which its BetaSamplingScheduler picks from."""
        import torch

        return torch.tensor([self.shifted((i + 1) / self.steps) for i in range(self.steps)], dtype=torch.float32)

    @property
    def sigma_min(self) -> float:
        return 1.0 / self.steps

    @property
    def sigma_max(self) -> float:
        return 1.0

    def sigma(self, t: "torch.Tensor | float") -> "torch.Tensor":
        import torch

        return (torch.as_tensor(t, dtype=torch.float32) / self.steps).clamp(0.0, 1.0)

    def timestep(self, sigma: "torch.Tensor | float") -> "torch.Tensor":
        import torch

        return torch.as_tensor(sigma, dtype=torch.float32) * self.steps

    @staticmethod
    def model_input(sample: "torch.Tensor", sigma: float) -> "torch.Tensor":
        """A flow model sees its state itself."""
        return sample

    @staticmethod
    def alpha(sigma: float) -> float:
        """The clean latent's weight in the state x = (1 - t) x0 + t eps."""
        return 1.0 - sigma

    @staticmethod
    def half_log_snr(sigma: float) -> float:
        """log((1 - t) / t), the time exponential integrators step in."""
        return math.log((1.0 - sigma) / sigma)

    @staticmethod
    def sigma_at_half_log_snr(value: float) -> float:
        return 1.0 / (1.0 + math.exp(value))


class FlowStepper:
    """A diffusers flow scheduler on the surface the loop expects (``scale_model_input``,
    a ``step`` that also reports the clean-latent prediction for previews).

    ``timesteps``: the evaluations to run (all of the scheduler's from ``begin`` by
    default); ``grid``: the flow times visited, for the plan (the scheduler's sigmas).
    """

    order = 1

    def __init__(self, sched: Any, begin: int, timesteps: Any = None, grid: Any = None) -> None:
        import inspect

        self.sched = sched
        #: schedulers that draw noise (the SDE ones) take each image's generator
        self._takes_generator = "generator" in inspect.signature(sched.step).parameters
        self.timesteps = sched.timesteps[begin:] if timesteps is None else timesteps
        self.sigmas = sched.sigmas[begin:] if grid is None else grid
        sched.set_begin_index(begin)

    def scale_model_input(self, sample: "torch.Tensor", timestep: Any = None) -> "torch.Tensor":
        return sample  # a flow model sees the state itself

    def step(self, model_output: "torch.Tensor", timestep: Any, sample: "torch.Tensor", generator: Any = None,
             return_dict: bool = True, **_: Any) -> StepOutput:
        """One step; ``generator`` (one per image) reaches schedulers that draw noise (the SDE ones)."""
        index = self.sched.step_index if self.sched.step_index is not None else self.sched.begin_index
        sigma = float(self.sched.sigmas[index])
        noisy = generator is not None and self._takes_generator
        out = self.sched.step(model_output, timestep, sample, return_dict=True,
                              **({"generator": generator} if noisy else {}))
        return StepOutput(out.prev_sample, sample - sigma * model_output)


def scheduler(config: Mapping[str, Any], schedule: str, steps: int, h: int, w: int) -> Any:
    """FlowMatchEulerDiscreteScheduler with ``set_timesteps`` done as FluxPipeline does it."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    clean = {k: v for k, v in config.items() if not k.startswith("kiln_") and k != "prediction_type"}
    flags = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
             **SCHEDULE_FLAGS[schedule]}
    sched = FlowMatchEulerDiscreteScheduler.from_config(clean, **flags)
    if config.get(TRAIN_GRID):
        sched.set_timesteps(steps, mu=mu_for(config, h, w, steps))
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu_for(config, h, w, steps))
    return sched


def on_grid(spec: "SamplerSpec", config: Mapping[str, Any], sigmas: "torch.Tensor") -> Any:
    """A stepper for ``spec`` (not euler) visiting exactly ``sigmas`` (descending flow times).

    The list may end above 0 (a split list): the scheduler is then built on the list
    followed by 0 and only the evaluations of the list's own steps run. diffusers'
    Heun and DPM-Solver classes build their grids themselves (no ``sigmas`` argument),
    so their arrays are set to the list the way their ``set_timesteps`` lays them out.
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler

    sigmas = sigmas.to("cpu", torch.float32)
    steps = len(sigmas) - 1
    ends_above = float(sigmas[-1]) > 0
    grid = sigmas if ends_above else sigmas[:-1]  # the flow times the model is evaluated at (+ the end)
    train = int(config.get("num_train_timesteps", 1000))
    if spec.name in KILN_ON_FLOW:  # they take a list ending anywhere, and read the flow schedule from the config
        from nodes.samplers.steppers import kiln_stepper

        return kiln_stepper(spec, config, sigmas)
    if spec.name in FLOW_ANCESTRAL:
        from nodes.samplers.flow_ancestral import FLOW_STEPPERS

        return FLOW_STEPPERS[spec.name](config, sigmas, **dict(spec.options))
    if spec.options and spec.name in DPM_SOLVER:  # eta / s_noise set: Kiln's SDE steppers, in their flow forms
        from nodes.samplers.steppers import kiln_stepper

        return kiln_stepper(spec, config, sigmas)
    if spec.name in ("uni_pc", "uni_pc_bh2"):
        from nodes.samplers.flow_ve import unipc

        return unipc(spec, sigmas, train)
    if spec.name == "heun":
        sched = FlowMatchHeunDiscreteScheduler(num_train_timesteps=train, shift=1.0)
        sched.set_timesteps(len(grid))
        doubled = torch.cat([grid[:1], grid[1:].repeat_interleave(2)])
        sched.sigmas = torch.cat([doubled, torch.zeros(1)])
        sched.timesteps = doubled * train
        return FlowStepper(sched, 0, sched.timesteps[:2 * steps - (0 if ends_above else 1)], sigmas)
    if spec.name in DPM_SOLVER:
        if spec.stochastic:  # the SDE forms start just below pure noise, as ComfyUI's (infinite log-SNR at t = 1)
            from nodes.samplers.stochastic import below_pure_noise

            grid = below_pure_noise(config, grid)
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=train, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
            lower_order_final=True, **{"solver_type": "midpoint", **spec.config, "final_sigmas_type": "zero"})
        sched.set_timesteps(len(grid))
        sched.sigmas = torch.cat([grid, torch.zeros(1)])
        sched.timesteps = grid * train
        return FlowStepper(sched, 0, sched.timesteps[:steps], sigmas)
    raise ValueError(f"no flow stepper for {spec.name}")  # pragma: no cover - check_sampler refused it


def flow_spec(spec: "SamplerSpec") -> "SamplerSpec":
    """The sampler that runs ``spec`` on a flow model: ``ddim`` is Euler and ``plms`` LMS, as on SD."""
    from nodes.samplers.names import resolve_sampler

    return resolve_sampler(spec.sigma_fallback) if spec.sigma_fallback in SAMPLERS else spec


def check_sampler(spec: "SamplerSpec", input_name: str = "sampler_name") -> None:
    """Refuse a sampler flow sampling does not have, naming ``input_name``."""
    if flow_spec(spec).name not in SAMPLERS:
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


def follow(spec: "SamplerSpec", config: Mapping[str, Any], sigmas: "torch.Tensor") -> Any:
    """The flow stepper over exactly ``sigmas`` (a SIGMAS list, last value included), for the
    custom-sampling nodes; samplers other than euler: :func:`on_grid`. Euler: diffusers' scheduler
    with the shift already in the list
    (shift 1, no dynamic shifting), its terminal value set to the list's last one so a
    split list stops where it says."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_sampler(spec, "sampler")
    spec = flow_spec(spec)
    if spec.name != "euler":
        return on_grid(spec, config, sigmas)
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

    from nodes.samplers import velocity_rule
    from nodes.samplers.plan import MODE_COMFY, MODE_IMG2IMG, MODE_TXT2IMG, Plan

    check(spec, schedule)
    spec = flow_spec(spec)
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
    stepper = FlowStepper(sched, begin) if spec.name == "euler" else on_grid(spec, config, sched.sigmas[begin:])
    t = float(stepper.sigmas[0])
    sched.set_begin_index(begin)  # the euler grid's scheduler also makes the start (its scale_noise)
    start = velocity_rule.noise_scaling(
        config, x0, lambda: sched.scale_noise(x0, sched.timesteps[begin:begin + 1].repeat(x0.shape[0]), noise))
    if not math.isfinite(t):  # pragma: no cover - a broken config
        raise ConditioningError("the flow schedule has no finite start", "model")
    return Plan(mode, stepper, stepper.timesteps, start, stepper.sigmas)
