"""A latent that turns NaN or infinite stops the sampler with an error naming the model, the step and the dtype.

Half precision overflows for some models (float16 on a GPU: Qwen-Image, HiDream, some fine-tunes); what
the user saw before was a black image and no reason. The tiny SD 1.5 here has its first convolution scaled
by 1e6: in float32 its activations stay finite (the norms after it bring them back), in float16 (forced
with ``--precision fp16``; the CPU computes it too) they overflow to infinity and the latent becomes NaN.
The same file and settings in float32 sample to a finite latent, so the check is what tells them apart.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny_models
from engine.context import Environment, JobInfo, NodeContext, NodeError, Paths
from node_call import Called, call
from nodes import custom_sampling, loaders, text
from nodes.runtime.models import ModelManager
from nodes.sampling import ksampler

NAME = "tiny-sd1-overflowing.safetensors"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_NAME = "tiny-sd1-overflowing-vae.safetensors"
VAE_CONV_IN = "first_stage_model.decoder.conv_in.weight"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_models_dir) -> Path:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("diverging-models")
    (root / "checkpoints").mkdir()
    state = load_file(str(Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sd1")))
    save_file({**state, CONV_IN: state[CONV_IN] * 1e6}, str(root / "checkpoints" / NAME))
    save_file({**state, VAE_CONV_IN: state[VAE_CONV_IN] * 1e6}, str(root / "checkpoints" / VAE_NAME))
    return root


def _loaded(models_root: Path, tmp_path: Path, mode: str, name: str = NAME):
    manager = ModelManager(device="cpu", precision=mode)
    env = Environment(paths=Paths.under(tmp_path / mode, models=models_root), models=manager)
    model, clip, _ = call(loaders.checkpoint_loader, env, ckpt_name=name)
    (pos,) = call(text.clip_text_encode, env, text="a red barn", clip=clip)
    (neg,) = call(text.clip_text_encode, env, text="blurry", clip=clip)
    return manager, env, model, pos, neg


def _ksampler(env, model, pos, neg):
    return call(ksampler, env, model=model, seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)


def test_in_float32_the_scaled_model_samples_to_a_finite_latent(models_root, tmp_path):
    manager, env, model, pos, neg = _loaded(models_root, tmp_path, "fp32")
    try:
        (out,) = _ksampler(env, model, pos, neg)
        assert torch.isfinite(out["samples"]).all()
    finally:
        manager.unload_all(collect=False)


@pytest.mark.parametrize("previews", [True, False])
def test_in_float16_ksampler_stops_naming_the_model_the_step_and_the_dtype(models_root, tmp_path, previews):
    """With previews each step's report checks the latent (stopping at the first step that shows it); a job
    nobody watches is checked once after the last step."""
    manager, env, model, pos, neg = _loaded(models_root, tmp_path, "fp16")
    rec = Called()
    ctx = NodeContext(env=env, job=JobInfo(id="test", previews=previews), node_id="1", node_type="KSampler",
                      _progress=lambda v, m, p=None: rec.progress.append((v, m)), _is_interrupted=lambda: False,
                      _message=rec.messages.append)
    try:
        with pytest.raises(NodeError) as info:
            ksampler.fn(ctx, model=model, seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                        positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    finally:
        manager.unload_all(collect=False)
    assert info.value.input_name == "model"
    message = str(info.value)
    assert f"NaN or infinite by step {1 if previews else 3} of 3" in message, message
    assert "computing in float16" in message and "--precision bf16 or fp32" in message
    assert rec.progress == ([] if previews else [(1, 3), (2, 3), (3, 3)])  # stopped before reporting step 1


def test_sampler_custom_advanced_names_its_guider_input(models_root, tmp_path):
    manager, env, model, pos, neg = _loaded(models_root, tmp_path, "fp16")
    try:
        (guider,) = call(custom_sampling.cfg_guider, env, model=model, positive=pos, negative=neg, cfg=5.0)
        (noise,) = call(custom_sampling.random_noise, env, noise_seed=3)
        (sampler,) = call(custom_sampling.ksampler_select, env, sampler_name="euler")
        (sigmas,) = call(custom_sampling.basic_scheduler, env, model=model, scheduler="normal", steps=3, denoise=1.0)
        with pytest.raises(NodeError) as info:
            call(custom_sampling.sampler_custom_advanced, env, noise=noise, guider=guider, sampler=sampler,
                 sigmas=sigmas, latent_image={"samples": torch.zeros(1, 4, 8, 8)})
    finally:
        manager.unload_all(collect=False)
    assert info.value.input_name == "guider" and "NaN or infinite" in str(info.value)


def test_vae_decode_refuses_a_diverged_latent_and_names_a_vae_that_overflows(models_root, tmp_path):
    from nodes.vae import vae_decode

    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    decoded = {}
    for mode in ("fp32", "fp16"):
        manager = ModelManager(device="cpu", precision=mode)
        env = Environment(paths=Paths.under(tmp_path / mode, models=models_root), models=manager)
        try:
            _, _, vae = call(loaders.checkpoint_loader, env, ckpt_name=VAE_NAME)
            try:
                decoded[mode] = call(vae_decode, env, samples=latent, vae=vae)[0]
            except NodeError as exc:
                decoded[mode] = exc
            with pytest.raises(NodeError) as info:
                call(vae_decode, env, samples={"samples": torch.full((1, 4, 8, 8), float("nan"))}, vae=vae)
            assert info.value.input_name == "samples" and "diverged" in str(info.value)
        finally:
            manager.unload_all(collect=False)
    assert torch.isfinite(decoded["fp32"]).all()  # the same weights hold in float32
    assert isinstance(decoded["fp16"], NodeError) and decoded["fp16"].input_name == "vae"
    assert "overflow in float16" in str(decoded["fp16"])
