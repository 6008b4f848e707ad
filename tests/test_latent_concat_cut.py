"""LatentConcat and LatentCut (nodes/latent_math.py): ComfyUI's declarations, placement and clipping
worked out by hand, the noise mask carried along, refusals naming their input.

(RebatchLatents and RebatchImages are not in Kiln: they are list nodes, and Kiln's engine runs
each node once per job with no list execution.)"""
from __future__ import annotations

import pytest
import torch

from engine.context import NodeError
from engine.registry import default_registry
from node_call import call
from nodes import latent_math as lm


def run(spec, **inputs):
    return call(spec, None, **inputs)


def _cells(batch: int, h: int, w: int, start: float = 0.0) -> dict:
    """A latent whose cell (row r, column c) holds start + 10 r + c in every channel."""
    grid = start + 10 * torch.arange(h, dtype=torch.float32)[:, None] + torch.arange(w, dtype=torch.float32)
    return {"samples": grid.expand(batch, 4, h, w).clone()}


def test_declarations_follow_comfyui():
    registry = default_registry()
    concat, cut = registry.get("LatentConcat").object_info(), registry.get("LatentCut").object_info()
    assert concat["input_order"]["required"] == ["samples1", "samples2", "dim"]
    assert concat["input"]["required"]["dim"] == [["x", "-x", "y", "-y", "t", "-t"]]
    assert cut["input_order"]["required"] == ["samples", "dim", "index", "amount"]
    assert cut["input"]["required"]["index"] == ["INT", {"default": 0, "min": -16384, "max": 16384, "step": 1}]
    assert cut["input"]["required"]["amount"] == ["INT", {"default": 1, "min": 1, "max": 16384, "step": 1}]
    assert concat["category"] == cut["category"] == "latent/advanced"
    assert lm.latent_concat.signature_mismatches() == [] and lm.latent_cut.signature_mismatches() == []


def test_concat_places_samples2_on_the_named_side():
    a, b = _cells(1, 2, 3), _cells(1, 2, 2, start=100)
    (right,) = run(lm.latent_concat, samples1=a, samples2=b, dim="x")
    assert right["samples"][0, 0].tolist() == [[0, 1, 2, 100, 101], [10, 11, 12, 110, 111]]
    (left,) = run(lm.latent_concat, samples1=a, samples2=b, dim="-x")
    assert left["samples"][0, 0].tolist() == [[100, 101, 0, 1, 2], [110, 111, 10, 11, 12]]
    (below,) = run(lm.latent_concat, samples1=a, samples2=_cells(1, 1, 3, start=50), dim="y")
    assert below["samples"][0, 0].tolist() == [[0, 1, 2], [10, 11, 12], [50, 51, 52]]
    (above,) = run(lm.latent_concat, samples1=a, samples2=_cells(1, 1, 3, start=50), dim="-y")
    assert above["samples"][0, 0, 0].tolist() == [50, 51, 52]


def test_concat_takes_samples1s_batch_and_seeds_and_joins_the_masks():
    a = {**_cells(3, 2, 2), "batch_index": [7, 8, 9]}
    b = _cells(1, 2, 2, start=100)
    b["noise_mask"] = torch.zeros(1, 1, 16, 16)
    (out,) = run(lm.latent_concat, samples1=a, samples2=b, dim="x")
    assert out["samples"].shape == (3, 4, 2, 4) and out["batch_index"] == [7, 8, 9]
    assert torch.equal(out["samples"][2, :, :, 2:], b["samples"][0])  # repeated to samples1's batch
    mask = out["noise_mask"]
    assert mask.shape == (3, 1, 16, 32)
    assert bool((mask[..., :16] == 1).all()) and bool((mask[..., 16:] == 0).all())  # samples1 had none: ones
    (cut_b,) = run(lm.latent_concat, samples1=_cells(1, 2, 2), samples2=_cells(3, 2, 2), dim="y")
    assert cut_b["samples"].shape == (1, 4, 4, 2)  # samples2 cut to samples1's batch


@pytest.mark.parametrize("inputs, name", [
    ({"samples2": _cells(1, 3, 2), "dim": "x"}, "samples2"),  # heights differ
    ({"samples2": _cells(1, 2, 5), "dim": "y"}, "samples2"),  # widths differ
    ({"samples2": {"samples": torch.zeros(1, 16, 2, 2)}, "dim": "x"}, "samples2"),  # channels differ
    ({"samples2": _cells(1, 2, 2), "dim": "t"}, "dim"),  # no time axis in an image latent
])
def test_concat_refusals_name_their_input(inputs, name):
    with pytest.raises(NodeError) as err:
        run(lm.latent_concat, samples1=_cells(1, 2, 2), **inputs)
    assert err.value.input_name == name


@pytest.mark.parametrize("size, index, amount, expected", [
    (5, 1, 2, (1, 2)), (5, 3, 9, (3, 2)), (5, 9, 2, (4, 1)),  # past the end: the last cell
    (5, -2, 9, (3, 2)), (5, -2, 1, (3, 1)), (5, -9, 2, (0, 2)),  # before the start: from cell 0
])
def test_cut_span_clips_as_comfyui(size, index, amount, expected):
    assert lm.cut_span(size, index, amount) == expected


def test_cut_takes_columns_or_rows_and_its_mask():
    latent = _cells(2, 3, 4)
    mask = torch.zeros(1, 24, 32)
    mask[:, :, 8:16] = 1.0  # marks latent column 1
    latent["noise_mask"] = mask
    (cols,) = run(lm.latent_cut, samples=latent, dim="x", index=1, amount=2)
    assert cols["samples"][0, 0].tolist() == [[1, 2], [11, 12], [21, 22]]
    assert cols["noise_mask"].shape == (2, 1, 24, 16)
    assert bool((cols["noise_mask"][..., :8] == 1).all()) and bool((cols["noise_mask"][..., 8:] == 0).all())
    (rows,) = run(lm.latent_cut, samples=_cells(1, 3, 4), dim="y", index=-1, amount=5)
    assert rows["samples"][0, 0].tolist() == [[20, 21, 22, 23]] and "noise_mask" not in rows
    with pytest.raises(NodeError) as err:
        run(lm.latent_cut, samples=_cells(1, 3, 4), dim="t", index=0, amount=1)
    assert err.value.input_name == "dim"
