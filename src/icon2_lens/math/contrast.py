"""Contrast statistics and direction methods (pure tensor math, no model).

`ContrastAccumulator` streams paired activations ``h+``, ``h-`` of one criterion, in the cheaper of
two forms chosen by shape (`Storage`): ``d_model x d_model`` second moments per layer (memory
independent of the number of pairs), or, when fewer pairs than ``d_model`` are expected, the rows
themselves (memory twice that of the differences). ``directions(method)`` turns them into one
unit vector per layer through a *direction method*, a typed callable looked up by name in
`DIRECTION_METHODS`:

* ``pca``: the first principal component of the differences ``h+ - h-`` (RepE-style, uncentred);
* ``pca_centered``: the same of the centred differences;
* ``mean_diff``: their mean.

The sign of every direction is fixed so that the mean difference projects positively. A new
method is one function registered with `register_direction_method`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "Method",
    "Storage",
    "DirectionMethod",
    "DIRECTION_METHODS",
    "register_direction_method",
    "get_direction_method",
    "STAT_NAMES",
    "ContrastAccumulator",
    "directions_from_activations",
    "finish_directions",
    "split_halves",
    "cosine_per_layer",
]

#: The built-in direction methods (any name registered in `DIRECTION_METHODS` is accepted too).
Method = Literal["pca", "mean_diff", "pca_centered"]

#: A direction method: ``(diff_gram, mean_diff, n) -> v``. ``diff_gram`` is the uncentred second
#: moment ``sum_i d_i d_i^T`` of one layer's differences ``d_i = h+_i - h-_i`` (float64), ``mean_diff``
#: their mean (float64), ``n`` their count; ``v`` is the direction, of any non-zero norm and either
#: sign (the accumulator normalises it and points it along the mean difference).
DirectionMethod = Callable[
    [Float[Tensor, "d_model d_model"], Float[Tensor, " d_model"], int], Float[Tensor, " d_model"]
]

#: Statistics returned with the directions (see `icon2_lens.DirectionSet.stats`).
STAT_NAMES = ("resid_norm", "diff_norm", "explained_variance", "proj_mean", "proj_std", "proj_gap")


def _pca(diff_gram: Tensor, mean_diff: Tensor, n: int) -> Tensor:
    """Top eigenvector of the uncentred second moment of the differences."""
    _, eigvecs = torch.linalg.eigh(diff_gram)
    return eigvecs[:, -1]


def _pca_centered(diff_gram: Tensor, mean_diff: Tensor, n: int) -> Tensor:
    """Top eigenvector of the centred second moment (the differences' direction of most variance)."""
    _, eigvecs = torch.linalg.eigh(diff_gram - n * torch.outer(mean_diff, mean_diff))
    return eigvecs[:, -1]


def _mean_diff(diff_gram: Tensor, mean_diff: Tensor, n: int) -> Tensor:
    """The mean difference."""
    return mean_diff


#: Direction methods by name. Add one with `register_direction_method`.
DIRECTION_METHODS: dict[str, DirectionMethod] = {"pca": _pca, "mean_diff": _mean_diff, "pca_centered": _pca_centered}


def register_direction_method(name: str, method: DirectionMethod, *, overwrite: bool = False) -> None:
    """Make ``method`` available as ``ContrastAccumulator.directions(name)`` (and ``extract_directions(method=name)``).

    Refuses to replace an existing name unless ``overwrite=True``.

    Examples:
        >>> register_direction_method("first_axis", lambda g, m, n: torch.eye(len(m), dtype=m.dtype)[0])
        >>> acc = ContrastAccumulator(1, 3); acc.update(torch.ones(2, 1, 3), torch.zeros(2, 1, 3))
        >>> acc.directions("first_axis")[0]
        tensor([[1., 0., 0.]])
        >>> del DIRECTION_METHODS["first_axis"]
    """
    if not callable(method):
        raise TypeError(f"A direction method must be callable (diff_gram, mean_diff, n) -> vector, got {method!r}.")
    if name in DIRECTION_METHODS and not overwrite:
        raise ValueError(f"Direction method {name!r} exists already; pass overwrite=True to replace it.")
    DIRECTION_METHODS[name] = method


def get_direction_method(method: str) -> DirectionMethod:
    """The registered direction method called ``method``; a clear error for an unknown name."""
    if method not in DIRECTION_METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {list(DIRECTION_METHODS)}.")
    return DIRECTION_METHODS[method]


#: How a `ContrastAccumulator` keeps its pairs: ``"gram"`` (per layer the second moments of the differences
#: and of the pooled activations, ``2 x layer x d_model^2`` floats whatever the number of pairs), ``"rows"``
#: (the differences and the positive activations themselves, ``2 x pairs x layer x d_model`` floats), or
#: ``"auto"``: rows when the number of pairs (``capacity``) is known and below ``d_model``, else gram.
Storage = Literal["auto", "gram", "rows"]

#: Rows per block in the rows form's finishing math (bounds its transient memory to a few MiB).
_CHUNK = 128
#: Initial capacity of a ``storage="rows"`` accumulator given no ``capacity`` (it grows on demand).
_DEFAULT_ROWS = 256


@dataclass
class _RowSums:
    """Per-layer sums of a rows-form accumulator (float64): what the Gram form keeps as running sums."""

    diff_sum: Tensor  # [L, d]
    h_sum: Tensor  # [L, d]
    resid_norm_sum: Tensor  # [L]
    diff_norm_sum: Tensor  # [L]


def _chunks(n: int) -> list[slice]:
    return [slice(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]


def _matvec(rows: Tensor, v: Tensor) -> Tensor:
    """``rows @ v`` in float64 (``rows`` float32 [n, d], ``v`` float64 [d]), block by block."""
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    for c in _chunks(rows.shape[0]):
        out[c] = rows[c].double() @ v
    return out


def _rmatvec(rows: Tensor, u: Tensor) -> Tensor:
    """``rows^T @ u`` in float64 (``rows`` float32 [n, d], ``u`` float64 [n]), block by block."""
    out = torch.zeros(rows.shape[1], dtype=torch.float64)
    for c in _chunks(rows.shape[0]):
        out += rows[c].double().T @ u[c]
    return out


def _row_gram(rows: Tensor, shift: Tensor | None = None) -> Tensor:
    """The ``n x n`` Gram matrix ``(rows - shift)(rows - shift)^T`` (float32 products, float64 result).

    Shifted rows are made block by block, so no ``n x d`` copy is held.
    """
    n = rows.shape[0]
    if shift is None:
        return (rows @ rows.T).double()
    s32 = shift.float()
    gram = torch.empty(n, n, dtype=torch.float64)
    blocks = _chunks(n)
    for i, ci in enumerate(blocks):
        a = rows[ci] - s32
        for cj in blocks[: i + 1]:
            blk = (a @ (rows[cj] - s32).T).double()
            gram[ci, cj] = blk
            gram[cj, ci] = blk.T
    return gram


def _top_eigvec(gram: Tensor) -> Tensor:
    _, eigvecs = torch.linalg.eigh(gram)
    return eigvecs[:, -1]


def _orient(v: Tensor, mean_diff: Tensor, layer: int) -> Tensor:
    """``v`` as a unit vector pointing along the mean difference; an error for a zero or non-finite ``v``."""
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"Layer {layer}: the contrast pairs do not differ, so no direction exists.")
    v = v / norm
    return -v if torch.dot(v, mean_diff) < 0 else v


@dataclass
class ContrastAccumulator:
    """Streaming contrast statistics of one criterion, per layer, in the cheaper of two forms.

    * Gram form (``storage="gram"``): the count, the sum and second moment of the differences
      ``h+ - h-``, the sum and a shifted second moment of the pooled activations ``{h+, h-}``, and
      norm sums. Memory is ``2 x layer x d_model^2`` floats, independent of the number of pairs.
    * Rows form (``storage="rows"``): the differences and the positive activations themselves, in
      buffers of ``capacity`` rows per layer (the negatives are ``h+ - diff``): exactly
      ``2 x capacity x layer x d_model`` float32 values and nothing else, or 1.5 times the differences
      when the positives are kept in the 16-bit dtype the model computed them in (``rows_dtype``, lossless
      for them: extraction passes the model's dtype). Directions come from the ``n x n``
      Gram matrix of the rows, so this is both smaller and faster than the Gram form when there are
      fewer pairs than ``d_model``.
    * ``storage="auto"`` (default) picks rows when ``capacity`` is given and below ``d_model``,
      else the Gram form (the behaviour without ``capacity``).

    A rows accumulator given more pairs than its capacity grows while it stays below ``d_model`` rows,
    and otherwise folds what it holds into the Gram form and goes on there: it never fails and never
    keeps more than the Gram form would (``form`` says which form it is in now). Both forms give the
    same directions and statistics (to float32 rounding).

    Examples:
        >>> acc = ContrastAccumulator(n_layers=2, d_model=4)
        >>> acc.update(torch.randn(8, 2, 4) + 1, torch.randn(8, 2, 4))
        >>> acc.n, acc.form
        (8, 'gram')
        >>> rows = ContrastAccumulator(2, 64, capacity=8)  # 8 pairs < d_model 64: keeps the rows
        >>> rows.update(torch.randn(8, 2, 64) + 1, torch.randn(8, 2, 64))
        >>> rows.form, rows.nbytes() == 2 * 8 * 2 * 64 * 4
        ('rows', True)
    """

    n_layers: int
    d_model: int
    n: int = 0
    capacity: int | None = field(default=None, kw_only=True)
    storage: Storage = field(default="auto", kw_only=True)
    #: dtype of the kept positive activations in the rows form: float32, or the 16-bit dtype the activations
    #: were computed in (bfloat16/float16: lossless for them, and the rows form then takes 1.5x the differences)
    rows_dtype: torch.dtype = field(default=torch.float32, kw_only=True)
    form: Literal["gram", "rows"] = field(init=False, default="gram")
    # Gram form (None in the rows form)
    diff_sum: Tensor | None = field(init=False, default=None)
    diff_gram: Tensor | None = field(init=False, default=None)
    h_sum: Tensor | None = field(init=False, default=None)
    h_gram: Tensor | None = field(init=False, default=None)
    h_ref: Tensor | None = field(init=False, default=None)
    resid_norm_sum: Tensor | None = field(init=False, default=None)
    diff_norm_sum: Tensor | None = field(init=False, default=None)
    # Rows form (empty in the Gram form): per layer a [capacity, d_model] float32 buffer, first n rows used
    diff_rows: list[Tensor] = field(init=False, default_factory=list, repr=False)
    pos_rows: list[Tensor] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.storage not in ("auto", "gram", "rows"):
            raise ValueError(f"storage must be 'auto', 'gram' or 'rows', got {self.storage!r}.")
        if self.rows_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"rows_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                             f"got {self.rows_dtype}.")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"capacity must be a number of pairs >= 0, got {self.capacity}.")
        rows = self.storage == "rows" or (
            self.storage == "auto" and self.capacity is not None and self.capacity < self.d_model
        )
        if rows:
            cap = self.capacity if self.capacity is not None else min(_DEFAULT_ROWS, max(self.d_model - 1, 1))
            self.form = "rows"
            self.diff_rows = [torch.empty(cap, self.d_model) for _ in range(self.n_layers)]
            self.pos_rows = [torch.empty(cap, self.d_model, dtype=self.rows_dtype) for _ in range(self.n_layers)]
        else:
            self._init_gram(zeros=True)

    def _init_gram(self, *, zeros: bool) -> None:
        L, d = self.n_layers, self.d_model
        self.form = "gram"
        self.diff_sum = torch.zeros(L, d, dtype=torch.float64)
        self.h_sum = torch.zeros(L, d, dtype=torch.float64)
        self.resid_norm_sum = torch.zeros(L, dtype=torch.float64)
        self.diff_norm_sum = torch.zeros(L, dtype=torch.float64)
        # without zeros the pages stay untouched (not resident) until a layer is written
        make = torch.zeros if zeros else torch.empty
        self.diff_gram = make(L, d, d, dtype=torch.float32)
        self.h_gram = make(L, d, d, dtype=torch.float32)

    @property
    def rows_capacity(self) -> int:
        """Rows per layer the rows form has room for (0 in the Gram form)."""
        return self.diff_rows[0].shape[0] if self.form == "rows" and self.diff_rows else 0

    def nbytes(self) -> int:
        """Bytes of the tensors this accumulator holds (its whole state).

        Examples:
            >>> ContrastAccumulator(2, 4).nbytes()  # two [2, 4, 4] float32 Grams + float64 sums
            416
        """
        tensors = [*self.diff_rows, *self.pos_rows, self.diff_sum, self.diff_gram, self.h_sum, self.h_gram,
                   self.h_ref, self.resid_norm_sum, self.diff_norm_sum]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def update(self, pos: Float[Tensor, "batch layer d_model"], neg: Float[Tensor, "batch layer d_model"]) -> None:
        """Add a batch of paired activations (row ``i`` of ``pos`` pairs with row ``i`` of ``neg``)."""
        if pos.shape != neg.shape or pos.shape[1:] != (self.n_layers, self.d_model):
            raise ValueError(
                f"pos {tuple(pos.shape)} and neg {tuple(neg.shape)} must both be "
                f"[batch, {self.n_layers}, {self.d_model}]."
            )
        pos, neg = pos.float(), neg.float()
        b = pos.shape[0]
        if self.form == "rows" and self.n + b > self.rows_capacity:
            self._make_room(self.n + b)
        if self.form == "rows":  # written straight into the buffers: no batch-sized temporary
            for layer in range(self.n_layers):
                torch.sub(pos[:, layer], neg[:, layer], out=self.diff_rows[layer][self.n:self.n + b])
                self.pos_rows[layer][self.n:self.n + b] = pos[:, layer]
            self.n += b
            return
        diff = pos - neg
        assert self.diff_gram is not None and self.h_gram is not None  # the Gram form
        assert self.diff_sum is not None and self.h_sum is not None
        assert self.resid_norm_sum is not None and self.diff_norm_sum is not None
        pooled = torch.cat([pos, neg], 0)
        if self.h_ref is None:  # shift for a numerically stable second moment
            self.h_ref = pooled.mean(0)
        shifted = (pooled - self.h_ref).transpose(0, 1)  # [layer, 2b, d]
        dt = diff.transpose(0, 1)
        self.diff_gram += dt.transpose(1, 2) @ dt
        self.h_gram += shifted.transpose(1, 2) @ shifted
        self.diff_sum += diff.sum(0).double()
        self.h_sum += pooled.sum(0).double()
        self.resid_norm_sum += pooled.norm(dim=-1).sum(0).double()
        self.diff_norm_sum += diff.norm(dim=-1).sum(0).double()
        self.n += b

    # ---- rows form ------------------------------------------------------------------------------
    def _make_room(self, need: int) -> None:
        """Grow the row buffers while they stay below ``d_model`` rows, else fold into the Gram form."""
        if need < self.d_model:
            cap = min(max(need, 2 * self.rows_capacity), self.d_model - 1)
            for bufs in (self.diff_rows, self.pos_rows):
                for layer in range(self.n_layers):  # one layer at a time: the transient is one layer's buffer
                    new = torch.empty(cap, self.d_model, dtype=bufs[layer].dtype)
                    new[: self.n] = bufs[layer][: self.n]
                    bufs[layer] = new
        else:
            self._fold()

    def _row_sums(self) -> _RowSums:
        """The sums the Gram form keeps, computed from the rows (float64, block by block)."""
        L, d, n = self.n_layers, self.d_model, self.n
        out = _RowSums(torch.zeros(L, d, dtype=torch.float64), torch.zeros(L, d, dtype=torch.float64),
                       torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64))
        for layer in range(L):
            rows_d, rows_p = self.diff_rows[layer], self.pos_rows[layer]
            for c in _chunks(n):
                dc, pc = rows_d[c], rows_p[c].float()
                nc = pc - dc
                out.diff_sum[layer] += dc.double().sum(0)
                out.h_sum[layer] += pc.double().sum(0) + nc.double().sum(0)
                out.resid_norm_sum[layer] += pc.norm(dim=-1).double().sum() + nc.norm(dim=-1).double().sum()
                out.diff_norm_sum[layer] += dc.norm(dim=-1).double().sum()
        return out

    def _rows_into_gram(self, target: ContrastAccumulator, *, fresh: bool, release: bool) -> None:
        """Add this accumulator's rows to ``target``'s second moments (shifted by ``target.h_ref``).

        ``fresh``: zero each layer of ``target``'s (uninitialised) Gram tensors first. ``release``: free
        each layer's rows once added (folding in place). Sums and counts are the caller's.
        """
        assert target.diff_gram is not None and target.h_gram is not None
        n = self.n
        for layer in range(self.n_layers):
            rows_d, rows_p = self.diff_rows[layer][:n], self.pos_rows[layer][:n]
            dg, hg = target.diff_gram[layer], target.h_gram[layer]
            if fresh:
                dg.zero_()
                hg.zero_()
            if n:
                assert target.h_ref is not None
                ref = target.h_ref[layer]
                dg.addmm_(rows_d.T, rows_d)
                for c in _chunks(n):
                    sp = rows_p[c].float() - ref
                    hg.addmm_(sp.T, sp)
                    sn = sp - rows_d[c]
                    hg.addmm_(sn.T, sn)
            if release:
                self.diff_rows[layer] = torch.empty(0, self.d_model)
                self.pos_rows[layer] = torch.empty(0, self.d_model)

    def _fold(self) -> None:
        """Turn this rows-form accumulator into the Gram form (in place, one layer at a time)."""
        sums = self._row_sums()
        self._init_gram(zeros=False)
        self.h_ref = (sums.h_sum / (2 * self.n)).float() if self.n else None
        self._rows_into_gram(self, fresh=True, release=True)
        self.diff_rows, self.pos_rows = [], []
        self.diff_sum, self.h_sum = sums.diff_sum, sums.h_sum
        self.resid_norm_sum, self.diff_norm_sum = sums.resid_norm_sum, sums.diff_norm_sum

    def merge(self, other: ContrastAccumulator) -> ContrastAccumulator:
        """A new accumulator holding the pairs of both (as if all had been added to one); the inputs are untouched.

        Two rows-form accumulators give one with their rows concatenated when the total stays below
        ``d_model`` (or both were made with ``storage="rows"``); otherwise the result is in the Gram form.

        Examples:
            >>> a, b = ContrastAccumulator(2, 4), ContrastAccumulator(2, 4)
            >>> a.update(torch.randn(3, 2, 4), torch.randn(3, 2, 4))
            >>> b.update(torch.randn(5, 2, 4), torch.randn(5, 2, 4))
            >>> a.merge(b).n
            8
        """
        if (self.n_layers, self.d_model) != (other.n_layers, other.d_model):
            raise ValueError(f"Cannot merge accumulators of shape {(self.n_layers, self.d_model)} and "
                             f"{(other.n_layers, other.d_model)}.")
        total = self.n + other.n
        both = (self, other)
        if all(a.form == "rows" for a in both) and (
            total < self.d_model or all(a.storage == "rows" for a in both)
        ):
            dtype = self.rows_dtype if self.rows_dtype == other.rows_dtype else torch.float32
            rows = ContrastAccumulator(self.n_layers, self.d_model, capacity=total, storage="rows", rows_dtype=dtype)
            for layer in range(self.n_layers):
                at = 0
                for a in both:
                    rows.diff_rows[layer][at:at + a.n] = a.diff_rows[layer][: a.n]
                    rows.pos_rows[layer][at:at + a.n] = a.pos_rows[layer][: a.n]
                    at += a.n
            rows.n = total
            return rows
        out = ContrastAccumulator(self.n_layers, self.d_model, storage="gram")
        assert out.diff_gram is not None and out.h_gram is not None and out.diff_sum is not None
        assert out.h_sum is not None and out.resid_norm_sum is not None and out.diff_norm_sum is not None
        for a in (a for a in both if a.n):
            if a.form == "rows":
                sums = a._row_sums()
                if out.h_ref is None:
                    out.h_ref = (sums.h_sum / (2 * a.n)).float()
                a._rows_into_gram(out, fresh=False, release=False)
                a_sums = (sums.diff_sum, sums.h_sum, sums.resid_norm_sum, sums.diff_norm_sum)
            else:
                assert a.h_ref is not None and a.h_gram is not None and a.diff_gram is not None
                assert a.diff_sum is not None and a.h_sum is not None
                assert a.resid_norm_sum is not None and a.diff_norm_sum is not None
                if out.h_ref is None:
                    out.h_ref = a.h_ref
                # re-centre a's shifted second moment on out.h_ref: sum (h-r')(h-r')^T with r' = out.h_ref
                shift = (a.h_ref - out.h_ref).double()  # r - r'
                s = a.h_sum - 2 * a.n * a.h_ref.double()  # sum (h - r) over the 2n pooled rows
                cross = shift[:, :, None] * s[:, None, :]
                corr = cross + cross.transpose(1, 2) + 2 * a.n * shift[:, :, None] * shift[:, None, :]
                out.h_gram += (a.h_gram.double() + corr).float()
                out.diff_gram += a.diff_gram
                a_sums = (a.diff_sum, a.h_sum, a.resid_norm_sum, a.diff_norm_sum)
            out.diff_sum += a_sums[0]
            out.h_sum += a_sums[1]
            out.resid_norm_sum += a_sums[2]
            out.diff_norm_sum += a_sums[3]
            out.n += a.n
        return out

    def directions(
        self, method: Method | str = "pca"
    ) -> tuple[Float[Tensor, "layer d_model"], dict[str, Float[Tensor, " layer"]]]:
        """Unit direction per layer (by the method registered as ``method``) and its statistics (see `STAT_NAMES`)."""
        fn = get_direction_method(method)
        if self.n == 0:
            raise ValueError("No contrast pairs were accumulated; pass at least one instruction.")
        if self.form == "rows":
            return self._rows_directions(fn)
        assert self.diff_gram is not None and self.h_gram is not None and self.diff_sum is not None
        assert self.h_sum is not None and self.resid_norm_sum is not None and self.diff_norm_sum is not None
        n = self.n
        mean_diff = self.diff_sum / n  # float64 [L, d]
        vecs = torch.empty(self.n_layers, self.d_model, dtype=torch.float64)
        for layer in range(self.n_layers):
            vecs[layer] = _orient(fn(self.diff_gram[layer].double(), mean_diff[layer], n), mean_diff[layer], layer)
        # statistics
        gd = torch.stack([vecs[i] @ self.diff_gram[i].double() @ vecs[i] for i in range(self.n_layers)])
        trace = torch.stack([self.diff_gram[i].double().diagonal().sum() for i in range(self.n_layers)])
        m_pool = 2 * n
        h_mean = self.h_sum / m_pool
        assert self.h_ref is not None
        delta = h_mean - self.h_ref.double()
        var = torch.stack([
            vecs[i] @ self.h_gram[i].double() @ vecs[i] / m_pool - torch.dot(vecs[i], delta[i]) ** 2
            for i in range(self.n_layers)
        ])
        stats = {
            "resid_norm": self.resid_norm_sum / m_pool,
            "diff_norm": self.diff_norm_sum / n,
            "explained_variance": gd / trace.clamp_min(1e-30),
            "proj_mean": (vecs * h_mean).sum(-1),
            "proj_std": var.clamp_min(0).sqrt(),
            "proj_gap": (vecs * mean_diff).sum(-1),
        }
        return vecs.float(), {k: v.float() for k, v in stats.items()}

    def _rows_directions(
        self, fn: DirectionMethod
    ) -> tuple[Float[Tensor, "layer d_model"], dict[str, Float[Tensor, " layer"]]]:
        """`directions` in the rows form, one layer at a time with small transients.

        The built-in methods work on the ``n x n`` Gram matrix of the rows (its top eigenvector ``u``
        gives ``v = D^T u``); any other registered method gets the ``d x d`` second moment, built for
        one layer at a time. The statistics are taken from the projections of the rows themselves.
        """
        n, L = self.n, self.n_layers
        sums = self._row_sums()
        mean_diff = sums.diff_sum / n
        vecs = torch.empty(L, self.d_model, dtype=torch.float64)
        gd, trace, p_mean, p_var = (torch.empty(L, dtype=torch.float64) for _ in range(4))
        for layer in range(L):
            rows_d, rows_p = self.diff_rows[layer][:n], self.pos_rows[layer][:n]
            m = mean_diff[layer]
            if fn is _pca:
                v = _rmatvec(rows_d, _top_eigvec(_row_gram(rows_d)))
            elif fn is _pca_centered:
                u = _top_eigvec(_row_gram(rows_d, m))
                v = _rmatvec(rows_d, u) - m * u.sum()
            elif fn is _mean_diff:
                v = m
            else:
                v = fn((rows_d.T @ rows_d).double(), m, n)
            v = _orient(v, m, layer)
            vecs[layer] = v
            dv, pv = _matvec(rows_d, v), _matvec(rows_p, v)
            proj = torch.cat([pv, pv - dv])
            gd[layer] = dv @ dv
            trace[layer] = sum(float((rows_d[c].double() ** 2).sum()) for c in _chunks(n))
            p_mean[layer] = proj.mean()
            p_var[layer] = ((proj - p_mean[layer]) ** 2).mean()
        stats = {
            "resid_norm": sums.resid_norm_sum / (2 * n),
            "diff_norm": sums.diff_norm_sum / n,
            "explained_variance": gd / trace.clamp_min(1e-30),
            "proj_mean": p_mean,
            "proj_std": p_var.sqrt(),
            "proj_gap": (vecs * mean_diff).sum(-1),
        }
        return vecs.float(), {k: v.float() for k, v in stats.items()}


