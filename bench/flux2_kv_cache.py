"""What FluxKVCache saves: a FLUX.2 [klein]-shaped transformer editing with reference images, every
network call with the references' tokens (the plain klein edit) against the KV path (the first
call computes the references' keys and values, the later ones feed only the image tokens).

    # this machine (CPU): klein 4B's width, reduced depth, 512 px, one reference, fp32
    PYTHONPATH=. python bench/flux2_kv_cache.py
    # a lent GPU: klein 4B's full depth (5 double + 20 single blocks) with random weights, bf16
    PYTHONPATH=. python bench/flux2_kv_cache.py --full-size --device cuda

Both paths run through Kiln's own network wrapper (nodes.families.flux2.Flux2Network) and
nodes.families.reference_kv, interleaved round by round; the machine's load is recorded with each
round and rounds started above one runnable process per core are marked contended. Prints one
JSON line: median seconds of a plain call, of the KV path's first call and of its later calls, and
the whole ``--steps`` run of each with their ratio. The two paths are different models of the
references (causal against full attention), so their outputs are not compared here; their
equality with diffusers' pipelines is tested in tests/test_flux2.py and tests/test_flux_kv_cache.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

#: FLUX.2 [klein] 4B's transformer (its diffusers config).
KLEIN_4B = dict(num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=7680, in_channels=128, out_channels=None, axes_dims_rope=(32, 32, 32, 32),
                guidance_embeds=False)


def _build(config: dict, device: str, dtype):
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = Flux2Transformer2DModel(**config)
    return model.to(dtype).eval().requires_grad_(False)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _run(net, x, text, refs, steps: int, device: str, cached: bool) -> list[float]:
    """Seconds of each of ``steps`` calls, the first one included."""
    import torch

    from nodes.families import reference_kv

    times = []
    with torch.inference_mode(), reference_kv.applied(net.transformer, cached):
        for i in range(steps):
            _sync(device)
            start = time.perf_counter()
            out = net(x, 1000.0 * (1 - i / steps), text, reference_latents=refs)[0]
            _sync(device)
            times.append(time.perf_counter() - start)
            x = x - 0.05 * out
    return times


def main() -> None:
    import torch

    from nodes.families.flux2 import Flux2Network
    from nodes.families.flux_references import References

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="klein 4B's 5 double and 20 single blocks")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image and reference side in pixels")
    parser.add_argument("--references", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512, help="text tokens (klein pads to 512)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    config = dict(KLEIN_4B)
    if not args.full_size:
        config.update(num_layers=args.double, num_single_layers=args.single)
    net = Flux2Network(_build(config, device, dtype))
    side = args.size // 16
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 128, side, side, device=device, dtype=dtype, generator=gen)
    text = torch.randn(1, args.tokens, config["joint_attention_dim"], device=device, dtype=dtype, generator=gen)
    refs = References(tuple(torch.randn(1, 128, side, side, device=device, dtype=dtype, generator=gen)
                            for _ in range(args.references)), "index")
    _run(net, x, text, refs, 1, device, False)  # warm-up: kernels and allocators
    plain, first, later, loads = [], [], [], []
    for _ in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        plain.append(_run(net, x, text, refs, args.steps, device, False))
        kv = _run(net, x, text, refs, args.steps, device, True)
        first.append(kv[0])
        later.extend(kv[1:])
    plain_run = statistics.median(sum(r) for r in plain)
    kv_run = statistics.median(f + sum(later[i * (args.steps - 1):(i + 1) * (args.steps - 1)])
                               for i, f in enumerate(first))
    cores = os.cpu_count() or 1
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "double_blocks": config["num_layers"], "single_blocks": config["num_single_layers"],
        "size": args.size, "references": args.references, "image_tokens": side * side, "text_tokens": args.tokens,
        "steps": args.steps, "rounds": args.rounds, "load_1min": loads,
        "contended_rounds": sum(load > cores for load in loads),
        "plain_call_s": round(statistics.median(t for r in plain for t in r), 3),
        "kv_first_call_s": round(statistics.median(first), 3),
        "kv_later_call_s": round(statistics.median(later), 3),
        "plain_run_s": round(plain_run, 3), "kv_run_s": round(kv_run, 3),
        "kv_over_plain": round(kv_run / plain_run, 3)}))


if __name__ == "__main__":
    main()
