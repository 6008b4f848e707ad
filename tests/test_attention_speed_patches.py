"""HyperTile (nodes/families/hypertile.py) and TomePatchModel (nodes/families/tome.py) on the tiny
SD1 (self-attention at the latent's size in down_blocks.0, at half of it in the middle block and
up_blocks.1).

The tiled self-attention is checked against attention written out tile by tile, head by head,
on an input recorded from a real UNet pass, the merged one against token merging written out
from its definition; a tiling of 1 x 1 and a ratio of 0 must leave the run bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.context import NodeError
from nodes.families import hypertile as ht
from nodes.latent import empty_latent_image
from nodes.sampling import ksampler
from nodes.speed_patches import hypertile
from test_sampling import Recorder, sd1, sdxl  # noqa: F401 (fixtures)


def _run(tiny, model, size: int = 256, steps: int = 2) -> torch.Tensor:
    rec = Recorder()
    empty, = empty_latent_image(rec.ctx, size, size, 1)
    out, = ksampler(rec.ctx, model, 5, steps, 6.0, "euler", "normal", tiny.pos, tiny.neg, empty)
    return out["samples"]


def _processors(tiny) -> dict:
    return {n: m.processor for n, m in tiny.parts["unet"].named_modules() if n.endswith("attn1")}


def test_a_one_by_one_tiling_is_the_unet_as_it_was(sd1):
    """256 px: the 32 x 32 latent is no larger than the default tile (256 // 8 = 32), and a
    tile of 2048 px covers every depth: one tile, the UNet's own attention, bit for bit."""
    plain, before = _run(sd1, sd1.model), _processors(sd1)
    for args in ((256, 2, 0, False), (2048, 2, 3, True)):
        (patched,) = hypertile(Recorder().ctx, sd1.model, *args)
        assert torch.equal(_run(sd1, patched), plain)
    assert _processors(sd1) == before  # restored after the run


def _recorded_input(tiny, size: int = 256):
    """The first self-attention's input during one UNet pass, and that module."""
    attn = tiny.parts["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = []
    hook = attn.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                          with_kwargs=True)
    try:
        _run(tiny, tiny.model, size, steps=1)
    finally:
        hook.remove()
    return attn, seen[0]


def _by_hand(attn, tokens: torch.Tensor, nh: int, nw: int, rows: int, cols: int) -> torch.Tensor:
    """ComfyUI's tiled self-attention written out: tile (i, j)'s queries are its own grid cells;
    its keys and values the (i * nw + j)-th run of N / (nh * nw) consecutive tokens."""
    q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    batch, n, width = q.shape
    d = width // attn.heads
    th, tw, run = rows // nh, cols // nw, n // (nh * nw)
    out = torch.zeros_like(q)
    for b in range(batch):
        for i in range(nh):
            for j in range(nw):
                cells = [(i * th + r) * cols + j * tw + c for r in range(th) for c in range(tw)]
                keys = list(range((i * nw + j) * run, (i * nw + j + 1) * run))
                for head in range(attn.heads):
                    part = slice(head * d, (head + 1) * d)
                    scores = q[b, cells, part] @ k[b, keys, part].T / math.sqrt(d)
                    out[b, cells, part] = torch.softmax(scores, dim=-1) @ v[b, keys, part]
    return attn.to_out[0](out)


def test_the_tiled_attention_equals_attention_tile_by_tile(sd1):
    attn, tokens = _recorded_input(sd1)
    assert tokens.shape[1] == 32 * 32
    # tile_size 64: tiles of at least 8 latent pixels; 32's divisors from 8 are 8, 16, 32, so the
    # counts are 4, 2, 1 and swap_size 2 offers the first two, of which randint(0, 1) takes the first
    run = ht.HyperTileRun(ht.HyperTileSettings(64, 2, 0, False), torch.Generator().manual_seed(0))
    run.size = (32, 32)
    assert run.tiles(32 * 32) == (4, 4, 32, 32) and run.tiles(16 * 16) is None  # depth 1 is past max_depth
    with torch.no_grad():
        ours = ht.TiledSelfAttention(attn.processor, run)(attn, tokens, encoder_hidden_states=None)
        expected = _by_hand(attn, tokens, 4, 4, 32, 32)
        plain = attn.processor(attn, tokens)
    assert (ours - expected).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-3  # tiling changed it
    # scale_depth: at depth 1 (16 x 16) the least tile doubles to 16 pixels: 16 = one tile, untouched
    run = ht.HyperTileRun(ht.HyperTileSettings(64, 2, 1, True), torch.Generator().manual_seed(0))
    run.size = (32, 32)
    assert run.tiles(16 * 16) is None and run.tiles(32 * 32) == (4, 4, 32, 32)


def test_random_divisor_is_comfyuis_pick():
    g = torch.Generator().manual_seed(3)
    assert ht.random_divisor(64, 32, 2, g) == 2  # options 2, 1: the exclusive randint end keeps the first
    assert ht.random_divisor(64, 8, 1, g) == 8
    assert ht.random_divisor(6, 32, 4, g) == 1  # the least is cut to the value: one tile
    picks = {ht.random_divisor(64, 4, 4, g) for _ in range(50)}
    assert picks == {16, 8, 4}  # of counts 16, 8, 4, 2 the last is never taken


def test_the_default_changes_a_large_image_and_two_runs_pick_alike(sd1):
    """512 px: the 64 x 64 latent is cut into 2 x 2 tiles at the defaults; swap_size 4 makes the
    picks random, from a generator seeded with the KSampler seed, so two runs are equal."""
    plain = _run(sd1, sd1.model, 512, steps=1)
    (patched,) = hypertile(Recorder().ctx, sd1.model, 256, 2, 0, False)
    assert (_run(sd1, patched, 512, steps=1) - plain).abs().max().item() > 1e-3
    (swapped,) = hypertile(Recorder().ctx, sd1.model, 64, 4, 1, False)
    assert torch.equal(_run(sd1, swapped, 256, steps=2), _run(sd1, swapped, 256, steps=2))


def test_refusals_name_their_input(sd1):
    from test_skip_layer_guidance import _model

    with pytest.raises(NodeError) as err:
        hypertile(Recorder().ctx, _model(), 256, 2, 0, False)
    assert err.value.input_name == "model"
    for name, args in (("tile_size", (0, 2, 0, False)), ("swap_size", (256, 129, 0, False)),
                       ("max_depth", (256, 2, 11, False))):
        with pytest.raises(NodeError) as err:
            hypertile(Recorder().ctx, sd1.model, *args)
        assert err.value.input_name == name


# -- TomePatchModel ------------------------------------------------------------------------------

def test_tome_ratio_0_is_the_unet_as_it_was_and_the_default_changes_the_image(sd1):
    from nodes.speed_patches import tome_patch_model

    plain, before = _run(sd1, sd1.model), _processors(sd1)
    (off,) = tome_patch_model(Recorder().ctx, sd1.model, 0.0)
    assert off.patches.tome is not None and torch.equal(_run(sd1, off), plain)  # patched, r = 0
    (merged,) = tome_patch_model(Recorder().ctx, sd1.model, 0.3)
    once = _run(sd1, merged)
    assert (once - plain).abs().max().item() > 1e-3 and torch.equal(_run(sd1, merged), once)  # seeded picks
    assert _processors(sd1) == before
    with pytest.raises(NodeError) as err:
        tome_patch_model(Recorder().ctx, sd1.model, 1.5)
    assert err.value.input_name == "ratio"


def _merged_by_hand(attn, tokens: torch.Tensor, rows: int, cols: int, r: int, seed: int) -> torch.Tensor:
    """ToMe written out from its definition: one random destination per 2 x 2 cell, each other
    position joins its most cosine-similar destination if it is among the r most similar; a
    group's query is its tokens' mean; every position takes its group's attention output."""
    pick = torch.randint(4, (rows // 2, cols // 2, 1), generator=torch.Generator().manual_seed(seed))
    dests = [(2 * i + int(pick[i, j, 0]) // 2) * cols + 2 * j + int(pick[i, j, 0]) % 2
             for i in range(rows // 2) for j in range(cols // 2)]
    sources = [p for p in range(rows * cols) if p not in dests]
    x = tokens[0]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = {s: max(dests, key=lambda d: float(unit[s] @ unit[d])) for s in sources}
    score = {s: float(unit[s] @ unit[best[s]]) for s in sources}
    merged = sorted(sources, key=lambda s: -score[s])[:r]
    group = {p: [p] for p in dests + [s for s in sources if s not in merged]}
    for s in merged:
        group[best[s]].append(s)
    k, v = attn.to_k(x), attn.to_v(x)
    d = k.shape[-1] // attn.heads
    out = torch.zeros_like(k)
    for head_of, members in group.items():
        q = attn.to_q(x[members].mean(0))
        for head in range(attn.heads):
            part = slice(head * d, (head + 1) * d)
            weights = torch.softmax(k[:, part] @ q[part] / math.sqrt(d), dim=0)
            row = weights @ v[:, part]
            for p in members:
                out[p, part] = row
    return attn.to_out[0](out)[None]


def test_the_merged_attention_equals_a_by_hand_merge():
    import tiny_models
    from nodes.families import tome

    attn = tiny_models.components("sd1")["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1
    tokens = torch.randn(1, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(2))
    run = tome.TomeRun(tome.TomeSettings(0.5), torch.Generator().manual_seed(11))
    run.size = (8, 8)
    with torch.no_grad():
        ours = tome.MergedSelfAttention(attn.processor, run)(attn, tokens, encoder_hidden_states=None)
        expected = _merged_by_hand(attn, tokens, 8, 8, 32, 11)
        plain = attn.processor(attn, tokens)
    assert (ours - expected).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-3
    run.size = (16, 16)  # 64 tokens of a 16 x 16 latent: a deeper level, which ToMe leaves alone
    assert run.merging(tokens) is None


def test_sdxl_has_no_attention_at_depth_0(sdxl):
    """SDXL's first level has no transformer: HyperTile at max_depth 0 leaves it bit for bit, as in
    ComfyUI; max_depth 1 tiles its second level (16 x 16 here: two tiles of 8 each way)."""
    plain = _run(sdxl, sdxl.model, 256, steps=1)
    (depth0,) = hypertile(Recorder().ctx, sdxl.model, 64, 2, 0, False)
    assert torch.equal(_run(sdxl, depth0, 256, steps=1), plain)
    (depth1,) = hypertile(Recorder().ctx, sdxl.model, 64, 2, 1, False)
    assert (_run(sdxl, depth1, 256, steps=1) - plain).abs().max().item() > 1e-4
