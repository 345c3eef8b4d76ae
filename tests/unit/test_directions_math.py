"""Direction math on synthetic tensors: sign, recovery of a planted direction, streaming, statistics."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.directions import instruction_hash
from icon2_lens.math.contrast import ContrastAccumulator, cosine_per_layer

METHODS = ("pca", "mean_diff", "pca_centered")


def _planted(n=64, layers=3, d=16, noise=0.01, offset=0.0, seed=0):
    """pos = base + a*v + noise, neg = base - a*v + noise, with a in [1, 3] varying per row."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(layers, d, generator=g), dim=-1)
    base = torch.randn(n, layers, d, generator=g) * 2 + offset
    a = 1 + 2 * torch.rand(n, 1, 1, generator=g)
    pos = base + a * v + noise * torch.randn(n, layers, d, generator=g)
    neg = base - a * v + noise * torch.randn(n, layers, d, generator=g)
    return pos, neg, v


@pytest.mark.parametrize("method", METHODS)
def test_every_method_recovers_planted_direction(method):
    pos, neg, v = _planted()
    u, _ = il.directions.directions_from_activations(pos, neg, method=method)
    assert u.shape == v.shape
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    cos = cosine_per_layer(u, v)
    assert (cos > 0.99).all(), cos  # right direction and right sign


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(4))
def test_sign_follows_mean_difference(method, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(32, 2, 8, generator=g)
    planted = torch.randn(2, 8, generator=g)
    k = (0.5 + torch.rand(32, 1, 1, generator=g))
    for sign in (1.0, -1.0):
        neg = pos - sign * planted * k
        u, stats = il.directions.directions_from_activations(pos, neg, method=method)
        mean_diff = (pos - neg).mean(0)
        assert ((u * mean_diff).sum(-1) > 0).all()
        assert (stats["proj_gap"] > 0).all()
        assert (cosine_per_layer(u, sign * planted) > 0.99).all()


def test_pca_centered_differs_from_pca_when_differences_have_off_axis_spread():
    """pca_centered finds the direction of most variance of the differences, not their mean."""
    g = torch.Generator().manual_seed(0)
    mean_dir = torch.tensor([1.0, 0.0, 0.0, 0.0])
    spread_dir = torch.tensor([0.0, 1.0, 0.0, 0.0])
    diff = 3 * mean_dir + torch.randn(200, 1, generator=g) * spread_dir + 0.01 * torch.randn(200, 4, generator=g)
    neg = torch.randn(200, 4, generator=g)
    pos = neg + diff
    u_mean, _ = il.directions.directions_from_activations(pos[:, None], neg[:, None], method="mean_diff")
    u_cent, _ = il.directions.directions_from_activations(pos[:, None], neg[:, None], method="pca_centered")
    assert abs(float(u_mean[0] @ mean_dir)) > 0.99
    assert abs(float(u_cent[0] @ spread_dir)) > 0.99


@pytest.mark.parametrize("method", METHODS)
def test_streaming_equals_one_batch(method):
    pos, neg, _ = _planted(n=50, noise=0.3, offset=20.0, seed=1)
    one = ContrastAccumulator(n_layers=3, d_model=16)
    one.update(pos, neg)
    many = ContrastAccumulator(n_layers=3, d_model=16)
    for s in (slice(0, 7), slice(7, 8), slice(8, 31), slice(31, 50)):
        many.update(pos[s], neg[s])
    assert one.n == many.n == 50
    u1, s1 = one.directions(method)
    u2, s2 = many.directions(method)
    torch.testing.assert_close(u2, u1, atol=1e-5, rtol=0)
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_one_accumulator(method):
    # the two parts get different shift references (their first batches differ): merge must re-centre
    pos, neg, _ = _planted(n=40, noise=0.5, offset=30.0, seed=3)
    one = ContrastAccumulator(n_layers=3, d_model=16)
    one.update(pos, neg)
    a, b = ContrastAccumulator(n_layers=3, d_model=16), ContrastAccumulator(n_layers=3, d_model=16)
    a.update(pos[:9], neg[:9])
    b.update(pos[9:] + 5.0, neg[9:] + 5.0)  # shift b's reference far from a's ...
    b = ContrastAccumulator(n_layers=3, d_model=16)
    b.update(pos[30:], neg[30:])  # ... then a real second half with its own reference
    b.update(pos[9:30], neg[9:30])
    assert not torch.allclose(a.h_ref, b.h_ref)
    merged = a.merge(b)
    assert merged.n == 40 and (a.n, b.n) == (9, 31)  # inputs untouched
    u1, s1 = one.directions(method)
    u2, s2 = merged.directions(method)
    torch.testing.assert_close(u2, u1, atol=1e-5, rtol=0)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-4, rtol=1e-4, msg=k)
    empty = ContrastAccumulator(n_layers=3, d_model=16)
    assert empty.merge(a).n == a.n and empty.merge(empty).n == 0
    with pytest.raises(ValueError, match="Cannot merge"):
        a.merge(ContrastAccumulator(n_layers=2, d_model=16))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_stats_match_direct_computation(method, offset):
    pos, neg, _ = _planted(n=40, noise=0.5, offset=offset, seed=2)
    acc = ContrastAccumulator(n_layers=3, d_model=16)
    acc.update(pos[:13], neg[:13])
    acc.update(pos[13:], neg[13:])
    u, stats = acc.directions(method)
    assert set(stats) == {"resid_norm", "diff_norm", "explained_variance", "proj_mean", "proj_std", "proj_gap"}
    p64, n64, u64 = pos.double(), neg.double(), u.double()
    diff = p64 - n64
    pooled = torch.cat([p64, n64], 0)
    proj = (pooled * u64).sum(-1)  # [2n, layer]
    dproj = (diff * u64).sum(-1)  # [n, layer]
    want = {
        "resid_norm": pooled.norm(dim=-1).mean(0),
        "diff_norm": diff.norm(dim=-1).mean(0),
        "explained_variance": (dproj**2).sum(0) / (diff**2).sum((0, 2)),
        "proj_mean": proj.mean(0),
        "proj_std": torch.std(proj, dim=0, correction=0),
        "proj_gap": dproj.mean(0),
    }
    for k, w in want.items():
        assert stats[k].shape == (3,)
        torch.testing.assert_close(stats[k].double(), w, atol=1e-4, rtol=1e-4, msg=k)
    assert ((stats["explained_variance"] > 0) & (stats["explained_variance"] <= 1 + 1e-6)).all()
    if method == "mean_diff":
        want_u = torch.nn.functional.normalize(diff.mean(0), dim=-1)
        torch.testing.assert_close(u.double(), want_u, atol=1e-5, rtol=0)


