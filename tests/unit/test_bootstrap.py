"""math.bootstrap: seeded percentile intervals of a mean and of a paired difference (pure)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from icon2_lens.math.bootstrap import DEFAULT_LEVEL, DEFAULT_N_BOOT, Interval, bootstrap_mean, paired_difference

SAMPLE = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64).tolist()


def test_defaults():
    assert DEFAULT_LEVEL == 0.9 and DEFAULT_N_BOOT == 2000


def test_same_seed_same_interval_other_seed_may_differ():
    a, b = bootstrap_mean(SAMPLE, seed=7), bootstrap_mean(SAMPLE, seed=7)
    assert a == b
    others = {(bootstrap_mean(SAMPLE, seed=s).low, bootstrap_mean(SAMPLE, seed=s).high) for s in range(5)}
    assert len(others) > 1  # the seed reaches the resampling
    assert all(bootstrap_mean(SAMPLE, seed=s).mean == a.mean for s in range(5))  # the mean is not resampled
    p1, p2 = paired_difference(SAMPLE, [0.0] * 50, seed=1), paired_difference(SAMPLE, [0.0] * 50, seed=1)
    assert p1 == p2


def test_caller_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bootstrap_mean(SAMPLE, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_interval_contains_the_mean_and_fields():
    iv = bootstrap_mean(SAMPLE, n_boot=500, level=0.95)
    assert iv.low <= iv.mean <= iv.high
    assert iv.mean == pytest.approx(sum(SAMPLE) / len(SAMPLE))
    assert iv.n == 50 and iv.level == 0.95
    assert isinstance(iv, Interval)
    d = iv.to_dict()
    assert set(d) == {"mean", "low", "high", "n", "level"} and json.loads(json.dumps(d)) == d


def test_constant_values_give_zero_width():
    iv = bootstrap_mean([0.25] * 12)
    assert iv.low == iv.mean == iv.high == 0.25
    z = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (z.mean, z.low, z.high) == (0.0, 0.0, 0.0) and not z.excludes_zero


def test_clearly_positive_excludes_zero_symmetric_does_not():
    pos = 1.0 + 0.1 * torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    iv = bootstrap_mean(pos)
    assert iv.excludes_zero and iv.low > 0.9 and iv.high < 1.1
    neg = bootstrap_mean(-pos)
    assert neg.excludes_zero and neg.high < 0
    sym = torch.cat([pos - 1.0, 1.0 - pos])  # exactly symmetric around zero
    s = bootstrap_mean(sym)
    assert s.mean == pytest.approx(0.0, abs=1e-12)
    assert s.low < 0 < s.high and not s.excludes_zero


def test_paired_difference_is_bootstrap_of_differences():
    a = [1.0, 2.0, 3.0, 5.0]
    b = [0.5, 1.0, 2.0, 1.0]
    p = paired_difference(a, b, n_boot=300, seed=4)
    q = bootstrap_mean([x - y for x, y in zip(a, b, strict=True)], n_boot=300, seed=4)
    assert p == q and p.mean == pytest.approx(1.625)
    # order matters: a - b versus b - a mirrors the interval
    r = paired_difference(b, a, n_boot=300, seed=4)
    assert r.mean == pytest.approx(-p.mean)
    assert r.low == pytest.approx(-p.high) and r.high == pytest.approx(-p.low)
    # tensors work too
    t = paired_difference(torch.tensor(a), torch.tensor(b), n_boot=300, seed=4)
    assert t.mean == pytest.approx(p.mean)


def test_lower_level_is_narrower():
    wide = bootstrap_mean(SAMPLE, level=0.95)
    narrow = bootstrap_mean(SAMPLE, level=0.5)
    assert narrow.high - narrow.low < wide.high - wide.low
    assert wide.low <= narrow.low <= narrow.high <= wide.high  # same resamples (same seed): nested quantiles


@pytest.mark.parametrize("values", [[], torch.empty(0)])
def test_empty_is_an_error(values):
    with pytest.raises(ValueError, match="No values"):
        bootstrap_mean(values)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_an_error(bad):
    with pytest.raises(ValueError, match="NaN or infinity"):
        bootstrap_mean([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="NaN or infinity"):
        paired_difference([1.0, bad], [0.0, 0.0])


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5, 95])
def test_bad_level_is_an_error(level):
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([1.0, 2.0], level=level)


def test_bad_n_boot_is_an_error():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean([1.0, 2.0], n_boot=0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
