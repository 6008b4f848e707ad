"""Peak resident memory and time while loading a full-size FLUX transformer file, whole or straight into blocks on disk.

    # once: a released-shape [dev] transformer (19 double + 38 single blocks) in ComfyUI's fp8 layout
    # (BFL keys, float8_e4m3fn linear weights, bf16 norms and biases; random values): about 12 GB
    PYTHONPATH=. python bench/flux_load_memory.py --write /path/flux1-dev-fp8-random.safetensors
    # each mode in its own process: "disk" (--offload on: built block by block into files on disk)
    # and "whole" (--offload off: built whole in RAM, what Kiln did before)
    PYTHONPATH=. python bench/flux_load_memory.py --load /path/flux1-dev-fp8-random.safetensors \\
        --mode disk --offload-folder /path/blocks
    PYTHONPATH=. python bench/flux_load_memory.py --load /path/... --mode whole

The file is written tensor by tensor (safetensors' layout: a JSON header, then the raw bytes), so
writing needs no more memory than the largest tensor. Loading goes through Kiln's real path: a
ModelManager (``offload_mode`` on/off) and UNETLoader's loader on the CPU (fp32 compute; fp8 linear
weights kept fp8). Reports one JSON line: ``peak_load_gb`` (the process's RSS high-water mark from
just before the load, Linux /proc/self/clear_refs), ``rss_after_gb``, ``load_s``, the held bytes the
manager counts and the file's size. The page cache is not process memory: a file read twice is
served from it while the host has room.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write(path: Path, double: int, single: int) -> None:
    """The released [dev] transformer's BFL keys and shapes, fp8 linear weights, random values, streamed."""
    import torch
    from diffusers import FluxTransformer2DModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flux_memory import RELEASED

    from nodes.checkpoint.flux_keys import diffusers_to_bfl

    with torch.device("meta"):
        net = FluxTransformer2DModel(**dict(RELEASED, num_layers=double, num_single_layers=single))
        shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(net.state_dict()).items()}
    header, offset, order = {}, 0, []
    for key in sorted(shapes):
        shape = shapes[key]
        fp8 = len(shape) == 2 and key.endswith(".weight")
        n = 1
        for s in shape:
            n *= s
        size = n * (1 if fp8 else 2)
        header["model.diffusion_model." + key] = {"dtype": "F8_E4M3" if fp8 else "BF16", "shape": list(shape),
                                                  "data_offsets": [offset, offset + size]}
        order.append((key, shape, fp8))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, fp8 in order:
            t = torch.randn(shape, generator=g) * 0.02
            t = t.to(torch.float8_e4m3fn) if fp8 else t.to(torch.bfloat16)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
    print(json.dumps({"written": str(path), "bytes": path.stat().st_size}))


def load(path: Path, mode: str, folder: str | None) -> None:
    import functools
    import gc

    import diffusers  # noqa: F401 - imported before the measurement, as a server has them
    import torch  # noqa: F401

    from nodes.runtime.models import ModelManager, file_key
    from nodes.runtime.offload import offloaded
    from nodes.split_loaders import _load_unet

    manager = ModelManager(device="cpu", offload_mode="on" if mode == "disk" else "off", offload_folder=folder)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts at the current RSS
    before, start = _rss("VmRSS"), time.perf_counter()
    loaded = manager.acquire(file_key(path, "unet"), functools.partial(_load_unet, path))
    seconds = time.perf_counter() - start
    net = loaded.modules["unet"]
    info = offloaded(net)
    gb = 1024**3
    print(json.dumps({"mode": mode, "file_gb": round(path.stat().st_size / gb, 2),
                      "rss_before_gb": round(before / gb, 2), "peak_load_gb": round(_rss("VmHWM") / gb, 2),
                      "rss_after_gb": round(_rss("VmRSS") / gb, 2), "load_s": round(seconds, 1),
                      "held_gb": round(manager.stats()["bytes"] / gb, 2), "paged": bool(info and info.paged),
                      "load_average": os.getloadavg()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--double", type=int, default=19, help="double blocks written (released: 19)")
    parser.add_argument("--single", type=int, default=38, help="single blocks written (released: 38)")
    parser.add_argument("--mode", choices=["disk", "whole"], default="disk")
    parser.add_argument("--offload-folder", default=None)
    args = parser.parse_args()
    if args.write:
        write(args.write, args.double, args.single)
    if args.load:
        load(args.load, args.mode, args.offload_folder)


if __name__ == "__main__":
    main()
