"""EasyCache and LazyCache (nodes/families/step_cache.py) on the tiny SD1 and the tiny FLUX.

The skip pattern of a run is checked against a straight re-statement of ComfyUI's rule in this
file, fed with what the run recorded: each evaluation's noise level and model input (a wrapper
on Denoiser.model_output) and each network output (a hook on the UNet). A skipped evaluation
must answer with its input plus the difference cached at the last one that ran, not the last
output. A threshold of 0 or an empty window must leave the run bit for bit as it was.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes.families import step_cache
from nodes.latent import empty_latent_image
from nodes.samplers.schedules import percent_to_sigma, training_schedule
from nodes.sampling import ksampler
from nodes.speed_patches import easy_cache, lazy_cache
from test_sampling import Recorder, sd1  # noqa: F401 (fixture)

STEPS = 12


def _run(tiny, model, rec: Recorder | None = None, cfg: float = 6.0) -> torch.Tensor:
    rec = rec or Recorder()
    empty, = empty_latent_image(rec.ctx, 128, 128, 1)
    out, = ksampler(rec.ctx, model, 5, STEPS, cfg, "euler", "normal", tiny.pos, tiny.neg, empty)
    return tiny.decode(out["samples"])


class Trace:
    """Each evaluation's (sigma, model input, guided output), recorded where the loop asks the
    cache for it, and each UNet output, in order."""

    def __init__(self, tiny, monkeypatch) -> None:
        self.steps: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []
        for cls in (step_cache.EasyCacheRun, step_cache.LazyCacheRun):
            monkeypatch.setattr(cls, "evaluate", self._recorded(cls.evaluate))
        self.hook = tiny.parts["unet"].register_forward_hook(lambda m, a, o: self.outputs.append(o[0].clone()))

    def _recorded(self, original):
        def evaluate(run, denoiser, model_in, t, sigma):
            out = original(run, denoiser, model_in, t, sigma)
            self.steps.append((sigma, model_in.clone(), out.clone()))
            return out
        return evaluate

    def close(self) -> None:
        self.hook.remove()


def _window(tiny, start: float, end: float) -> tuple[float, float]:
    schedule = training_schedule(tiny.model.scheduler_config)
    return percent_to_sigma(schedule, start), percent_to_sigma(schedule, end)


def _sub(x: torch.Tensor) -> torch.Tensor:
    return x[..., ::8, ::8]


def reference_skips(trace: Trace, threshold: float, window: tuple[float, float], lazy: bool) -> list[int]:
    """ComfyUI's rule restated on the recorded quantities: the evaluations it skips.

    EasyCache measures the network's [uncond; cond] output against its input, on the first
    condition's rows (the unconditional one here), and records nothing before the window.
    LazyCache measures the clean prediction against the noisy latent (epsilon model:
    x = model_in * sqrt(1 + sigma^2), x0 = x - sigma * eps) and records before the window too."""
    start, end = window
    outputs = iter(trace.outputs)
    skipped, x_prev, y_prev, norm, rate, total, seen = [], None, None, None, None, 0.0, False
    for i, (sigma, model_in, guided) in enumerate(trace.steps):
        if sigma <= end:
            next(outputs)
            continue
        if lazy:
            x = model_in * math.sqrt(1 + sigma * sigma)
        else:
            x = model_in
        change = None
        if sigma <= start:
            seen = True
            if x_prev is not None:
                change = (_sub(x) - x_prev).abs().mean().item()
                if norm is not None and rate is not None:
                    total += rate * change / norm
                    if total < threshold:
                        skipped.append(i)
                        continue
                    total = 0.0
        net = next(outputs)
        if lazy:
            y, whole = x - sigma * guided, x - sigma * guided
        else:
            y, whole = net[:1], net
            if not seen:
                continue
        if norm is not None and change is not None:
            rate = (_sub(y) - y_prev).abs().mean().item() / change
        x_prev, y_prev, norm = _sub(x), _sub(y), whole.abs().mean().item()
    return skipped


@pytest.mark.parametrize("node", [easy_cache, lazy_cache])
def test_threshold_0_or_an_empty_window_is_the_run_without_it(sd1, node):
    plain = _run(sd1, sd1.model)
    for threshold, start, end in ((0.0, 0.0, 1.0), (3.0, 0.8, 0.2), (3.0, 0.5, 0.5)):
        (cached,) = node(Recorder().ctx, sd1.model, threshold, start, end, False)
        rec = Recorder()
        assert torch.equal(_run(sd1, cached, rec), plain)
        assert rec.messages[-1].endswith(f"skipped 0/{STEPS} model evaluations (1.00x speedup)")


@pytest.mark.parametrize("node,lazy", [(easy_cache, False), (lazy_cache, True)])
@pytest.mark.parametrize("threshold,start,end", [(0.2, 0.0, 1.0), (3.0, 0.3, 0.8)])
def test_the_skips_follow_comfyuis_rule_and_reuse_the_cached_difference(sd1, monkeypatch, node, lazy, threshold,
                                                                        start, end):
    plain = _run(sd1, sd1.model)
    (cached,) = node(Recorder().ctx, sd1.model, threshold, start, end, False)
    calls, rec, trace = sd1.unet_calls, Recorder(), Trace(sd1, monkeypatch)
    try:
        image = _run(sd1, cached, rec)
    finally:
        trace.close()
    window = _window(sd1, start, end)
    skipped = reference_skips(trace, threshold, window, lazy)
    assert skipped and sd1.unet_calls - calls == STEPS - len(skipped)  # the network ran only where the rule says
    assert rec.messages[-1].endswith(f"skipped {len(skipped)}/{STEPS} model evaluations "
                                     f"({STEPS / (STEPS - len(skipped)):.2f}x speedup)")
    # by hand: the first skip is the window's third evaluation (EasyCache: its first picks the
    # measured condition, its second measures the rate), LazyCache's its second when steps ran before it
    first_in = next(i for i, (sigma, _, _) in enumerate(trace.steps) if sigma <= window[0])
    earliest = first_in + (1 if lazy and first_in > 0 else 2)
    assert skipped[0] == earliest if threshold == 3.0 else skipped[0] >= earliest
    assert all(sigma > window[1] for i, (sigma, _, _) in enumerate(trace.steps) if i in skipped)

    def cached_difference(i: int) -> torch.Tensor:
        sigma, model_in, guided = trace.steps[i]
        if not lazy:  # the guided output of a batch answered with input + difference keeps input - output
            return guided - model_in
        x = model_in * math.sqrt(1 + sigma * sigma)
        return (x - sigma * guided) - x

    for i in skipped:
        last_run = max(j for j in range(i) if j not in skipped)
        assert torch.allclose(cached_difference(i), cached_difference(last_run), atol=2e-5)
        assert (trace.steps[i][2] - trace.steps[last_run][2]).abs().max().item() > 1e-3  # not the last output
    # measured (pixels in 0..1, max / mean abs. difference from the uncached image):
    # EasyCache 0.2, whole run: 5 of 12 skipped, 0.031 / 0.0039; window 0.3-0.8 at 3.0: 4 skipped, 0.061 / 0.0076
    # LazyCache 0.2, whole run: 9 of 12 skipped, 0.26 / 0.036; window 0.3-0.8 at 3.0: 5 skipped, 0.11 / 0.014
    gap = (image - plain).abs()
    assert 0 < gap.mean().item() < (0.05 if lazy else 0.01) and gap.max().item() < 0.3


def test_verbose_logs_each_decision_and_the_settings_are_checked(sd1, caplog):
    (cached,) = easy_cache(Recorder().ctx, sd1.model, 0.2, 0.0, 1.0, True)
    with caplog.at_level("INFO", logger="nodes.families.step_cache"):
        again = _run(sd1, cached)
    assert torch.equal(_run(sd1, cached), again)  # each run starts with fresh state
    lines = [r.getMessage() for r in caplog.records]
    assert any("skipping" in line for line in lines) and any("running" in line for line in lines)
    for name, args in (("reuse_threshold", (3.5, 0.1, 0.9)), ("start_percent", (0.2, -0.1, 0.9)),
                       ("end_percent", (0.2, 0.1, 1.5))):
        with pytest.raises(NodeError) as err:
            easy_cache(Recorder().ctx, sd1.model, *args, False)
        assert err.value.input_name == name
    assert sd1.model.patches.step_cache is None  # the given handle samples as before


def test_dual_guiders_take_lazy_cache_and_refuse_easy_cache(sd1):
    from test_dual_cfg_guider import _dual

    plain = _dual(sd1, sd1.pos, sd1.neg, sd1.neg, "regular")
    (lazy,) = lazy_cache(Recorder().ctx, sd1.model, 0.2, 0.0, 1.0, False)
    assert (_dual(sd1, sd1.pos, sd1.neg, sd1.neg, "regular", model=lazy) - plain).abs().max().item() > 0
    (easy,) = easy_cache(Recorder().ctx, sd1.model, 0.2, 0.0, 1.0, False)
    with pytest.raises(NodeError) as err:
        _dual(sd1, sd1.pos, sd1.neg, sd1.neg, "regular", model=easy)
    assert err.value.input_name == "guider" and "LazyCache" in str(err.value)


@pytest.mark.parametrize("node", [easy_cache, lazy_cache])
def test_a_flow_transformer_is_cached_too(node):
    """FLUX (a flow model, cfg 1): the wrapper sits around the denoiser, so any family works."""
    from test_skip_layer_guidance import _model, _sample

    model = _model()
    plain = _sample(model)
    (off,) = node(Recorder().ctx, model, 0.0, 0.0, 1.0, False)
    assert torch.equal(_sample(off), plain)
    (cached,) = node(Recorder().ctx, model, 3.0, 0.0, 1.0, False)
    out = _sample(cached)
    assert torch.isfinite(out).all() and (out - plain).abs().max().item() > 0


@pytest.mark.parametrize("node", [easy_cache, lazy_cache])
def test_sd3_under_guidance_is_cached_too(node):
    """SD3 (a flow transformer with its own wrapper), cfg 4: threshold 0 is the run as it was; a
    high threshold calls the transformer fewer times and keeps the latent finite."""
    import tiny_sd3
    from test_sd3 import _embeds, _model

    pe, ne, pp, npl = _embeds("large")
    model = _model("large")
    calls = []
    hook = tiny_sd3.components("large")["transformer"].register_forward_pre_hook(lambda *a: calls.append(1))

    def sample(m) -> torch.Tensor:
        (out,) = ksampler(Recorder().ctx, m, 42, 8, 4.0, "euler", "normal", [[pe, {"pooled_output": pp}]],
                          [[ne, {"pooled_output": npl}]], {"samples": torch.zeros(1, 16, 16, 16)})
        return out["samples"]

    try:
        plain = sample(model)
        (off,) = node(Recorder().ctx, model, 0.0, 0.0, 1.0, False)
        assert torch.equal(sample(off), plain)
        calls.clear()
        (cached,) = node(Recorder().ctx, model, 3.0, 0.0, 1.0, False)
        out = sample(cached)
    finally:
        hook.remove()
    assert 0 < len(calls) < 8 and torch.isfinite(out).all() and not torch.equal(out, plain)
