"""KSampler, AddNoise, EmptyLatentImage on tiny random-weight models.

The numerics claim is that Kiln runs the same math as diffusers' pipelines: on the
same weights, conditioning, init latent, seed, steps, strength and cfg, the decoded
image equals StableDiffusionImg2ImgPipeline's / StableDiffusionXLImg2ImgPipeline's /
StableDiffusionPipeline's within 1/255 per pixel. Both sides get the same init
latents (diffusers samples the VAE posterior from the noise generator, which the
VAE nodes deliberately do not; VAE encoding is tested with the VAE nodes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys

import pytest
import torch

import tiny_models
from engine.context import Interrupted, NodeContext, NodeError
from engine.events import Preview
from nodes import families
from nodes.handles import ModelHandle
from nodes.latent import add_noise, empty_latent_image
from nodes.samplers import schedules
from nodes.samplers.names import SAMPLERS, SCHEDULERS, resolve_sampler
from nodes.sampling import ksampler

PIXEL_TOL = 1 / 255 + 1e-6
KILN_TO_DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    # Kiln seeds the SDE's Brownian tree with [seed + i]; diffusers takes it from the config.
    "dpmpp_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": [42]}),
    # Issue 15's samplers that diffusers has (names.py says why these configs).
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "deis": ("DEISMultistepScheduler", {"solver_order": 3}),
    "ddpm": ("DDPMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


class Recorder:
    """A real NodeContext whose progress, messages and interruption the test controls."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.steps: list[tuple[int, int, object]] = []
        self.messages: list[str] = []
        self.interrupt_after = interrupt_after
        self.ctx = NodeContext(env=None, job=None, node_id="1", node_type="KSampler",
                               _progress=lambda v, m, p: self.steps.append((v, m, p)),
                               _is_interrupted=self._interrupted, _message=self.messages.append)

    def _interrupted(self) -> bool:
        return self.interrupt_after is not None and len(self.steps) >= self.interrupt_after


class Tiny:
    """One tiny model: diffusers parts, a Kiln ModelHandle over the same UNet, conditioning."""

    def __init__(self, variant: str) -> None:
        self.parts = tiny_models.components(variant)
        self.family = "sd2" if variant.startswith("sd2") else variant
        self.sdxl = self.family == "sdxl"
        self.unet_calls = 0
        unet = self.parts["unet"]
        unet.register_forward_pre_hook(self._count)
        self.scale = float(self.parts["vae"].config.scaling_factor)
        fam = families.by_name(self.family)
        self.model = ModelHandle(fam, scheduler_config=dict(self.parts["scheduler"].config),
                                 latent=dataclasses.replace(fam.latent, scale=self.scale),
                                 _use_unet=lambda: contextlib.nullcontext(unet))
        self.pos, self.neg, self.embeds = tiny_models.encoded_prompts(variant, "a red barn in a field", "blurry")
        self.init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 4  # unscaled latent

    def _count(self, *args) -> None:
        self.unet_calls += 1

    def diffusers_pipe(self, kind: str, sampler: str, karras: bool = False):
        import diffusers

        if kind == "img2img":
            cls = diffusers.StableDiffusionXLImg2ImgPipeline if self.sdxl else diffusers.StableDiffusionImg2ImgPipeline
        else:
            cls = diffusers.StableDiffusionXLPipeline if self.sdxl else diffusers.StableDiffusionPipeline
        pipe = tiny_models.pipeline(self.family if self.family != "sd2" else "sd2", cls=cls, parts=dict(self.parts))
        name, extra = KILN_TO_DIFFUSERS[sampler]
        if karras:
            extra = {**extra, "use_karras_sigmas": True}
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
        return pipe

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return tiny_models.decode(self.parts["vae"], samples)

    def img2img(self, sampler: str, scheduler: str = "normal", *, seed: int = 42, steps: int = 10,
                strength: float = 0.6, cfg: float = 7.5, latent: torch.Tensor | None = None,
                rec: Recorder | None = None, denoise: float = 1.0) -> dict:
        rec = rec or Recorder()
        lat, = add_noise(rec.ctx, self.model, {"samples": self.init if latent is None else latent}, strength, seed)
        out, = ksampler(rec.ctx, self.model, seed, steps, cfg, sampler, scheduler, self.pos, self.neg, lat, denoise)
        return out


