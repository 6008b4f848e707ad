"""Step caching (ComfyUI's EasyCache and LazyCache): skip a model evaluation when its output's
change can be predicted from its input's change, and answer with the input plus the output
difference cached at the last evaluation that ran.

The rule, the same for both (ComfyUI's comfy_extras/nodes_easycache.py), on a quantity pair
(x: what goes in, y: what comes out), with ``mean|.|`` the mean absolute value over the first
condition's rows, subsampled every 8th row and column of the latent:

* an evaluation that runs records x, y (subsampled), the norm mean|y| (over all of y) and
  the cache difference y - x; when it ran inside the window and an earlier one had run, it
  also records the rate k = mean|y - y_prev| / mean|x - x_prev| (how strongly the output
  follows the input);
* inside the window, once k is known, each evaluation adds k * mean|x - x_prev| / norm_prev
  to an accumulated estimate (x_prev: the last input that ran, so skipped steps keep
  measuring from it); below ``reuse_threshold`` the evaluation is skipped and answered with
  x + (y - x) cached; otherwise the estimate resets to 0 and the network runs;
* the window is ComfyUI's percents as noise levels: from ``start_percent`` (sigma at or
  below it) to ``end_percent`` (sigma above it); past the end the network runs and nothing
  is recorded.

EasyCache applies it to each network call: x is the scaled model input, y the network's raw
output (epsilon, v or flow), the first condition the first rows of the step's first call
(the unconditional side in a guided batch, as ComfyUI's batch order gives); a step the
first call skips skips every call of that step, each answered with its own cached
difference. Nothing is recorded before the window (ComfyUI picks its first condition at
the window's first step), so the earliest skip is the window's third evaluation. LazyCache
applies it to the whole guided prediction, with x the noisy latent and y the clean-latent
prediction, over the whole batch, recording before the window too (earliest skip: the
window's second evaluation when evaluations ran before it, else its third). Both hold for any
family, as they wrap the denoiser. The node message counts skipped model evaluations (ComfyUI's
log counts steps; with one evaluation per step, as Euler makes, they are the same).

Kiln's differences: the quantities are measured in float32 (ComfyUI: the network's dtype);
EasyCache's extra guidance passes (SAG, PAG, skip-layer guidance) run uncached, and with an
inpainting model's extra input channels the difference is taken on the latent channels
(ComfyUI cuts the input from the start, i.e. takes the mask channels).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Every how many latent rows and columns the change rates are measured (ComfyUI's subsample_factor).
SUBSAMPLE = 8


@dataclass(frozen=True)
class StepCacheSettings:
    """EasyCache's (``kind`` "EasyCache") or LazyCache's ("LazyCache") node inputs."""

    kind: str
    reuse_threshold: float
    start_percent: float
    end_percent: float
    verbose: bool = False

    def start(self, schedule: Any, prediction_type: str) -> "StepCacheRun":
        """Fresh state for one sampling run (ComfyUI clones its holder per run), on the model's
        training ``schedule`` (percents to noise levels) and what its network predicts."""
        from nodes.samplers.schedules import percent_to_sigma

        make = EasyCacheRun if self.kind == "EasyCache" else LazyCacheRun
        run = make(self, percent_to_sigma(schedule, self.start_percent), percent_to_sigma(schedule, self.end_percent))
        # a flow model's scheduler config names no prediction type; its schedule says it predicts velocity
        run.prediction_type = getattr(schedule, "prediction_type", None) or prediction_type
        run.sigma_data = float(getattr(schedule, "sigma_data", 1.0))
        return run


def _subsample(x: Any) -> Any:
    return x[..., ::SUBSAMPLE, ::SUBSAMPLE]


def _mean_abs(x: Any) -> float:
    return float(x.flatten().abs().mean())


class ChangeRule:
    """The accumulated-change estimate and what it is measured from (see the module's docstring)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.x_prev: Any = None
        self.y_prev: Any = None
        self.norm: float | None = None
        self.rate: float | None = None
        self.cumulative = 0.0
        self.input_change: float | None = None

    def begin(self) -> None:
        self.input_change = None

    def should_skip(self, x_sub: Any) -> bool:
        """Inside the window: measure the input's change and decide."""
        if self.x_prev is None:
            return False
        self.input_change = _mean_abs(x_sub - self.x_prev)
        if self.norm is None or self.rate is None:
            return False
        self.cumulative += self.rate * self.input_change / self.norm
        if self.cumulative < self.threshold:
            return True
        self.cumulative = 0.0
        return False

    def record(self, x_sub: Any, y_sub: Any, norm: float) -> None:
        """An evaluation ran: the rate (where an input change was measured) and the new references."""
        if self.norm is not None and self.input_change is not None:
            self.rate = _mean_abs(y_sub - self.y_prev) / self.input_change
        self.x_prev, self.y_prev, self.norm = x_sub.clone(), y_sub.clone(), norm


class StepCacheRun:
    """One run's cache: the window as noise levels, the rule, and what was skipped."""

    def __init__(self, settings: StepCacheSettings, sigma_start: float, sigma_end: float) -> None:
        self.settings = settings
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.rule = ChangeRule(settings.reuse_threshold)
        self.evaluations = 0
        self.skipped = 0
        self.shape: tuple | None = None
        self.prediction_type, self.sigma_data = "epsilon", 1.0

    def past_end(self, sigma: float) -> bool:
        return not sigma > self.sigma_end

    def in_window(self, sigma: float) -> bool:
        return sigma <= self.sigma_start

    def _same_shape(self, x: Any) -> None:
        """A latent of another size (an upscaling sampler) starts the rule afresh (ComfyUI resets)."""
        if self.shape is not None and tuple(x.shape[1:]) != self.shape:
            log.warning("%s: the latent changed size, starting over", self.settings.kind)
            self.rule = ChangeRule(self.settings.reuse_threshold)
            self._reset()
        self.shape = tuple(x.shape[1:])

    def _reset(self) -> None:
        pass

    def _say(self, skipped: bool, sigma: float) -> None:
        if self.settings.verbose:
            log.info("%s: %s at sigma %.4g (accumulated change %.4g, threshold %g)", self.settings.kind,
                     "skipping" if skipped else "running", sigma, self.rule.cumulative, self.rule.threshold)

    def summary(self) -> str:
        """The node message: how many evaluations were skipped, and the speed-up that gives."""
        ran = self.evaluations - self.skipped
        speedup = self.evaluations / ran if ran else 1.0
        return (f"{self.settings.kind} skipped {self.skipped}/{self.evaluations} model evaluations "
                f"({speedup:.2f}x speedup)")

    def evaluate(self, denoiser: Any, model_in: Any, t: Any, sigma: float) -> Any:
        raise NotImplementedError


class EasyCacheRun(StepCacheRun):
    """EasyCache: the rule on each network call (the denoiser calls :meth:`network_call`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._reset()

    def _reset(self) -> None:
        self.chosen = False  # whether the window's first step has picked the deciding call
        self.diffs: dict[int, Any] = {}

    def evaluate(self, denoiser: Any, model_in: Any, t: Any, sigma: float) -> Any:
        self.evaluations += 1
        self.sigma, self.calls, self.skipping = sigma, 0, False
        self.rule.begin()
        denoiser.network_cache = self
        return denoiser.model_output(model_in, t)

    def network_call(self, x: Any, rows: int, compute: Callable[[], Any]) -> Any:
        """The network's output for ``x`` [N, C, h, w] (whose first ``rows`` rows are the first
        condition's), computed by ``compute`` or rebuilt from the cached difference."""
        index, self.calls = self.calls, self.calls + 1
        if self.past_end(self.sigma):
            return compute()
        deciding = index == 0 and (self.chosen or self.in_window(self.sigma))
        if self.in_window(self.sigma):
            self._same_shape(x)
            if self.skipping and index in self.diffs:
                return x + self.diffs[index]
            self.chosen = True
            if deciding and self.rule.should_skip(_subsample(x[:rows])):
                self.skipping = True
                self.skipped += 1
                self._say(True, self.sigma)
                return x + self.diffs[index]
            if deciding:
                self._say(False, self.sigma)
        out = compute()
        self.diffs[index] = out - x
        if deciding:
            self.rule.record(_subsample(x[:rows]), _subsample(out[:rows]), _mean_abs(out))
        return out


class LazyCacheRun(StepCacheRun):
    """LazyCache: the rule on the guided prediction, in ComfyUI's x (noisy latent) and clean-latent terms."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.diff: Any = None

    def _reset(self) -> None:
        self.diff = None

    def evaluate(self, denoiser: Any, model_in: Any, t: Any, sigma: float) -> Any:
        from nodes.families.guidance_rules import Parametrisation

        self.evaluations += 1
        if self.past_end(sigma):
            return denoiser.model_output(model_in, t)
        space = Parametrisation(self.prediction_type, model_in, sigma, self.sigma_data)
        x = space.x
        self.rule.begin()
        if self.in_window(sigma):
            self._same_shape(x)
            if self.diff is not None and self.rule.should_skip(_subsample(x)):
                self.skipped += 1
                self._say(True, sigma)
                return space.from_x0(x + self.diff)
            self._say(False, sigma)
        out = denoiser.model_output(model_in, t)
        x0 = space.to_x0(out)
        self.diff = x0 - x
        self.rule.record(_subsample(x), _subsample(x0), _mean_abs(x0))
        return out