def directions_from_activations(
    pos: Float[Tensor, "n layer d_model"],
    neg: Float[Tensor, "n layer d_model"],
    *,
    method: Method | str = "pca",
) -> tuple[Float[Tensor, "layer d_model"], dict[str, Float[Tensor, " layer"]]]:
    """Directions and statistics from paired activations held in memory (pure tensor math).

    Examples:
        >>> u, stats = directions_from_activations(torch.randn(16, 3, 8) + 2, torch.randn(16, 3, 8))
        >>> u.shape, sorted(stats)[:2]
        (torch.Size([3, 8]), ['diff_norm', 'explained_variance'])
    """
    acc = ContrastAccumulator(n_layers=pos.shape[1], d_model=pos.shape[2])
    acc.update(pos, neg)
    return acc.directions(method)


def finish_directions(
    accs: Sequence[ContrastAccumulator], method: Method | str
) -> tuple[Float[Tensor, "criterion layer d_model"], dict[str, Float[Tensor, "criterion layer"]]]:
    """Stack the directions and statistics of one accumulator per criterion.

    Examples:
        >>> a = ContrastAccumulator(2, 4); a.update(torch.randn(5, 2, 4) + 1, torch.randn(5, 2, 4))
        >>> finish_directions([a, a], "pca")[0].shape
        torch.Size([2, 2, 4])
    """
    per = [a.directions(method) for a in accs]
    vecs = torch.stack([p[0] for p in per])
    stats = {k: torch.stack([p[1][k] for p in per]) for k in STAT_NAMES}
    return vecs, stats


def split_halves(n: int, *, seed: int = 0) -> list[int]:
    """Group id (0 or 1) of each of ``n`` items: two disjoint random halves (seeded).

    Examples:
        >>> split_halves(4, seed=0).count(0)
        2
    """
    if n < 4:
        raise ValueError(f"Split-half stability needs at least 4 instructions, got {n}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    groups = [0] * n
    for rank, i in enumerate(perm):
        groups[i] = 0 if rank < n // 2 else 1
    return groups


def cosine_per_layer(a: Float[Tensor, "layer d_model"], b: Float[Tensor, "layer d_model"]) -> Float[Tensor, " layer"]:
    """Cosine similarity of two unit-vector stacks, layer by layer.

    Examples:
        >>> v = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        >>> bool(torch.allclose(cosine_per_layer(v, v), torch.ones(3)))
        True
    """
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)