@pytest.fixture(scope="module")
def sd1() -> Tiny:
    return Tiny("sd1")


@pytest.fixture(scope="module")
def sdxl() -> Tiny:
    return Tiny("sdxl")


@pytest.fixture(scope="module")
def sd2v() -> Tiny:
    return Tiny("sd2-v")


# -- numerics: equal to diffusers' pipelines ---------------------------------------------

def _check_img2img(tiny: Tiny, sampler: str, karras: bool = False) -> None:
    pipe = tiny.diffusers_pipe("img2img", sampler, karras)
    ref = pipe(image=tiny.init * tiny.scale, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(42), output_type="pt", **tiny.embeds).images
    out = tiny.img2img(sampler, "karras" if karras else "normal")
    ours = tiny.decode(out["samples"])
    ref = ref.permute(0, 2, 3, 1)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= PIXEL_TOL
    # Not vacuous: the sampler changed the image, and a different seed would too.
    assert (ours - tiny.decode(tiny.init)).abs().max().item() > 0.01


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "heun", "lms", "dpm_2_ancestral",
                                     "dpm_2", "plms", "dpmpp_sde", "uni_pc", "uni_pc_bh2", "dpmpp_2m_sde",
                                     "deis", "ddpm", "lcm"])
def test_sd1_img2img_equals_diffusers(sd1, sampler):
    _check_img2img(sd1, sampler)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_sd1_img2img_karras_equals_diffusers(sd1, sampler):
    _check_img2img(sd1, sampler, karras=True)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "heun"])
def test_sdxl_img2img_equals_diffusers(sdxl, sampler):
    _check_img2img(sdxl, sampler)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_v_prediction_img2img_equals_diffusers(sd2v, sampler):
    _check_img2img(sd2v, sampler)


@pytest.mark.parametrize("variant,sampler", [("sd1", "euler_ancestral"), ("sd1", "dpmpp_2m"), ("sdxl", "euler")])
def test_txt2img_equals_diffusers(variant, sampler, sd1, sdxl):
    tiny = sd1 if variant == "sd1" else sdxl
    pipe = tiny.diffusers_pipe("txt2img", sampler)
    ref = pipe(height=64, width=64, num_inference_steps=8, guidance_scale=6.0, output_type="pt",
               generator=torch.Generator().manual_seed(5), **tiny.embeds).images.permute(0, 2, 3, 1)
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 1)
    out, = ksampler(rec.ctx, tiny.model, 5, 8, 6.0, sampler, "normal", tiny.pos, tiny.neg, empty)
    assert (tiny.decode(out["samples"]) - ref).abs().max().item() <= PIXEL_TOL


#: ComfyUI's KSampler.SAMPLER_NAMES (comfy/samplers.py, late 2026): a workflow may name any of them.
COMFY_SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]


def test_stability_names_are_the_same_samplers(sd1):
    a = sd1.img2img("k_euler_ancestral", steps=4)["samples"]
    b = sd1.img2img("euler_ancestral", steps=4)["samples"]
    assert torch.equal(a, b)
    assert {s.stability_name for s in SAMPLERS} >= {"k_euler", "k_dpmpp_2m", "k_dpmpp_sde", "plms", "ddim"}
    names = [s.name for s in SAMPLERS]
    assert names[:len(COMFY_SAMPLER_NAMES)] == COMFY_SAMPLER_NAMES  # every one of ComfyUI's, in its order
    assert list(SCHEDULERS) == ["normal", "karras", "exponential", "simple", "sgm_uniform", "ddim_uniform", "beta",
                                "linear_quadratic", "kl_optimal"]
    # A _gpu name is the same sampler (Kiln's noise comes from each image's CPU generator).
    assert torch.equal(sd1.img2img("dpmpp_2m_sde", steps=4)["samples"], sd1.img2img("dpmpp_2m_sde_gpu", steps=4)["samples"])


