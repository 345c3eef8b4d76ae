"""math.gamma: the App. J rule on made-up sweeps (ties, nothing passing, everything degenerate, a judge)."""

from __future__ import annotations

import pytest

from icon2_lens.math.gamma import (
    GammaChoice,
    check_win_threshold,
    choose_gammas,
    effective_scores,
    gamma_grid,
    win_shares,
)

GP, GN = [0.05, 0.1, 0.2], [-0.2, -0.1, -0.05]


def _ok(scores):
    return {g: [False] * len(v) for g, v in scores.items()}


def test_rule_on_a_made_up_table():
    # 4 instructions per gamma
    scores = {
        -0.2: [0.0, 0.0, 0.0, 0.0],
        -0.1: [1.0, 1.0, 1.0, 1.0],
        -0.05: [2.0, 2.5, 1.0, 3.0],
        0.05: [3.0, 3.0, 3.0, 3.0],
        0.1: [4.0, 4.0, 2.0, 4.0],  # the best mean: 3.5
        0.2: [5.0, 5.0, 0.5, 1.0],  # mean 2.875
    }
    c = choose_gammas(scores, _ok(scores), GP, GN, win_threshold=0.9)
    assert isinstance(c, GammaChoice)
    assert c.gamma_pos == 0.1
    assert c.win_share[(0.1, -0.2)] == 1.0 and c.win_share[(0.1, -0.1)] == 1.0
    assert c.win_share[(0.1, -0.05)] == 1.0  # 4>2, 4>2.5, 2>1, 4>3
    assert c.win_share[(0.2, -0.05)] == 0.5  # 5>2, 5>2.5, 0.5<1, 1<3
    # every gamma- passes; the highest mean among them is -0.05 (the smallest reliable gap)
    assert c.gamma_neg == -0.05 and c.threshold_met
    assert c.mean_score == {g: sum(v) / 4 for g, v in scores.items()}
    assert list(c.win_share) == [(p, q) for p in GP for q in GN]  # gamma+ major, in the order given
    assert c.degenerate_share == {g: 0.0 for g in scores}


def test_gamma_minus_must_exceed_the_threshold_strictly():
    scores = {-0.1: [0.0] * 10, -0.05: [1.0] * 9 + [9.0], 0.1: [5.0] * 10}
    c = choose_gammas(scores, _ok(scores), [0.1], [-0.1, -0.05], win_threshold=0.9)
    assert c.win_share == {(0.1, -0.1): 1.0, (0.1, -0.05): 0.9}
    assert c.gamma_neg == -0.1 and c.threshold_met  # -0.05 has the higher mean but 0.9 is not > 0.9
    c = choose_gammas(scores, _ok(scores), [0.1], [-0.1, -0.05], win_threshold=0.85)
    assert c.gamma_neg == -0.05


def test_ties_go_to_the_gentler_strengths():
    scores = {-0.2: [1.0, 1.0], -0.1: [1.0, 1.0], -0.05: [1.0, 1.0], 0.05: [3.0, 3.0], 0.1: [3.0, 3.0], 0.2: [2.0, 4.0]}
    c = choose_gammas(scores, _ok(scores), GP, GN)
    assert c.gamma_pos == 0.05  # three gamma+ tie at mean 3.0: the smallest
    assert c.gamma_neg == -0.05  # three gamma- tie at mean 1.0, all winning: the one closest to 0


def test_nothing_passes_then_the_highest_win_share_closest_to_zero():
    scores = {-0.2: [0.0, 9.0], -0.1: [0.0, 9.0], -0.05: [9.0, 9.0], 0.1: [1.0, 1.0]}
    c = choose_gammas(scores, _ok(scores), [0.1], [-0.2, -0.1, -0.05], win_threshold=0.9)
    assert c.win_share == {(0.1, -0.2): 0.5, (0.1, -0.1): 0.5, (0.1, -0.05): 0.0}
    assert not c.threshold_met
    assert c.gamma_neg == -0.1  # -0.2 and -0.1 tie at 0.5: the one closer to 0


def test_degenerate_responses_get_the_floor_and_lose_their_pairs():
    scores = {-0.1: [1.0, 2.0], 0.1: [5.0, 9.0]}
    deg = {-0.1: [False, False], 0.1: [False, True]}
    eff = effective_scores(scores, deg)
    assert eff == {-0.1: [1.0, 2.0], 0.1: [5.0, 1.0]}  # the lowest score of the whole sweep
    c = choose_gammas(scores, deg, [0.1], [-0.1], win_threshold=0.0)
    assert c.mean_score == {-0.1: 1.5, 0.1: 3.0}
    assert c.degenerate_share == {-0.1: 0.0, 0.1: 0.5}
    assert c.win_share == {(0.1, -0.1): 0.5}  # the second pair wins on raw scores but has a degenerate side


def test_everything_degenerate():
    scores = {g: [float(i + 10 * g) for i in range(3)] for g in (*GP, *GN)}
    deg = {g: [True, True, True] for g in scores}
    c = choose_gammas(scores, deg, GP, GN)
    floor = min(min(v) for v in scores.values())
    assert set(c.mean_score.values()) == {floor}
    assert set(c.win_share.values()) == {0.0} and not c.threshold_met
    assert (c.gamma_pos, c.gamma_neg) == (0.05, -0.05)  # all tied: the gentlest of each
    assert set(c.degenerate_share.values()) == {1.0}


def test_judge_verdicts_replace_the_score_comparison():
    # a pairwise judge: scores are win rates against the unsteered 0.0, which counts for the floor too
    scores = {-0.1: [0.0, 1.0], 0.0: [0.5, 0.5], 0.1: [1.0, 0.5]}
    beats = {(0.1, -0.1): [True, False]}
    c = choose_gammas(scores, _ok(scores), [0.1], [-0.1], win_threshold=0.4, beats=beats)
    assert c.win_share == {(0.1, -0.1): 0.5} and c.threshold_met
    assert c.mean_score[0.0] == 0.5
    assert win_shares({(0.1, -0.1): [True, True]}, {0.1: [False, True], -0.1: [False, False]}) == {(0.1, -0.1): 0.5}


def test_grid_and_threshold_checks():
    assert gamma_grid([0.2, 0.1, 0.1], (-0.05, -0.1)) == ([0.1, 0.2], [-0.1, -0.05])
    with pytest.raises(ValueError, match="at least one gamma"):
        gamma_grid([], [-0.1])
    with pytest.raises(ValueError, match="must exceed every gamma-"):
        gamma_grid([0.1], [0.1])
    check_win_threshold(0.0)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"win_threshold must be in \[0, 1\)"):
            check_win_threshold(bad)
        with pytest.raises(ValueError, match="win_threshold"):
            choose_gammas({0.1: [1.0], -0.1: [0.0]}, {0.1: [False], -0.1: [False]}, [0.1], [-0.1], win_threshold=bad)
    with pytest.raises(ValueError, match=r"No scores .* \[-0.2\]"):
        choose_gammas({0.1: [1.0], -0.1: [0.0]}, {0.1: [False], -0.1: [False]}, [0.1], [-0.1, -0.2])
    with pytest.raises(ValueError):  # one score list shorter than the others
        choose_gammas({0.1: [1.0, 2.0], -0.1: [0.0]}, {0.1: [False, False], -0.1: [False]}, [0.1], [-0.1])
