"""Compiled mode (nodes.runtime.compiled): the rule, in-place compilation the LoRA patches still see,
the first-job note, and compiled code equal to eager and reused from disk by a second process.

Inductor needs minutes to compile even the tiny test UNet on this project's two
contended cores, so the numerical check compiles a small block of the same kinds
of layers (convolution, group norm, SiLU, attention through SDPA) instead; the
full-size comparison is the benchmark's (bench/img2img_vs_diffusers.py --compile).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.runtime.compiled import check_mode, compile_in_place, is_compiled, should_compile
from nodes.runtime.models import ModelManager

REPO = Path(__file__).resolve().parents[1]


def test_the_rule() -> None:
    assert should_compile("auto", "cuda:0") and not should_compile("auto", "cpu")
    assert should_compile("on", "cpu") and not should_compile("off", "cuda")
    with pytest.raises(ValueError, match="auto, on, off"):
        check_mode("fast")


def test_manager_compiles_denoiser_and_decoder_in_place_keeping_names() -> None:
    import torch

    class Vae(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    unet, vae, text = torch.nn.Linear(3, 3), Vae(), torch.nn.Linear(4, 4)
    names = [n for n, _ in unet.named_parameters()]
    manager = ModelManager(device="cpu", compile_mode="on")
    key = ("checkpoint", "x", 0, 0)
    loader = lambda m: {"unet": unet, "vae": vae, "text_encoder": text}  # noqa: E731
    manager.acquire(key, loader)
    note = manager.compile_pending(key, "unet")
    assert note and "compiling the denoiser for cpu" in note
    with manager.use(key, "unet", loader) as used, manager.use(key, "vae", loader), manager.use(key, "text_encoder", loader):
        assert used is unet  # the same module object: handles and patches keep working
    assert is_compiled(unet, "unet") and is_compiled(vae, "vae") and not is_compiled(text, "text_encoder")
    assert not getattr(vae.encoder, "_kiln_compiled", False)
    assert [n for n, _ in unet.named_parameters()] == names  # LoRA keys still match
    assert manager.compile_pending(key, "unet") is None  # said once
    assert ModelManager(device="cpu", compile_mode="auto").compile_pending(key, "unet") is None
    assert not ModelManager(device="cpu").compiles()  # scripts and tests: eager unless asked


PROBE = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from nodes.runtime.compiled import compile_in_place, use_cache_dir

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(h + a.transpose(1, 2).reshape(b, c, hh, ww))

torch.manual_seed(0)
use_cache_dir(sys.argv[1])
block = Block().eval()
x = torch.randn(1, 4, 8, 8)
with torch.inference_mode():
    eager = block(x)
    compile_in_place(block, "unet")
    compiled = block(x)
    with torch.no_grad():  # a LoRA-style in-place patch is seen by the compiled code
        block.out.bias.add_(1.0)
    patched = block(x)
print(json.dumps({"diff": (compiled - eager).abs().max().item(), "patched": (patched - eager - 1).abs().max().item(),
                  "inductor": dict(counters["inductor"])}))
"""


def test_compiled_equals_eager_and_a_second_process_reuses_the_disk_cache(tmp_path: Path) -> None:
    cache = tmp_path / "data" / "compiled"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(cache)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["diff"] <= 1e-5 and second["diff"] <= 1e-5  # far inside 1/255 of a pixel
    assert first["patched"] <= 1e-5  # weights stay inputs of the compiled code
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1  # the restart compiled nothing anew
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert any(cache.rglob("*")), "compiled code is kept in the data folder"