# -- ComfyUI's denoise -------------------------------------------------------------------

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
WORKED_HALF = [1.5482, 1.4225, 1.3078, 1.2026, 1.1056, 1.0158, 0.9324, 0.8543, 0.7811, 0.7119, 0.6462,
               0.5834, 0.5230, 0.4644, 0.4069, 0.3495, 0.2909, 0.2287, 0.1567, 0.0292, 0.0]


def test_comfy_denoise_sigmas_equal_worked_values():
    ts = schedules.TrainingSchedule(SD15)
    assert ts.sigma_min == pytest.approx(0.029167, abs=1e-5)
    assert ts.sigma_max == pytest.approx(14.614641, abs=1e-4)
    full = schedules.comfy_sigmas(ts, "normal", 20)
    assert len(full) == 21
    assert full[:5].tolist() == pytest.approx([14.6146, 10.7468, 8.0815, 6.2049, 4.8557], abs=1e-4)
    assert full[-3:].tolist() == pytest.approx([0.2322, 0.0292, 0.0], abs=1e-4)
    half = schedules.comfy_sigmas(ts, "normal", 20, denoise=0.5)
    assert half.tolist() == pytest.approx(WORKED_HALF, abs=1e-4)
    assert len(schedules.comfy_sigmas(ts, "normal", 20, denoise=0.0)) == 0


def test_comfy_denoise_runs_steps_on_the_schedule_tail(sd1):
    """ComfyUI's rule: always `steps` steps; Euler makes one UNet batch call per step."""
    from nodes.samplers.plan import MODE_COMFY, plan

    x0 = sd1.init * sd1.scale
    p = plan(resolve_sampler("euler"), "normal", sd1.model.scheduler_config, 20, x0=x0,
             noise=torch.zeros_like(x0), strength=None, denoise=0.5)
    assert p.mode == MODE_COMFY and len(p.timesteps) == 20
    assert p.scheduler.sigmas.tolist() == pytest.approx(WORKED_HALF, abs=1e-4)
    rec = Recorder()
    before = sd1.unet_calls
    out, = ksampler(rec.ctx, sd1.model, 1, 20, 7.0, "euler", "normal", sd1.pos, sd1.neg, {"samples": sd1.init}, 0.5)
    assert sd1.unet_calls - before == 20 and [s[:2] for s in rec.steps] == [(i, 20) for i in range(1, 21)]
    # ComfyUI's noise: torch.manual_seed(seed) on the CPU, one draw of the latent's shape.
    noise = torch.randn(sd1.init.shape, generator=torch.Generator("cpu").manual_seed(1))
    assert torch.allclose(p.start, x0)  # (zero noise given above) the start is the latent + noise * sigma0
    p2 = plan(resolve_sampler("euler"), "normal", sd1.model.scheduler_config, 20, x0=x0, noise=noise,
              strength=None, denoise=0.5)
    assert torch.allclose(p2.start, x0 + noise * WORKED_HALF[0], atol=1e-3)
    assert not torch.equal(out["samples"], sd1.init)


# -- seeds, strength, batches ------------------------------------------------------------

def test_same_seed_same_bytes_different_seed_differs(sd1):
    a = sd1.img2img("euler_ancestral", seed=3, steps=6)["samples"]
    b = sd1.img2img("euler_ancestral", seed=3, steps=6)["samples"]
    c = sd1.img2img("euler_ancestral", seed=4, steps=6)["samples"]
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert (a - c).abs().max().item() > 1e-3


def test_strength_zero_returns_the_input_latent(sd1):
    before = sd1.unet_calls
    out = sd1.img2img("dpmpp_2m", strength=0.0)
    assert torch.equal(out["samples"], sd1.init) and sd1.unet_calls == before
    rec = Recorder()  # AddNoise's strength rules; a ComfyUI denoise next to it is reported, not mixed in
    again = sd1.img2img("dpmpp_2m", strength=0.0, denoise=0.3, rec=rec)
    assert torch.equal(again["samples"], sd1.init) and "denoise is ignored" in rec.messages[0]
    assert not {"noise", "strength", "seed"} & set(out)


