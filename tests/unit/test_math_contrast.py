"""math.contrast on hand-made activations: directions and statistics computed by hand, the method registry."""

from __future__ import annotations

import math

import pytest
import torch

from icon2_lens.math import contrast
from icon2_lens.math.contrast import (
    DIRECTION_METHODS,
    STAT_NAMES,
    ContrastAccumulator,
    cosine_per_layer,
    directions_from_activations,
    finish_directions,
    get_direction_method,
    register_direction_method,
    split_halves,
)


def _known_set():
    """Two pairs, two layers, d_model 2; neg = 0, so the differences are pos.

    Layer 0 differences (3, 1), (3, -1): uncentred second moment diag(18, 2), top axis x, mean (3, 0).
    Layer 1 differences (1, 3), (-1, 3): diag(2, 18), top axis y, mean (0, 3).
    """
    pos = torch.tensor([[[3.0, 1.0], [1.0, 3.0]], [[3.0, -1.0], [-1.0, 3.0]]])
    return pos, torch.zeros_like(pos)


def test_pca_direction_and_statistics_of_a_known_set():
    pos, neg = _known_set()
    u, stats = directions_from_activations(pos, neg, method="pca")
    torch.testing.assert_close(u, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert set(stats) == set(STAT_NAMES)
    r10 = math.sqrt(10)
    want = {
        "resid_norm": [2 * r10 / 4] * 2,  # pooled rows: two of norm sqrt(10), two zeros
        "diff_norm": [r10] * 2,
        "explained_variance": [18 / 20] * 2,
        "proj_mean": [6 / 4] * 2,  # pooled projections 3, 3, 0, 0
        "proj_std": [1.5] * 2,
        "proj_gap": [3.0] * 2,
    }
    for k, w in want.items():
        torch.testing.assert_close(stats[k], torch.tensor(w), msg=k)


def test_mean_diff_and_pca_centered_of_a_known_set():
    pos, neg = _known_set()
    u, stats = directions_from_activations(pos, neg, method="mean_diff")
    torch.testing.assert_close(u, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(stats["explained_variance"], torch.tensor([0.9, 0.9]))
    # centred differences are (0, +-1) on layer 0 and (+-1, 0) on layer 1: orthogonal to the mean
    u, _ = directions_from_activations(pos, neg, method="pca_centered")
    torch.testing.assert_close(u.abs(), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_sign_points_along_the_mean_difference():
    pos, neg = _known_set()
    u, stats = directions_from_activations(neg, pos, method="pca")  # swapped: differences negated
    torch.testing.assert_close(u, -torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(stats["proj_gap"], torch.tensor([3.0, 3.0]))


def test_merge_of_two_halves_equals_one_accumulator():
    pos, neg = _known_set()
    a, b, one = ContrastAccumulator(2, 2), ContrastAccumulator(2, 2), ContrastAccumulator(2, 2)
    a.update(pos[:1], neg[:1])
    b.update(pos[1:], neg[1:])
    one.update(pos, neg)
    u1, s1 = one.directions()
    u2, s2 = a.merge(b).directions()
    torch.testing.assert_close(u2, u1)
    for k in STAT_NAMES:
        torch.testing.assert_close(s2[k], s1[k], msg=k)


def test_registry_holds_the_built_in_methods_and_refuses_unknown_names():
    assert {"pca", "mean_diff", "pca_centered"} <= set(DIRECTION_METHODS)
    assert get_direction_method("pca") is DIRECTION_METHODS["pca"]
    with pytest.raises(ValueError, match="Unknown method 'svd'.*pca"):
        get_direction_method("svd")
    acc = ContrastAccumulator(2, 2)
    acc.update(*_known_set())
    with pytest.raises(ValueError, match="Unknown method"):
        acc.directions("svd")


def test_a_registered_custom_method_is_used_by_name():
    calls = []

    def second_axis(diff_gram, mean_diff, n):
        calls.append((diff_gram.dtype, mean_diff.dtype, n))
        return -torch.eye(len(mean_diff), dtype=mean_diff.dtype)[1] * 5  # any norm, any sign

    register_direction_method("second_axis", second_axis)
    try:
        pos = torch.tensor([[[1.0, 2.0]], [[1.0, 4.0]]])  # mean difference (1, 3): the sign fix keeps +y
        u, stats = directions_from_activations(pos, torch.zeros_like(pos), method="second_axis")
        torch.testing.assert_close(u, torch.tensor([[0.0, 1.0]]))
        torch.testing.assert_close(stats["proj_gap"], torch.tensor([3.0]))
        assert calls == [(torch.float64, torch.float64, 2)]
        with pytest.raises(ValueError, match="exists already"):
            register_direction_method("second_axis", second_axis)
        register_direction_method("second_axis", DIRECTION_METHODS["mean_diff"], overwrite=True)
        u, _ = directions_from_activations(pos, torch.zeros_like(pos), method="second_axis")
        torch.testing.assert_close(u, torch.nn.functional.normalize(torch.tensor([[1.0, 3.0]]), dim=-1))
    finally:
        DIRECTION_METHODS.pop("second_axis", None)
    assert "second_axis" not in contrast.DIRECTION_METHODS
    with pytest.raises(TypeError, match="callable"):
        register_direction_method("bad", "not a function")  # type: ignore[arg-type]


def test_a_method_returning_zero_is_refused():
    register_direction_method("zero", lambda g, m, n: torch.zeros_like(m))
    try:
        acc = ContrastAccumulator(1, 2)
        acc.update(torch.ones(2, 1, 2), torch.zeros(2, 1, 2))
        with pytest.raises(ValueError, match="do not differ"):
            acc.directions("zero")
    finally:
        DIRECTION_METHODS.pop("zero")


def test_finish_directions_stacks_criteria():
    pos, neg = _known_set()
    a, b = ContrastAccumulator(2, 2), ContrastAccumulator(2, 2)
    a.update(pos, neg)
    b.update(neg, pos)
    vecs, stats = finish_directions([a, b], "pca")
    assert vecs.shape == (2, 2, 2) and all(stats[k].shape == (2, 2) for k in STAT_NAMES)
    torch.testing.assert_close(vecs[1], -vecs[0])


def test_split_halves_is_seeded_disjoint_and_balanced():
    g = split_halves(9, seed=3)
    assert len(g) == 9 and set(g) == {0, 1} and g.count(0) == 4
    assert split_halves(9, seed=3) == g and split_halves(9, seed=4) != g
    with pytest.raises(ValueError, match="at least 4"):
        split_halves(3)


def test_cosine_per_layer():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(cosine_per_layer(a, b), torch.tensor([0.0, 1.0, -1.0]))
