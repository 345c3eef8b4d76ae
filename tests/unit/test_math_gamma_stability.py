"""math.gamma: the bootstrap of the App. J rule and the cumulative push of a steering strength (made-up data)."""

from __future__ import annotations

import math

import pytest
import torch

from icon2_lens.math.gamma import bootstrap_choices, choose_gammas, cumulative_push


def _ok(scores):
    return {g: [False] * len(v) for g, v in scores.items()}


# ---- bootstrap_choices ---------------------------------------------------------------------------------

# Instruction 0 prefers gamma+ 0.1, instruction 1 prefers 0.2; a resample holding both ties (mean 3 vs 3) and
# the rule takes the gentler 0.1. So 0.1 is chosen with probability 3/4 (resamples (0,0), (0,1), (1,0)), 0.2
# with 1/4 (resample (1,1)). gamma- has one candidate.
TWO = {-0.1: [0.0, 0.0], 0.1: [5.0, 1.0], 0.2: [1.0, 5.0]}


def test_bootstrap_shares_follow_the_resampling_probabilities():
    boot = bootstrap_choices(TWO, _ok(TWO), [0.1, 0.2], [-0.1], n_boot=4000, seed=1)
    assert [(b["gamma_pos"], b["gamma_neg"]) for b in boot] == [(0.1, -0.1), (0.2, -0.1)]  # most frequent first
    assert sum(b["share"] for b in boot) == pytest.approx(1.0)
    assert boot[0]["share"] == pytest.approx(0.75, abs=0.03) and boot[1]["share"] == pytest.approx(0.25, abs=0.03)
    # the full table's choice is the frequent one
    assert choose_gammas(TWO, _ok(TWO), [0.1, 0.2], [-0.1]).gamma_pos == 0.1


def test_bootstrap_is_seeded_and_leaves_the_global_rng_alone():
    import random

    random.seed(123)
    state = random.getstate()
    a = bootstrap_choices(TWO, _ok(TWO), [0.1, 0.2], [-0.1], n_boot=50, seed=7)
    assert random.getstate() == state
    assert a == bootstrap_choices(TWO, _ok(TWO), [0.1, 0.2], [-0.1], n_boot=50, seed=7)
    assert all(isinstance(b["share"], float) for b in a)
    assert all(b["share"] * 50 == pytest.approx(round(b["share"] * 50)) for b in a)  # counts over 50 resamples


def test_a_clear_table_gives_one_pair_every_time():
    scores = {-0.2: [0.0] * 5, -0.1: [1.0] * 5, 0.1: [3.0] * 5, 0.2: [2.0] * 5}
    assert bootstrap_choices(scores, _ok(scores), [0.1, 0.2], [-0.2, -0.1], n_boot=30) == [
        {"gamma_pos": 0.1, "gamma_neg": -0.1, "share": 1.0}]


def test_bootstrap_resamples_degenerate_flags_and_verdicts_with_the_scores():
    # a judge's verdicts: gamma- -0.05 wins only on instruction 0, -0.1 wins everywhere
    scores = {-0.1: [0.0, 0.0], -0.05: [1.0, 1.0], 0.1: [2.0, 2.0]}
    beats = {(0.1, -0.1): [True, True], (0.1, -0.05): [True, False]}
    boot = bootstrap_choices(scores, _ok(scores), [0.1], [-0.1, -0.05], beats=beats, n_boot=4000, seed=0)
    got = {(b["gamma_pos"], b["gamma_neg"]): b["share"] for b in boot}
    # -0.05 (the better mean) passes only when the resample is (0, 0): probability 1/4
    assert got[(0.1, -0.05)] == pytest.approx(0.25, abs=0.03) and got[(0.1, -0.1)] == pytest.approx(0.75, abs=0.03)
    # degenerate flags travel with their instruction: 0.2 is degenerate on instruction 1 only
    scores = {-0.1: [0.0, 0.0], 0.1: [3.0, 3.0], 0.2: [4.0, 9.0]}
    deg = {-0.1: [False, False], 0.1: [False, False], 0.2: [False, True]}
    boot = bootstrap_choices(scores, deg, [0.1, 0.2], [-0.1], n_boot=4000, seed=0)
    got = {b["gamma_pos"]: b["share"] for b in boot}
    assert got[0.2] == pytest.approx(0.25, abs=0.03)  # only the resample without instruction 1


def test_bootstrap_bad_input():
    assert bootstrap_choices(TWO, _ok(TWO), [0.1], [-0.1], n_boot=0) == []
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_choices(TWO, _ok(TWO), [0.1], [-0.1], n_boot=-1)
    with pytest.raises(ValueError, match="one score, flag"):
        bootstrap_choices({-0.1: [0.0], 0.1: [1.0, 2.0]}, {-0.1: [False], 0.1: [False, False]}, [0.1], [-0.1])


# ---- cumulative_push -----------------------------------------------------------------------------------


def test_cumulative_push_adds_the_vectors():
    orth = {3: torch.tensor([3.0, 0.0, 0.0]), 4: torch.tensor([[0.0, 4.0, 0.0]])}  # [d] and [1, d] both accepted
    p = cumulative_push(orth, resid_norm_last=20.0, proj_gap_last=-2.0)  # the gap's sign does not matter
    assert p == {"norm": 5.0, "share_of_resid_norm": 0.25, "gap_multiple": 2.5, "per_layer_norm_sum": 7.0,
                 "layers": 2}
    parallel = {layer: torch.tensor([0.0, 0.0, 0.5]) for layer in range(10)}  # ten layers, 0.5 each
    p = cumulative_push(parallel, resid_norm_last=10.0, proj_gap_last=1.0)
    assert p["norm"] == pytest.approx(5.0) and p["share_of_resid_norm"] == pytest.approx(0.5)
    assert p["gap_multiple"] == pytest.approx(5.0) and p["per_layer_norm_sum"] == pytest.approx(5.0)
    opposite = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([-1.0, 0.0])}
    assert cumulative_push(opposite, 1.0, 1.0)["norm"] == 0.0


def test_cumulative_push_edge_cases():
    assert math.isinf(cumulative_push({0: torch.tensor([1.0])}, 1.0, 0.0)["gap_multiple"])
    assert cumulative_push({0: torch.tensor([0.0])}, 1.0, 0.0)["gap_multiple"] == 0.0
    with pytest.raises(ValueError, match="one vector"):
        cumulative_push({0: torch.zeros(2, 3)}, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one layer"):
        cumulative_push({}, 1.0, 1.0)
    with pytest.raises(ValueError, match="different sizes"):
        cumulative_push({0: torch.zeros(2), 1: torch.zeros(3)}, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        cumulative_push({0: torch.zeros(2)}, 0.0, 1.0)