def test_strength_runs_int_steps_times_strength(sd1):
    for strength, evals in ((0.6, 6), (0.25, 2), (1.0, 10), (0.05, 0)):
        rec = Recorder()
        sd1.img2img("euler", steps=10, strength=strength, rec=rec)
        assert len(rec.steps) == evals, strength


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde", "dpmpp_2s_ancestral"])
def test_batch_item_equals_single_run_with_seed_plus_i(sd1, sampler):
    batch = torch.cat([sd1.init, sd1.init * 0.5, -sd1.init])
    out = sd1.img2img(sampler, seed=100, steps=4, latent=batch)["samples"]
    for i in range(3):
        single = sd1.img2img(sampler, seed=100 + i, steps=4, latent=batch[i:i + 1])["samples"]
        assert torch.allclose(out[i:i + 1], single, rtol=1e-4, atol=1e-4), i  # batch-size BLAS rounding only


def test_txt2img_batch_item_equals_single_run(sd1):
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, 64, 64, 2)
    out, = ksampler(rec.ctx, sd1.model, 9, 3, 7.0, "euler_ancestral", "karras", sd1.pos, sd1.neg, empty)
    one, = empty_latent_image(rec.ctx, 64, 64, 1)
    second, = ksampler(rec.ctx, sd1.model, 10, 3, 7.0, "euler_ancestral", "karras", sd1.pos, sd1.neg, one)
    assert torch.allclose(out["samples"][1:], second["samples"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["samples"][0], out["samples"][1], atol=1e-3)


def test_add_noise_draws_per_image_cpu_noise():
    rec = Recorder()
    lat, = add_noise(rec.ctx, ModelHandle("sd1", {}, 0.18215), {"samples": torch.zeros(2, 4, 3, 5)}, 0.3, 11)
    assert lat["strength"] == 0.3 and lat["seed"] == 11 and lat["noise"].shape == (2, 4, 3, 5)
    for i in range(2):
        expect = torch.randn((1, 4, 3, 5), generator=torch.Generator("cpu").manual_seed(11 + i))
        assert torch.equal(lat["noise"][i:i + 1], expect)


# -- every sampler x schedule, in each mode ----------------------------------------------

@pytest.mark.parametrize("index,sampler", list(enumerate(s.name for s in SAMPLERS)))
def test_every_sampler_and_schedule_runs(sd1, index, sampler):
    """Each sampler in each mode (AddNoise's strength, a partial denoise, a full one), each mode on
    another schedule; over all samplers every schedule meets every mode several times (all
    samplers x schedules x modes would take minutes on two cores)."""
    modes = ((0.5, 1.0), (None, 0.6), (None, 1.0))
    for mode, (strength, denoise) in enumerate(modes):
        scheduler = SCHEDULERS[(index + len(SCHEDULERS) // len(modes) * mode) % len(SCHEDULERS)]
        rec = Recorder()
        if strength is None:
            lat = {"samples": sd1.init if denoise < 1 else torch.zeros_like(sd1.init)}
        else:
            lat, = add_noise(rec.ctx, sd1.model, {"samples": sd1.init}, strength, 1)
        out, = ksampler(rec.ctx, sd1.model, 1, 4, 5.0, sampler, scheduler, sd1.pos, sd1.neg, lat, denoise)
        s = out["samples"]
        assert s.shape == sd1.init.shape and torch.isfinite(s).all(), (scheduler, strength, denoise)
        assert rec.steps and rec.steps[-1][0] == rec.steps[-1][1], (scheduler, strength, denoise)


# -- progress, previews, interruption ----------------------------------------------------

def test_progress_every_step_with_a_preview(sdxl):
    rec = Recorder()
    sdxl.img2img("heun", steps=5, strength=1.0, rec=rec)
    assert [s[:2] for s in rec.steps] == [(i, 9) for i in range(1, 10)]  # Heun: 2 evaluations per step but the last
    preview = rec.steps[-1][2]
    assert isinstance(preview, Preview) and preview.mime == "image/jpeg"
    assert preview.data[:2] == b"\xff\xd8" and (preview.width, preview.height) == (8, 8)


def test_interruption_stops_promptly(sd1):
    rec = Recorder(interrupt_after=3)
    before = sd1.unet_calls
    with pytest.raises(Interrupted):
        sd1.img2img("euler", steps=30, strength=1.0, rec=rec)
    assert sd1.unet_calls - before == 3


# -- bad input ---------------------------------------------------------------------------

def test_bad_input_names_the_input(sd1, sdxl):
    rec = Recorder()
    with pytest.raises(NodeError) as err:
        sd1.img2img("k_warp_drive")
    assert err.value.input_name == "sampler_name" and "k_euler" in str(err.value)
    with pytest.raises(NodeError) as err:
        add_noise(rec.ctx, sd1.model, {"samples": sd1.init}, 1.5, 0)
    assert err.value.input_name == "strength"
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, sdxl.model, 0, 2, 7.0, "euler", "normal", [[sdxl.pos[0][0], {}]], sdxl.neg,
                 {"samples": sdxl.init}, 0.5)
    assert err.value.input_name == "positive" and "pooled" in str(err.value)
    with pytest.raises(NodeError) as err:
        ksampler(rec.ctx, sd1.model, 0, 2, 7.0, "euler", "normal", sd1.pos, sd1.neg, {"wrong": 1}, 1.0)
    assert err.value.input_name == "latent_image"


def test_empty_latent_image():
    rec = Recorder()
    lat, = empty_latent_image(rec.ctx, 512, 768, 3)
    assert lat["samples"].shape == (3, 4, 96, 64) and not lat["samples"].any()
    lat, = empty_latent_image(rec.ctx, 500, 64, 1)
    assert lat["samples"].shape == (1, 4, 8, 62) and "496" in rec.messages[0]


def test_node_modules_import_without_torch():
    code = ("import sys, nodes.latent, nodes.sampling, nodes.samplers.plan, nodes.samplers.loop; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_declarations_match_functions():
    from nodes.latent import add_noise as an, empty_latent_image as el
    from nodes.sampling import ksampler as ks

    for spec in (an, el, ks):
        assert spec.signature_mismatches() == []
    assert [i.name for i in ks.inputs] == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                           "positive", "negative", "latent_image", "denoise"]
    assert ks.input("steps").default == 30 and ks.input("cfg").default == 7.0
    assert an.input("strength").extra == {"display": "slider"}


# -- Kiln's own sampler (diffusers has no DPM++ 2S ancestral) -----------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_2s_ancestral_lands_on_the_clean_latent_with_a_perfect_denoiser(prediction):
    """With a model that always predicts the true clean latent, a correct sampler ends
    exactly there, whatever noise it adds on the way."""
    from nodes.samplers.steppers import DPMpp2SAncestral

    ts = schedules.TrainingSchedule(SD15)
    sigmas = schedules.comfy_schedule(ts, "karras", 6)
    stepper = DPMpp2SAncestral({**SD15, "prediction_type": prediction}, sigmas)
    assert len(stepper.timesteps) == 11  # two evaluations per step, one for the last
    stage_sigmas = torch.tensor([s for _, _, s in stepper.stages])
    assert torch.allclose(ts.sigma(stepper.timesteps), stage_sigmas, rtol=1e-3)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    x = x0 + sigmas[0] * torch.randn(1, 4, 8, 8, generator=gen)
    for k, t in enumerate(stepper.timesteps):
        sigma = stepper.stages[k][2]
        if prediction == "epsilon":
            out = (x - x0) / sigma
        else:
            out = (x / (sigma ** 2 + 1) - x0) * (sigma ** 2 + 1) ** 0.5 / sigma
        before = x
        x = stepper.step(out, t, x, generator=[gen]).prev_sample
        assert not torch.equal(x, before)
    assert torch.allclose(x, x0, atol=1e-4)


# -- through the real executor -----------------------------------------------------------

def test_img2img_graph_through_the_executor(sd1, tmp_path):
    """AddNoise -> KSampler in a real job: progress events carry previews, and a new seed
    re-runs only AddNoise and what follows it."""
    from engine import types as T
    from engine.context import Environment
    from engine.executor import Executor
    from engine.node import Input, Output, Result, define_node
    from engine.registry import Registry
    from engine.workflow import parse
    from nodes import latent, sampling

    @define_node("TinyModelSource", outputs=[Output("MODEL", T.MODEL), Output("positive", T.CONDITIONING),
                                             Output("negative", T.CONDITIONING), Output("LATENT", T.LATENT)])
    def source(ctx):
        return (sd1.model, sd1.pos, sd1.neg, {"samples": sd1.init})

    @define_node("LatentMean", output_node=True, inputs=[Input("samples", T.LATENT)])
    def latent_mean(ctx, samples):
        return Result(ui={"mean": [float(samples["samples"].mean())]})

    registry = Registry()
    registry.add_module(latent)
    registry.add_module(sampling)
    registry.add(source)
    registry.add(latent_mean)
    executor = Executor(registry, Environment.for_folder(tmp_path))

    def doc(seed: int) -> dict:
        return {"version": 1, "nodes": {
            "1": {"type": "TinyModelSource", "inputs": {}},
            "2": {"type": "AddNoise", "inputs": {"model": ["1", 0], "latent": ["1", 3], "strength": 0.5, "seed": seed}},
            "3": {"type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 8, "cfg": 7.0,
                                                 "sampler_name": "k_dpmpp_2m", "scheduler": "karras",
                                                 "positive": ["1", 1], "negative": ["1", 2],
                                                 "latent_image": ["2", 0], "denoise": 1.0}},
            "4": {"type": "LatentMean", "inputs": {"samples": ["3", 0]}},
        }}

    events: list = []
    first = executor.run(parse(doc(1)), on_event=events.append)
    assert first.status == "succeeded", first.error
    steps = [e for e in events if type(e).__name__ == "Progress" and e.node_id == "3"]
    assert [(e.value, e.max) for e in steps] == [(i, 4) for i in range(1, 5)]
    assert all(isinstance(e.preview, Preview) for e in steps)
    second = executor.run(parse(doc(2)))
    assert sorted(second.executed) == ["2", "3", "4"] and "1" in second.cached
    assert second.outputs["4"]["mean"] != first.outputs["4"]["mean"]

    # Nobody watching (kiln run, a server job without a preview method): the same steps and
    # result, and no preview is made at all.
    from engine.context import JobInfo

    quiet: list = []
    third = executor.run(parse(doc(1)), force=True, on_event=quiet.append,
                         job=JobInfo(id="quiet", previews=False))
    assert third.outputs["4"] == first.outputs["4"]
    steps = [e for e in quiet if type(e).__name__ == "Progress" and e.node_id == "3"]
    assert [(e.value, e.max) for e in steps] == [(i, 4) for i in range(1, 5)]
    assert all(e.preview is None for e in steps)


# -- issue 15: ComfyUI's other schedules and the samplers diffusers lacks --------------------

def test_comfy_schedules_follow_comfyui_formulas():
    ts = schedules.TrainingSchedule(SD15)
    sig = ts.sigmas
    ddim = schedules.comfy_schedule(ts, "ddim_uniform", 20)  # every 50th training sigma from index 1
    assert ddim.tolist() == pytest.approx([float(sig[i]) for i in range(951, 0, -50)] + [0.0], rel=1e-6)
    kl = schedules.comfy_schedule(ts, "kl_optimal", 10)
    assert kl[0] == pytest.approx(ts.sigma_max, rel=1e-5) and kl[-2] == pytest.approx(ts.sigma_min, rel=1e-5)
    atans = torch.atan(kl[:-1].double())
    assert torch.allclose(atans[1:] - atans[:-1], (atans[1] - atans[0]).expand(9), rtol=1e-4)  # even in arctan
    lq = schedules.comfy_schedule(ts, "linear_quadratic", 10)
    assert len(lq) == 11 and lq[0] == pytest.approx(ts.sigma_max) and lq[-1] == 0
    # the linear half: 0.025 / 5 of sigma_max per step
    assert (lq[:5] - lq[1:6]).tolist() == pytest.approx([ts.sigma_max * 0.005] * 5, rel=1e-4)
    beta = schedules.comfy_schedule(ts, "beta", 20)
    assert beta[0] == pytest.approx(ts.sigma_max) and beta[-1] == 0 and bool((beta[:-1] > beta[1:]).all())
    steps_near_ends = (beta[:3] - beta[1:4]).abs().mean(), (beta[8:11] - beta[9:12]).abs().mean()
    assert len(beta) <= 21 and steps_near_ends[0] > steps_near_ends[1]  # dense at both ends in t, coarse sigma at top
    for name in ("ddim_uniform", "beta", "linear_quadratic", "kl_optimal"):
        tail = schedules.comfy_sigmas(ts, name, 10, denoise=0.5)
        assert len(tail) == 11 and tail[-1] == 0 and tail[0] < ts.sigma_max


def _perfect(model_in, sigma, x0, prediction):
    """What an ideal model predicts for a VP input at ``sigma`` whose clean latent is x0."""
    alpha = (1 + sigma ** 2) ** -0.5
    eps = (model_in - alpha * x0) / (alpha * sigma)
    return eps if prediction == "epsilon" else alpha * eps - sigma * alpha * x0


@pytest.mark.parametrize("sampler", ["lcm", "ddpm", "ipndm", "res_multistep", "dpm_fast", "dpmpp_2m", "uni_pc_bh2",
                                     "deis", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "heunpp2", "ipndm_v",
                                     "gradient_estimation", "gradient_estimation_cfg_pp", "dpmpp_2m_cfg_pp",
                                     "res_multistep_cfg_pp", "exp_heun_2_x0"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_samplers_on_a_sigma_list_land_on_the_clean_latent_with_a_perfect_denoiser(sampler, prediction):
    """On ComfyUI's grids every sampler runs on a sigma list (Kiln's steppers, or diffusers'
    multistep solvers whose state is variance-preserving: steppers.to_state). With a model
    that predicts the true clean latent, each must end there from x0 + sigma0 * noise."""
    from nodes.samplers import steppers

    config = {**SD15, "prediction_type": prediction}
    ts = schedules.TrainingSchedule(config)
    sigmas = schedules.comfy_sigmas(ts, "karras", 8)
    sched = steppers.on_sigmas(resolve_sampler(sampler), config, sigmas)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    noised = x0 + float(sigmas[0]) * noise
    x = steppers.to_state(sched, noised, float(sigmas[0]))
    # What the UNet sees first is the noised latent in VP scale, whatever space the sampler steps in.
    first_in = sched.scale_model_input(x, sched.timesteps[0])
    assert torch.allclose(first_in, noised / (1 + float(sigmas[0]) ** 2) ** 0.5, atol=1e-5)
    import inspect

    kwargs = {"generator": [gen]} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        out = _perfect(model_in, float(ts.sigma(t)), x0, prediction)
        x = sched.step(out, t, x, return_dict=True, **kwargs).prev_sample
    # diffusers' DEIS and ComfyUI's dpm_fast end on the smallest nonzero sigma (0.029 here), not 0:
    # the leftover is that sigma times the noise (|noise| < 5), the same with any number of steps.
    tolerance = 0.03 * 5 if sampler in ("deis", "dpm_fast") else 2e-2
    assert torch.allclose(x, x0, atol=tolerance), (x - x0).abs().max()
    if sampler == "dpm_fast":  # exact on this denoiser: every stage formula must be right to land there
        assert torch.allclose(x, x0 + float(sigmas[-2]) * noise, atol=1e-4)
