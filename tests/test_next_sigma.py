"""The step's end a network is given (nodes.samplers.schedules.next_sigma): the sampler's next noise level,
the rule by which a MeanFlow model (HunyuanImage 2.1 distilled) reads its ``timestep_r``."""
from __future__ import annotations

import torch

from nodes.samplers.schedules import next_sigma

GRID = torch.tensor([1.0, 0.9375, 0.8125, 0.625, 0.0])  # exact in float32


def test_a_level_on_the_grid_heads_for_the_next_one_and_the_last_for_zero():
    assert [next_sigma(GRID, float(s)) for s in GRID[:-1]] == [float(s) for s in GRID[1:]]
    assert next_sigma(GRID, 0.0) == 0.0  # the list's end: nothing after it
    assert next_sigma(torch.tensor([0.8, 0.4]), 0.4) == 0.0  # a split schedule's last level


def test_the_float32_round_trip_through_timesteps_still_finds_the_level():
    for s in GRID[:-1]:
        back = float((s * 1000.0) / 1000.0)  # what the network's timestep gives back
        assert next_sigma(GRID, back) == next_sigma(GRID, float(s))
    assert next_sigma(GRID, 0.8125 * (1 + 5e-6)) == 0.625
    assert next_sigma(GRID, 0.8125 * (1 + 1e-3)) == 0.8125  # past the tolerance: a level between, see below


def test_a_level_between_the_grids_heads_for_the_first_below_it():
    assert next_sigma(GRID, 0.9) == 0.8125  # a multi-stage sampler's intermediate evaluation
    assert next_sigma(GRID, 0.3) == 0.0
    assert next_sigma(GRID, 1.5) == 1.0  # above the list (a re-noised start): its first level


def test_no_list_no_level():
    assert next_sigma(None, 0.5) is None
    assert next_sigma(torch.zeros(0), 0.5) is None
