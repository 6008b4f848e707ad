"""Run as a script: load model files one after another and print each load's peak resident memory.

    python tests/load_memory_probe.py KIND:PATH:DTYPE ...   (KIND: checkpoint | unet)

Prints one JSON line: per load, ``extra`` = the peak resident set during the load
minus the resident set right after it (bytes held only while loading) and
``weights`` = the loaded modules' bytes. The peak is reset before each load through
/proc/self/clear_refs (Linux), so loads do not see each other's peaks.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _load(kind: str, path: Path, dtype):
    if kind == "unet":
        from nodes.checkpoint.split import load_unet_file

        return load_unet_file(path, dtype)
    from nodes.checkpoint.load import load_checkpoint

    return load_checkpoint(path, dtype)


def main(specs: list[str]) -> None:
    import diffusers  # noqa: F401 - imported before the first measurement, as a server has them
    import torch
    import transformers  # noqa: F401

    from engine.allocator import return_large_frees
    from nodes.checkpoint.load import quiet_progress

    # As every model process does (engine.allocator): without it, glibc's mmap threshold rises with
    # each large block freed, so how much a load's freed buffers stay resident depends on what ran
    # before (one fresh-clone run saw 124 MiB "extra" on a load that holds none), not on the load.
    return_large_frees()
    quiet_progress()
    results = []
    for spec in specs:
        kind, path, dtype_name = spec.split(":")
        dtype = getattr(torch, dtype_name)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        loaded = _load(kind, Path(path), dtype)
        peak, after = _status()["VmHWM"], _status()["VmRSS"]
        weights = sum(t.numel() * t.element_size() for m in loaded.modules.values()
                      for t in list(m.parameters()) + list(m.buffers()))
        results.append({"load": spec, "extra": peak - after, "weights": weights,
                        "unet_dtype": str(loaded.modules["unet"].dtype)})
        del loaded
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
