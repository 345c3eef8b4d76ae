"""The rows form of ContrastAccumulator: same directions and statistics as the Gram form, less memory."""

from __future__ import annotations

import pytest
import torch

from icon2_lens.math.contrast import (
    DIRECTION_METHODS,
    ContrastAccumulator,
    register_direction_method,
)

METHODS = ["pca", "pca_centered", "mean_diff"]


def _planted(n: int, L: int, d: int, *, seed: int = 0, offset: float = 10.0):
    """Pairs whose differences lie mostly along one random direction per layer (a clear top component)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(L, d, generator=g), dim=-1)
    base = torch.randn(n, L, d, generator=g) * 2 + offset
    scale = 3 + torch.rand(n, 1, 1, generator=g)
    pos = base + scale * direction + 0.5 * torch.randn(n, L, d, generator=g)
    neg = base + 0.5 * torch.randn(n, L, d, generator=g)
    return pos, neg


def _fill(acc: ContrastAccumulator, pos, neg, batch: int = 7) -> ContrastAccumulator:
    for s in range(0, pos.shape[0], batch):
        acc.update(pos[s:s + batch], neg[s:s + batch])
    return acc


def _assert_same(got, want, *, cos: float = 0.9999):
    (u1, s1), (u2, s2) = got, want
    assert u1.shape == u2.shape
    c = torch.nn.functional.cosine_similarity(u1.double(), u2.double(), dim=-1)
    assert float(c.min()) >= cos, c
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-4 * float(s2[k].abs().max()) + 1e-6, msg=k)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "L", "d", "offset"), [(20, 3, 48, 10.0), (9, 2, 16, 0.0), (30, 2, 64, 40.0)])
def test_rows_give_the_gram_directions_and_stats(method, n, L, d, offset):
    pos, neg = _planted(n, L, d, seed=n, offset=offset)
    gram = _fill(ContrastAccumulator(L, d), pos, neg)
    rows = _fill(ContrastAccumulator(L, d, capacity=n), pos, neg)
    assert (gram.form, rows.form) == ("gram", "rows")
    _assert_same(rows.directions(method), gram.directions(method))


@pytest.mark.parametrize("method", METHODS)
def test_more_pairs_than_capacity_grow_then_fold_into_the_gram_form(method):
    L, d = 2, 16
    pos, neg = _planted(40, L, d, seed=5)
    gram = _fill(ContrastAccumulator(L, d), pos, neg)
    # below d_model the buffers grow and stay rows
    grown = _fill(ContrastAccumulator(L, d, capacity=3), pos[:12], neg[:12], batch=5)
    assert grown.form == "rows" and grown.n == 12 and 12 <= grown.rows_capacity < d
    _assert_same(grown.directions(method), _fill(ContrastAccumulator(L, d), pos[:12], neg[:12]).directions(method))
    # reaching d_model folds what is held into the Gram form, then goes on there
    folded = _fill(ContrastAccumulator(L, d, capacity=3), pos, neg, batch=5)
    assert folded.form == "gram" and folded.n == 40 and folded.diff_rows == []
    _assert_same(folded.directions(method), gram.directions(method))
    # explicit rows without a capacity: same
    rows = _fill(ContrastAccumulator(L, d, storage="rows"), pos, neg, batch=11)
    assert rows.form == "gram"
    _assert_same(rows.directions(method), gram.directions(method))
    # a single batch larger than d_model folds an empty rows accumulator
    one = ContrastAccumulator(L, d, capacity=2)
    one.update(pos, neg)
    assert one.form == "gram"
    _assert_same(one.directions(method), gram.directions(method))


@pytest.mark.parametrize("method", METHODS)
def test_merge_rows_with_rows_and_with_gram(method):
    L, d = 3, 40
    pos, neg = _planted(30, L, d, seed=7, offset=25.0)
    want = _fill(ContrastAccumulator(L, d), pos, neg).directions(method)
    ra = _fill(ContrastAccumulator(L, d, capacity=12), pos[:12], neg[:12])
    rb = _fill(ContrastAccumulator(L, d, capacity=18), pos[12:], neg[12:])
    gb = _fill(ContrastAccumulator(L, d), pos[12:], neg[12:])
    ga = _fill(ContrastAccumulator(L, d), pos[:12], neg[:12])

    rr = ra.merge(rb)
    assert rr.form == "rows" and rr.n == 30 and rr.rows_capacity == 30
    _assert_same(rr.directions(method), want)
    for mixed in (ra.merge(gb), ga.merge(rb), rb.merge(ga)):
        assert mixed.form == "gram" and mixed.n == 30
        _assert_same(mixed.directions(method), want)
    # the inputs are untouched
    assert (ra.form, ra.n, rb.form, rb.n, gb.n) == ("rows", 12, "rows", 18, 18)
    _assert_same(ra.directions(method), ga.directions(method))
    # with an empty side
    empty = ContrastAccumulator(L, d, capacity=0)
    assert empty.form == "rows"
    _assert_same(empty.merge(ra).directions(method), ra.directions(method))
    assert empty.merge(empty).n == 0


def test_merge_of_rows_reaching_d_model_gives_the_gram_form():
    L, d = 2, 16
    pos, neg = _planted(20, L, d, seed=8)
    a = _fill(ContrastAccumulator(L, d, capacity=10), pos[:10], neg[:10])
    b = _fill(ContrastAccumulator(L, d, capacity=10), pos[10:], neg[10:])
    merged = a.merge(b)
    assert merged.form == "gram" and merged.n == 20
    _assert_same(merged.directions("pca"), _fill(ContrastAccumulator(L, d), pos, neg).directions("pca"))
    # asked for rows explicitly on both sides: kept as rows
    a2 = _fill(ContrastAccumulator(L, d, capacity=10, storage="rows"), pos[:10], neg[:10])
    b2 = _fill(ContrastAccumulator(L, d, capacity=10, storage="rows"), pos[10:], neg[10:])
    assert a2.merge(b2).form == "rows"


def test_a_custom_or_replaced_method_gets_the_d_by_d_second_moment_in_the_rows_form():
    L, d, n = 2, 24, 10
    pos, neg = _planted(n, L, d, seed=9)
    rows = _fill(ContrastAccumulator(L, d, capacity=n), pos, neg)
    gram = _fill(ContrastAccumulator(L, d), pos, neg)
    calls = []

    def second_eigvec(diff_gram, mean_diff, count):
        calls.append((tuple(diff_gram.shape), diff_gram.dtype, mean_diff.dtype, count))
        return torch.linalg.eigh(diff_gram)[1][:, -2]

    register_direction_method("second_eigvec", second_eigvec)
    original = DIRECTION_METHODS["pca"]
    try:
        _assert_same(rows.directions("second_eigvec"), gram.directions("second_eigvec"), cos=0.999)
        assert calls[0] == ((d, d), torch.float64, torch.float64, n) and len(calls) == 2 * L
        # a user who replaces "pca" gets their function, not the built-in fast path
        register_direction_method("pca", second_eigvec, overwrite=True)
        calls.clear()
        u_rows, _ = rows.directions("pca")
        assert len(calls) == L
        u_second, _ = gram.directions("second_eigvec")
        assert float(torch.nn.functional.cosine_similarity(u_rows, u_second, dim=-1).min()) >= 0.999
    finally:
        register_direction_method("pca", original, overwrite=True)
        del DIRECTION_METHODS["second_eigvec"]


def test_auto_chooses_the_form_by_shape_and_bad_options_are_refused():
    assert ContrastAccumulator(2, 16).form == "gram"  # capacity unknown: today's form
    assert ContrastAccumulator(2, 16, capacity=15).form == "rows"
    assert ContrastAccumulator(2, 16, capacity=16).form == "gram"
    assert ContrastAccumulator(2, 16, capacity=4, storage="gram").form == "gram"
    assert ContrastAccumulator(2, 16, capacity=64, storage="rows").form == "rows"
    assert ContrastAccumulator(2, 16, storage="rows").rows_capacity == 15
    with pytest.raises(ValueError, match="storage must be"):
        ContrastAccumulator(2, 16, storage="sparse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity"):
        ContrastAccumulator(2, 16, capacity=-1)


@pytest.mark.parametrize(("n", "L", "d"), [(10, 3, 32), (63, 2, 64), (100, 4, 512)])
def test_rows_memory_is_twice_the_differences_and_below_the_gram(n, L, d):
    pos, neg = _planted(n, L, d, seed=1)
    rows = _fill(ContrastAccumulator(L, d, capacity=n), pos, neg, batch=16)
    gram = ContrastAccumulator(L, d)
    differences = n * L * d * 4  # the pair differences themselves, float32
    assert rows.nbytes() == 2 * differences  # nothing else: the sums are computed at the end
    assert rows.nbytes() < gram.nbytes()
    rows.directions("pca")
    assert rows.nbytes() == 2 * differences
    tensors = [*rows.diff_rows, *rows.pos_rows]
    assert sum(t.numel() * t.element_size() for t in tensors) == rows.nbytes()
    assert all(t.is_contiguous() and t.shape == (n, d) and t.dtype == torch.float32 for t in tensors)


def test_rows_errors_match_the_gram_form():
    acc = ContrastAccumulator(2, 8, capacity=4)
    with pytest.raises(ValueError, match="No contrast pairs"):
        acc.directions("pca")
    with pytest.raises(ValueError, match="must both be"):
        acc.update(torch.zeros(3, 2, 8), torch.zeros(2, 2, 8))
    acc.update(torch.ones(3, 2, 8), torch.ones(3, 2, 8))
    with pytest.raises(ValueError, match="do not differ"):
        acc.directions("pca")
    with pytest.raises(ValueError, match="Unknown method"):
        acc.directions("svd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_positives_are_lossless_for_16_bit_activations(dtype):
    # activations a 16-bit model computed: representable in its dtype (the readers hand them over as float32)
    pos, neg = (x.to(dtype).float() for x in _planted(40, 3, 64))
    wide = _fill(ContrastAccumulator(3, 64, capacity=40), pos, neg)
    narrow = _fill(ContrastAccumulator(3, 64, capacity=40, rows_dtype=dtype), pos, neg)
    assert narrow.form == "rows" and narrow.pos_rows[0].dtype == dtype
    for method in METHODS:
        u1, s1 = narrow.directions(method)
        u2, s2 = wide.directions(method)
        assert torch.equal(u1, u2), method  # the same numbers were kept
        for k in s1:
            assert torch.equal(s1[k], s2[k]), (method, k)
    diffs = 40 * 3 * 64 * 4
    assert narrow.nbytes() == diffs + diffs // 2  # 1.5x the differences
    _assert_same(narrow.directions("pca"), _fill(ContrastAccumulator(3, 64, storage="gram"), pos, neg).directions("pca"))


def test_16_bit_rows_grow_merge_and_fold():
    pos, neg = (x.bfloat16().float() for x in _planted(60, 2, 32))
    gram = _fill(ContrastAccumulator(2, 32, storage="gram"), pos, neg).directions("pca")
    grown = _fill(ContrastAccumulator(2, 32, capacity=4, rows_dtype=torch.bfloat16), pos[:20], neg[:20])
    assert grown.form == "rows" and grown.pos_rows[0].dtype == torch.bfloat16 and grown.rows_capacity >= 20
    rest = _fill(ContrastAccumulator(2, 32, capacity=40, storage="rows", rows_dtype=torch.bfloat16), pos[20:], neg[20:])
    merged = grown.merge(rest)  # 60 rows >= d_model 32: the Gram form
    assert merged.form == "gram"
    _assert_same(merged.directions("pca"), gram)
    both_rows = grown.merge(_fill(ContrastAccumulator(2, 32, capacity=8, rows_dtype=torch.bfloat16), pos[20:28],
                                  neg[20:28]))
    assert both_rows.form == "rows" and both_rows.pos_rows[0].dtype == torch.bfloat16
    mixed = grown.merge(_fill(ContrastAccumulator(2, 32, capacity=8), pos[20:28], neg[20:28]))
    assert mixed.form == "rows" and mixed.pos_rows[0].dtype == torch.float32
    folded = _fill(ContrastAccumulator(2, 32, capacity=8, rows_dtype=torch.bfloat16), pos, neg)  # overflows d_model
    assert folded.form == "gram"
    _assert_same(folded.directions("pca"), gram)
    with pytest.raises(ValueError, match="rows_dtype"):
        ContrastAccumulator(2, 32, capacity=8, rows_dtype=torch.int8)
