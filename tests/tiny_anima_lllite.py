"""Tiny random Anima LLLite files (kohya-ss's v2 named-key layout, ComfyUI's reader's facts) for tests/test_anima_lllite.py.

API:
    state(channels) -> the file's tensors for the tiny Anima DiT (tests/tiny_cosmos.py: 32 wide, 2 blocks), every
                       target on every block, one residual block and an ASPP with dilations 1 and 2.
    METADATA[channels] -> the file's metadata (the inpainting file zeroes the masked picture).
    make_files(root)   -> model_patches/ with the templates' two names and a file for another width.
"""
from __future__ import annotations

from pathlib import Path

import tiny_cosmos

WIDTH, EMB, HIDDEN = 16, 8, 8
TARGETS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "cross_attn_q_proj", "mlp_layer1")
METADATA = {3: {"lllite.version": "2", "lllite.aspp_dilations": "1,2"},
            4: {"lllite.version": "2", "lllite.aspp_dilations": "1,2", "lllite.inpaint_masked_input": "true"}}
#: The files ComfyUI's two LLLite templates load.
ANY_CONTROL, INPAINTING = "anima-lllite-any-test-like-v2.safetensors", "anima-lllite-inpainting-v2.safetensors"


def state(channels: int = 3, dim: int = tiny_cosmos.HIDDEN, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed + channels)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    c = "lllite_conditioning1."
    half = WIDTH // 2
    out = {c + "conv1.weight": r(half, channels, 4, 4), c + "conv1.bias": r(half),
           c + "conv2.weight": r(half, half, 3, 3), c + "conv2.bias": r(half),
           c + "conv3.weight": r(WIDTH, half, 4, 4), c + "conv3.bias": r(WIDTH),
           c + "proj.weight": r(EMB, WIDTH, 1, 1), c + "proj.bias": r(EMB),
           c + "out_norm.weight": 1 + r(EMB), c + "out_norm.bias": r(EMB)}
    norms = ["norm1", "norm2", "norm3", "resblocks.0.norm1", "resblocks.0.norm2", "aspp.branches.0.1",
             "aspp.branches.1.1", "aspp.global_conv.1", "aspp.proj.1"]
    for n, ch in zip(norms, [half, half] + [WIDTH] * 7):
        out[c + n + ".weight"], out[c + n + ".bias"] = 1 + r(ch), r(ch)
    for n, (cin, k) in {"resblocks.0.conv1": (WIDTH, 3), "resblocks.0.conv2": (WIDTH, 3),
                        "aspp.branches.0.0": (WIDTH, 1), "aspp.branches.1.0": (WIDTH, 3),
                        "aspp.global_conv.0": (WIDTH, 1), "aspp.proj.0": (3 * WIDTH, 1)}.items():
        out[c + n + ".weight"], out[c + n + ".bias"] = r(WIDTH, cin, k, k), r(WIDTH)
    for block in range(tiny_cosmos.LAYERS):
        for target in TARGETS:
            m = f"lllite_dit_blocks_{block}_{target}."
            out.update({m + "down.weight": r(HIDDEN, dim), m + "down.bias": r(HIDDEN),
                        m + "mid.weight": r(HIDDEN, HIDDEN + EMB), m + "mid.bias": r(HIDDEN),
                        m + "cond_to_film.weight": r(2 * HIDDEN, EMB), m + "cond_to_film.bias": r(2 * HIDDEN),
                        m + "up.weight": r(dim, HIDDEN, scale=0.5), m + "up.bias": r(dim), m + "depth_embed": r(EMB)})
    return out


def make_files(root: Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(root) / "model_patches"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state(3), str(folder / ANY_CONTROL), metadata=METADATA[3])
    save_file(state(4), str(folder / INPAINTING), metadata=METADATA[4])
    save_file(state(3, dim=48), str(folder / "anima-lllite-other-width.safetensors"), metadata=METADATA[3])
    return root