def test_pca_is_top_eigenvector_of_uncentred_differences():
    pos, neg, _ = _planted(n=30, noise=0.5, seed=3)
    u, _ = il.directions.directions_from_activations(pos, neg, method="pca")
    diff = (pos - neg).double()
    for layer in range(3):
        d = diff[:, layer]
        _, _, vh = torch.linalg.svd(d, full_matrices=False)
        assert abs(float(vh[0] @ u[layer].double())) == pytest.approx(1.0, abs=1e-5)


def test_accumulator_errors():
    acc = ContrastAccumulator(n_layers=2, d_model=4)
    with pytest.raises(ValueError, match="No contrast pairs"):
        acc.directions("pca")
    with pytest.raises(ValueError, match="must both be"):
        acc.update(torch.zeros(3, 2, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="must both be"):
        acc.update(torch.zeros(3, 2, 5), torch.zeros(3, 2, 5))
    acc.update(torch.ones(3, 2, 4), torch.ones(3, 2, 4))
    with pytest.raises(ValueError, match="Unknown method"):
        acc.directions("svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not differ"):
        acc.directions("mean_diff")


def test_instruction_hash_is_stable_and_strip_insensitive():
    assert instruction_hash("Write a haiku.") == instruction_hash("  Write a haiku.\n")
    assert instruction_hash("a") != instruction_hash("b")
    assert len(instruction_hash("x")) == 12
