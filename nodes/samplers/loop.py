"""The denoising loop around one scheduler.

The loop is diffusers' pipeline loop (scale the input, one guided model
evaluation, ``scheduler.step``) with what a node needs on top: per-image
generators for stochastic steps, a progress report with a preview after every
model evaluation (on CUDA sent once the next step is queued, so the preview never
stalls the GPU), and an interruption check before each one so a cancelled job
stops within a step. The model evaluation itself (the network's call signature,
guidance, combining conditionings) is the family's denoiser
(:mod:`nodes.families.denoiser`): this loop names no family.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Callable

from nodes.families.base import ConditioningError, Family, LatentFormat
from nodes.samplers.preview import make_preview

if TYPE_CHECKING:
    import torch

__all__ = ["ConditioningError", "Diverged", "run"]


class Diverged(ConditioningError):
    """The latent became NaN or infinite while sampling: a black image if it went on. Raised at the first
    report that shows it (no extra device sync: the preview is on the CPU by then), else after the last step,
    naming the step and the dtype the model computes in (float16 overflows for some models)."""

    def __init__(self, step: int, total: int, dtype: Any) -> None:
        name = str(dtype).replace("torch.", "")
        why = (" float16 overflows for some models (Qwen-Image, HiDream, Lumina 2, some fine-tunes): run with "
               "--precision bf16 or fp32" if name == "float16" else
               " its weights (a LoRA, a merge) or its conditioning may hold NaN or infinite values")
        super().__init__(f"the latent became NaN or infinite by step {step} of {total}, computing in {name}:{why}",
                         "model")

ProgressFn = Callable[[int, int, Any], None]


def run(network: Any, plan: Any, *, positive: Any, negative: Any, cfg: float, generators: list,
        family: Family, latent: LatentFormat, training_config: Any, image_size: tuple[int, int],
        progress: ProgressFn, check_interrupted: Callable[[], None], previews: bool = True,
        denoised: list | None = None, hold: Any = None, jobs: int = 1, patches: Any = None,
        dual: Any = None, say: Callable[[str], None] | None = None) -> "torch.Tensor":
    """Run ``plan`` (see plan.py) on ``network``; returns the final latent (model space, float32).

    With ``previews`` False (nobody will see them) progress is reported without one.
    ``denoised``, when given, receives the last step's clean-latent prediction (ComfyUI's
    ``denoised_output``). ``hold``: a nodes.samplers.hold.Hold keeping the unmasked region
    at the input (noise masks) before each evaluation; the caller applies ``hold.finish``
    to the result. ``jobs`` > 1: the batch holds that many queued jobs' images one after
    the other (a cross-job batch), and each report carries one preview per job, of its
    own first image, in job order (engine.batching gives each job its own).
    ``patches``: the model's nodes.handles.SamplingPatches (guidance rescale, perturbed
    attention and the guidance rules go to the denoiser, FreeU, Deep Shrink and blockwise ControlNets hook
    the network while the loop runs).
    ``dual``: a nodes.families.dual_cfg.DualCFG (DualCFGGuider's second prompt and scale) or a
    nodes.families.perp_neg.PerpNeg (PerpNegGuider's empty prompt), which makes the denoiser, or a
    nodes.families.dual_model.DualModel (DualModelGuider's second network, hooked with the same patches);
    for DualCFG ``positive``, ``negative`` and ``cfg`` are its cond1, negative and cfg_conds.
    ``say``: where the step cache's summary goes (the node's message), when the model has one.
    """
    import torch

    from nodes.families.denoiser import Denoiser
    from nodes.families import dual_model
    from nodes.handles import SamplingPatches
    from nodes.runtime.offload import compute_device
    from nodes.samplers.schedules import training_schedule

    patches = patches or SamplingPatches()
    sched = plan.scheduler
    x = plan.start.to(device=compute_device(network), dtype=torch.float32)
    make = Denoiser if dual is None else dual.denoiser
    # patches only the plain denoiser applies
    own = {k: v for k, v in (("self_attention", patches.self_attention), ("skip_layers", patches.skip_layers))
           if v is not None}
    if patches.step_cache is not None and patches.step_cache.kind == "EasyCache" and dual is not None:
        raise ConditioningError("EasyCache caches the network calls of KSampler's and CFGGuider's guidance; "
                                "use LazyCache with DualCFGGuider or PerpNegGuider", "model")
    if own and dual is not None:
        raise ConditioningError("SelfAttentionGuidance and skip-layer guidance guide KSampler's and CFGGuider's "
                                "classifier-free guidance, not DualCFGGuider's, PerpNegGuider's or DualModelGuider's",
                                 "model")
    schedule = training_schedule(training_config)
    overrides = dual_model.windows(patches.cfg_overrides, schedule)
    denoiser = make(network, family, positive=positive, negative=negative, cfg=cfg, image_size=image_size,
                    batch=x.shape[0], schedule=schedule,
                    prediction_type=training_config.get("prediction_type", "epsilon"),
                    cfg_rescale=patches.cfg_rescale, pag_scale=patches.pag_scale, guidance=patches.guidance,
                    control=patches.model_control, sample_sigmas=plan.sigmas, **own)
    cache = None if patches.step_cache is None else \
        patches.step_cache.start(schedule, training_config.get("prediction_type", "epsilon"))
    step_params = inspect.signature(sched.step).parameters
    step_kwargs = {"generator": generators} if "generator" in step_params else {}
    wants_uncond = "uncond" in step_params  # CFG++ steppers also step with the unguided output
    # The total is read at each report: an adaptive stepper (dpm_adaptive) adds timesteps as it goes.
    if hold is not None:
        hold = hold.to(x.device)
    pending = None  # a CUDA step's report, sent once the next step is queued (see _stage)
    # the model's network hooks, on DualModelGuider's second network too (ComfyUI runs both with its options)
    hooked = ((network, family), *(dual.apart() if hasattr(dual, "apart") else ()))
    weights_dtype = network.dtype  # diffusers walks every module to answer: once, not at every step
    with torch.inference_mode(), contextlib.ExitStack() as hooks:
        for each_network, each_family in hooked:
            _hook(hooks, each_network, patches, each_family, schedule, x, generators)
        for i, t in enumerate(plan.timesteps):
            check_interrupted()
            if hold is not None:
                x = hold.before(sched, x, t)
            model_in = sched.scale_model_input(x, t)
            with dual_model.applied(denoiser, overrides, float(schedule.sigma(float(t)))):
                if cache is None:
                    out = denoiser.model_output(model_in, t)
                else:
                    out = cache.evaluate(denoiser, model_in, t, float(schedule.sigma(float(t))))
            if wants_uncond:
                step_kwargs["uncond"] = denoiser.last_uncond
            result = sched.step(out, t, x, return_dict=True, **step_kwargs)
            x = result.prev_sample
            if denoised is not None:
                denoised[:] = [_shown(result, sched, x)]
            if not previews:
                progress(i + 1, len(plan.timesteps), None)
                continue
            staged = (i + 1, *_stage(_shown(result, sched, x), jobs, x))
            if staged[2] is None:
                _report(staged, len(plan.timesteps), latent, progress, weights_dtype)
                continue
            if pending is not None:
                _report(pending, len(plan.timesteps), latent, progress, weights_dtype)
            pending = staged
    if pending is not None:
        _report(pending, len(plan.timesteps), latent, progress, weights_dtype)
    if not torch.isfinite(x).all():  # the caller reads x anyway: one sync it would make
        raise Diverged(len(plan.timesteps), len(plan.timesteps), weights_dtype)
    if cache is not None and say is not None:
        say(cache.summary())
    return x


def _hook(hooks: contextlib.ExitStack, network: Any, patches: Any, family: Family, schedule: Any,
          x: "torch.Tensor", generators: list) -> None:
    """Put ``patches``' network hooks (FreeU, Deep Shrink, HyperTile, ToMe, blockwise ControlNets,
    FluxKVCache, ScaleROPE, hypernetworks, USO style references, Anima LLLites) on ``network`` until ``hooks`` closes."""
    from nodes import hypernetwork, uso
    from nodes.checkpoint import wan_rope
    from nodes.control import anima_lllite, blockwise
    from nodes.families import deep_shrink, freeu, hypertile, reference_kv, tome

    hooks.enter_context(freeu.applied(network, patches.freeu))
    hooks.enter_context(deep_shrink.applied(network, patches.deep_shrink, schedule))
    hooks.enter_context(hypertile.applied(network, patches.hypertile, _tile_generator(patches, generators, x)))
    hooks.enter_context(tome.applied(network, patches.tome, _tile_generator(patches, generators, x)))
    hooks.enter_context(blockwise.applied(network, patches.blockwise, family, tuple(x.shape)))
    hooks.enter_context(reference_kv.applied(network, patches.reference_kv))
    hooks.enter_context(wan_rope.applied(network, patches.rope))
    hooks.enter_context(hypernetwork.applied(network, patches.hypernetworks))
    hooks.enter_context(uso.applied(network, patches.style_references))
    hooks.enter_context(anima_lllite.applied(network, patches.lllite, schedule, family))


def _tile_generator(patches: Any, generators: list, x: "torch.Tensor") -> Any:
    """HyperTile's or ToMe's generator, seeded with the first image's seed as ComfyUI's global one
    is (each its own: in ComfyUI both would draw from the one global generator in turn)."""
    if patches.hypertile is None and patches.tome is None:
        return None
    from nodes.families.hypertile import start_generator

    seed = generators[0].initial_seed() if generators and hasattr(generators[0], "initial_seed") else 0
    return start_generator(seed, tuple(x.shape))


def _shown(result: Any, sched: Any, x: "torch.Tensor") -> "torch.Tensor":
    """What a preview shows: the current prediction of the clean image (the noisy latent otherwise)."""
    shown = getattr(result, "pred_original_sample", None)
    if shown is None:  # DPM-Solver keeps its last x0 prediction among its model outputs
        outputs = [o for o in getattr(sched, "model_outputs", None) or [] if o is not None]
        shown = outputs[-1] if outputs else x
    return shown


def _stage(shown: "torch.Tensor", jobs: int, x: "torch.Tensor") -> tuple["torch.Tensor", Any, "torch.Tensor"]:
    """Start moving each job's first image (batch item 0 of a single job) to the CPU:
    (tensor [jobs, C, h, w], CUDA event to wait for, or None, whether the latent ``x`` is all finite: a
    0-d tensor copied behind the same event, which the report checks).

    Reading a CUDA tensor right away would stall the CPU until the step finishes,
    so the next step's kernels could not be queued meanwhile: measured on an H100
    (fp16 SD1.5 UNet, Euler, cfg) that cost 3 ms of 32 per step at 512 px and 8 of
    49 at 1024 px. Instead the copy is queued behind the step and the report waits
    for it only after the next step is queued; on other devices it is immediate.
    """
    import torch

    item = shown[::shown.shape[0] // jobs].detach() if jobs > 1 else shown[:1].detach()
    finite = torch.isfinite(x).all()
    if item.device.type != "cuda":
        return item, None, finite
    staged, finite = item.to("cpu", non_blocking=True), finite.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(item.device))  # the lane's GPU, not the thread's current one
    return staged, done, finite


def _report(staged: tuple[int, "torch.Tensor", Any, "torch.Tensor"], total: int, latent: LatentFormat,
            progress: ProgressFn, dtype: Any) -> None:
    step, shown, done, finite = staged
    if done is not None:
        done.synchronize()
    if not bool(finite):
        raise Diverged(step, total, dtype)
    previews = []
    for k in range(shown.shape[0]):
        try:
            previews.append(make_preview(shown[k:k + 1], latent))
        except Exception:  # a preview must never fail a job
            previews.append(None)
    progress(step, total, previews[0] if len(previews) == 1 else previews)
