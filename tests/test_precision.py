"""``--precision``: the dtype models compute in (nodes.runtime.precision).

bf16 on the CPU is a real choice on CPUs that multiply it natively (Intel AMX): the tiny SD 1.5
loads, samples and decodes in bfloat16 there, close to float32 but not equal to it (so bf16 really
ran). The suggestion in the loaders' messages appears only where ``auto`` left such a CPU in float32.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tiny_models
from engine.context import Environment, Paths, Settings
from node_call import Called, call
from nodes import loaders
from nodes.runtime import precision
from nodes.runtime.models import ModelManager
from nodes.sampling import ksampler


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_models_dir) -> Path:
    root = tmp_path_factory.mktemp("precision-models")
    (root / "checkpoints").mkdir()
    name = tiny_models.checkpoint_name("sd1")
    shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / name, root / "checkpoints" / name)
    return root


def _sample(models_root: Path, tmp_path: Path, mode: str) -> tuple[torch.Tensor, torch.Tensor, Called]:
    """(the sampled latent, its decoded image, the loader's messages) with a CPU manager in ``mode``."""
    manager = ModelManager(device="cpu", precision=mode)
    env = Environment(paths=Paths.under(tmp_path / mode, models=models_root), models=manager)
    rec = Called()
    try:
        model, clip, vae = call(loaders.checkpoint_loader, env, rec, ckpt_name=tiny_models.checkpoint_name("sd1"))
        with model.unet() as unet:
            assert {p.dtype for p in unet.parameters()} == {manager.dtype}
        from nodes import text, vae as vae_nodes

        (pos,) = call(text.clip_text_encode, env, text="a red barn", clip=clip)
        (neg,) = call(text.clip_text_encode, env, text="blurry", clip=clip)
        (out,) = call(ksampler, env, model=model, seed=3, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal",
                      positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
        (image,) = call(vae_nodes.vae_decode, env, samples=out, vae=vae)
        return out["samples"], image, rec
    finally:
        manager.unload_all(collect=False)


def test_bf16_on_the_cpu_samples_in_bf16_close_to_float32(models_root, tmp_path):
    latent32, image32, _ = _sample(models_root, tmp_path, "fp32")
    latent16, image16, _ = _sample(models_root, tmp_path, "bf16")
    assert latent16.dtype == torch.float32 and torch.isfinite(image16).all()  # results leave in float32
    gap = (latent16 - latent32).abs().max()
    assert 0 < gap < 0.1 * latent32.abs().max(), gap  # bf16 really ran, and stayed close
    assert (image16 - image32).abs().max() < 0.1


def test_auto_is_float32_on_the_cpu_and_float16_on_a_gpu():
    assert precision.dtype_for("auto", gpu=False) is torch.float32
    assert precision.dtype_for("auto", gpu=True) is torch.float16
    assert precision.dtype_for("bf16", gpu=False) is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        ModelManager(precision="fp8")


def test_the_precision_switch_reaches_the_model_manager():
    from engine.cli import build_parser, compile_from_args

    for command in (["serve"], ["run", "wf.json"]):
        assert ModelManager.for_settings("cpu", compile_from_args(build_parser().parse_args(command),
                                                                  Settings())).dtype is torch.float32
        args = build_parser().parse_args([*command, "--precision", "bf16"])
        assert ModelManager.for_settings("cpu", compile_from_args(args, Settings())).dtype is torch.bfloat16


def test_native_bf16_is_read_from_the_cpu_flags_and_suggested_only_where_auto_left_fp32(tmp_path, monkeypatch):
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert precision.cpu_has_native_bf16(str(amx)) and not precision.cpu_has_native_bf16(str(avx2))
    assert not precision.cpu_has_native_bf16(str(tmp_path / "absent"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert "--precision bf16" in precision.note("auto", gpu=False)
    assert precision.note("fp32", gpu=False) == precision.note("auto", gpu=True) == ""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.note("auto", gpu=False) == ""


def test_the_checkpoint_loader_says_what_bf16_would_give(models_root, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    manager = ModelManager(device="cpu")
    env = Environment(paths=Paths.under(tmp_path / "data", models=models_root), models=manager)
    rec = Called()
    call(loaders.checkpoint_loader, env, rec, ckpt_name=tiny_models.checkpoint_name("sd1"))
    manager.unload_all(collect=False)
    assert "--precision bf16" in rec.messages[0], rec.messages
