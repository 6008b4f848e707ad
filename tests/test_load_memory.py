"""Loading never holds two copies of a weight set.

A model of ~80 M parameters (the tiny SD 1.x with a 320/640-wide UNet: 310 MB in
fp32) is saved as an fp16 single file (a common download; the CPU upcasts it to
fp32), an fp32 single file loaded in fp16 (the GPU case), an fp32 diffusers folder
loaded in fp16, and an fp16 UNet alone (UNETLoader). Each is loaded in a fresh
process that reports the peak resident memory of the load above what remains held
after it. Reading the whole file and then converting it (what Kiln did before, and
``from_pretrained`` followed by ``.to()``) keeps the source tensors alive next to the
converted ones: an extra of half the weights (fp16 -> fp32) to twice the weights
(fp32 -> fp16). Reading and casting tensor by tensor leaves about one tensor.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from nodes.checkpoint import load

REPO = Path(__file__).resolve().parents[1]
#: Bytes a load may hold beyond its result, as a share of the result: above the largest
#: tensors (15 MB here), far below the 50-200 % of a second copy.
EXTRA_SHARE = 0.2


def _moderate_parts():
    from diffusers import UNet2DConditionModel

    from nodes.checkpoint.tiny import WIDTH, build_components, family_of

    parts = build_components("sd1")
    family = family_of("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        parts["unet"] = UNet2DConditionModel(
            **dict(family.unet_defaults(), sample_size=8, in_channels=4, out_channels=4, layers_per_block=1),
            block_out_channels=(320, 640), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH,
            attention_head_dim=family.unet_heads([320, 640])).eval()
    return parts


@pytest.fixture(scope="module")
def moderate_files(tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("moderate")
    parts = _moderate_parts()
    files = {"half": tm.save_single_file("sd1", root / "half.safetensors", half=True, parts=parts),
             "full": tm.save_single_file("sd1", root / "full.safetensors", parts=parts),
             "folder": tm.save_diffusers("sd1", root / "folder", parts=parts)}
    unet = {k[len("model.diffusion_model."):]: v for k, v in load.read_state_dict(files["half"]).items()
            if k.startswith("model.diffusion_model.")}
    save_file(unet, str(root / "unet-half.safetensors"))
    files["unet"] = root / "unet-half.safetensors"
    return files


def test_loads_hold_about_one_weight_set(moderate_files):
    specs = [f"checkpoint:{moderate_files['half']}:float32", f"checkpoint:{moderate_files['full']}:float16",
             f"checkpoint:{moderate_files['folder']}:float16", f"unet:{moderate_files['unet']}:float32"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "load_memory_probe.py"), *specs], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["unet_dtype"] for r in results] == ["torch.float32", "torch.float16", "torch.float16", "torch.float32"]
    assert min(r["weights"] for r in results) > 150 * 2**20  # a weight set large enough to measure
    for r in results:
        assert r["extra"] <= EXTRA_SHARE * r["weights"], (
            f"{r['load']}: the load held {r['extra'] / 2**20:.0f} MiB beyond its {r['weights'] / 2**20:.0f} MiB "
            "of weights (a second copy)")


def test_fp32_file_loaded_in_fp16_equals_the_cast_file(tiny_models_dir):
    """Casting while reading gives exactly the file's values cast (as a whole-file cast did)."""
    path = tiny_models_dir / "checkpoints" / tm.checkpoint_name("sd1")
    loaded = load.load_checkpoint(path, torch.float16)
    src = tm.components("sd1")
    assert loaded.modules["unet"].dtype == torch.float16
    for name in ("unet", "vae", "text_encoder"):
        dtype = loaded.modules[name].dtype  # a VAE with force_upcast stays fp32
        want = src[name].state_dict()
        got = loaded.modules[name].state_dict()
        assert all(torch.equal(got[k], want[k].to(dtype)) for k in want if not k.endswith("position_ids")), name
