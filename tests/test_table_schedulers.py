"""Sigma lists from published tables: OptimalStepsScheduler (nodes/custom_schedulers.py) and
GITSScheduler (nodes/gits_scheduler.py), each against values worked out by hand from its table."""
from __future__ import annotations

import math

import pytest

from engine.context import NodeError
from engine.registry import default_registry
from nodes import custom_schedulers as sch
from nodes import gits_scheduler as gits

CTX = None  # the table schedulers never touch their context


def test_optimal_steps_declaration_follows_comfyui():
    info = default_registry().get("OptimalStepsScheduler").object_info()
    assert info["input_order"]["required"] == ["model_type", "steps", "denoise"]
    assert info["input"]["required"]["model_type"] == [["FLUX", "Wan", "Chroma"]]
    assert info["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 3, "max": 1000}]
    assert info["output"] == ["SIGMAS"]
    assert sch.optimal_steps_scheduler.signature_mismatches() == []


def test_optimal_steps_gives_the_table_at_its_own_length():
    (flux,) = sch.optimal_steps_scheduler(CTX, "FLUX", 10, 1.0)
    assert flux.tolist() == pytest.approx([0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512,
                                           0.2808, 0.0], abs=1e-7)
    (wan,) = sch.optimal_steps_scheduler(CTX, "Wan", 20, 1.0)
    assert len(wan) == 21 and wan[0] == 1.0 and wan[-2].item() == pytest.approx(0.208) and wan[-1] == 0


def test_optimal_steps_interpolates_in_log_sigma():
    (twenty,) = sch.optimal_steps_scheduler(CTX, "FLUX", 20, 1.0)
    assert len(twenty) == 21
    assert twenty[2].item() == pytest.approx(0.9886, rel=1e-6)  # even positions hold the table
    assert twenty[1].item() == pytest.approx(math.sqrt(0.9968 * 0.9886), rel=1e-6)  # halfway in log
    assert twenty[17].item() == pytest.approx(math.sqrt(0.5512 * 0.2808), rel=1e-6)  # table 8.5
    # Chroma's 41 levels at 5 steps: positions 0, 8, 16, 24, 32 of its list, then 0
    (five,) = sch.optimal_steps_scheduler(CTX, "Chroma", 5, 1.0)
    assert five.tolist() == pytest.approx([0.992, 0.961, 0.832, 0.501, 0.169, 0.0], rel=1e-6)


def test_optimal_steps_denoise_keeps_the_last_steps():
    (half,) = sch.optimal_steps_scheduler(CTX, "FLUX", 10, 0.5)
    assert half.tolist() == pytest.approx([0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.0], abs=1e-7)
    (some,) = sch.optimal_steps_scheduler(CTX, "FLUX", 10, 0.34)  # round(3.4) = 3 steps
    assert some.tolist() == pytest.approx([0.8287, 0.5512, 0.2808, 0.0], abs=1e-7)
    assert len(sch.optimal_steps_scheduler(CTX, "Wan", 20, 0.0)[0]) == 0
    with pytest.raises(NodeError) as err:
        sch.optimal_steps_scheduler(CTX, "SD1", 10, 1.0)
    assert err.value.input_name == "model_type"


def test_gits_declaration_follows_comfyui():
    info = default_registry().get("GITSScheduler").object_info()
    assert info["input_order"]["required"] == ["coeff", "steps", "denoise"]
    assert info["input"]["required"]["coeff"] == ["FLOAT", {"default": 1.2, "min": 0.8, "max": 1.5, "step": 0.05}]
    assert info["input"]["required"]["steps"] == ["INT", {"default": 10, "min": 2, "max": 1000}]
    assert gits.gits_scheduler.signature_mismatches() == []


def test_gits_table_has_one_descending_list_per_step_count():
    levels = gits.gits_levels()
    assert list(levels) == [f"{0.80 + 0.05 * i:.2f}" for i in range(15)]
    for rows in levels.values():
        assert [len(r) for r in rows] == [n + 1 for n in range(2, 21)]
        for row in rows:
            assert row[0] == 14.61464119 and row[-1] == 0.02916753  # SD's sigma_max and sigma_min
            assert all(a > b for a, b in zip(row, row[1:]))


def test_gits_picks_the_tables_list():
    (ten,) = gits.gits_scheduler(CTX, 1.20, 10, 1.0)  # ComfyUI's defaults
    assert ten.tolist() == pytest.approx([14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048,
                                          0.50118381, 0.32104823, 0.19894916, 0.09824532, 0.0], rel=1e-6)
    (two,) = gits.gits_scheduler(CTX, 0.80, 2, 1.0)
    assert two.tolist() == pytest.approx([14.61464119, 7.49001646, 0.0], rel=1e-6)
    (five,) = gits.gits_scheduler(CTX, 1.5, 5, 1.0)
    assert five.tolist() == pytest.approx([14.61464119, 1.24153244, 0.54755926, 0.25053367, 0.09824532, 0.0],
                                          rel=1e-6)
    (half,) = gits.gits_scheduler(CTX, 1.20, 10, 0.5)  # the last 5 steps of the 10-step list
    assert half.tolist() == pytest.approx([0.74807048, 0.50118381, 0.32104823, 0.19894916, 0.09824532, 0.0],
                                          rel=1e-6)
    assert len(gits.gits_scheduler(CTX, 1.20, 10, 0.0)[0]) == 0


def test_gits_beyond_twenty_steps_stretches_the_twenty_step_list():
    row = gits.gits_levels()["1.00"][-1]
    (forty,) = gits.gits_scheduler(CTX, 1.00, 40, 1.0)
    assert len(forty) == 41 and forty[-1] == 0
    assert forty[:-1:2].tolist() == pytest.approx(list(row[:-1]), rel=1e-6)  # even positions hold the list
    assert forty[1].item() == pytest.approx(math.sqrt(row[0] * row[1]), rel=1e-6)  # halfway in log sigma


@pytest.mark.parametrize("coeff", [0.83, 0.75, 1.55])
def test_gits_refuses_a_coeff_off_its_table(coeff):
    with pytest.raises(NodeError) as err:
        gits.gits_scheduler(CTX, coeff, 10, 1.0)
    assert err.value.input_name == "coeff"
