"""Contrast statistics and direction methods (pure tensor math, no model).

`ContrastAccumulator` streams paired activations ``h+``, ``h-`` of one criterion (sums and
``d_model x d_model`` second moments per layer, so memory does not grow with the number of pairs);
``directions(method)`` turns them into one unit vector per layer through a *direction method*, a
typed callable looked up by name in `DIRECTION_METHODS`:

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


@dataclass
class ContrastAccumulator:
    """Streaming sums over contrast pairs of one criterion, per layer.

    Holds the count, the sum and second moment of the differences ``h+ - h-``, the sum and a
    shifted second moment of the pooled activations ``{h+, h-}``, and norm sums. Memory is
    ``2 x layer x d_model^2`` floats, independent of the number of pairs.

    Examples:
        >>> acc = ContrastAccumulator(n_layers=2, d_model=4)
        >>> acc.update(torch.randn(8, 2, 4) + 1, torch.randn(8, 2, 4))
        >>> acc.n
        8
    """

    n_layers: int
    d_model: int
    n: int = 0
    diff_sum: Tensor = field(init=False)
    diff_gram: Tensor = field(init=False)
    h_sum: Tensor = field(init=False)
    h_gram: Tensor = field(init=False)
    h_ref: Tensor | None = field(init=False, default=None)
    resid_norm_sum: Tensor = field(init=False)
    diff_norm_sum: Tensor = field(init=False)

    def __post_init__(self) -> None:
        L, d = self.n_layers, self.d_model
        self.diff_sum = torch.zeros(L, d, dtype=torch.float64)
        self.diff_gram = torch.zeros(L, d, d, dtype=torch.float32)
        self.h_sum = torch.zeros(L, d, dtype=torch.float64)
        self.h_gram = torch.zeros(L, d, d, dtype=torch.float32)
        self.resid_norm_sum = torch.zeros(L, dtype=torch.float64)
        self.diff_norm_sum = torch.zeros(L, dtype=torch.float64)

    def update(self, pos: Float[Tensor, "batch layer d_model"], neg: Float[Tensor, "batch layer d_model"]) -> None:
        """Add a batch of paired activations (row ``i`` of ``pos`` pairs with row ``i`` of ``neg``)."""
        if pos.shape != neg.shape or pos.shape[1:] != (self.n_layers, self.d_model):
            raise ValueError(
                f"pos {tuple(pos.shape)} and neg {tuple(neg.shape)} must both be "
                f"[batch, {self.n_layers}, {self.d_model}]."
            )
        pos, neg = pos.float(), neg.float()
        diff = pos - neg
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
        self.n += pos.shape[0]

    def merge(self, other: ContrastAccumulator) -> ContrastAccumulator:
        """A new accumulator holding the pairs of both (as if all had been added to one).

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
        out = ContrastAccumulator(self.n_layers, self.d_model)
        parts = [a for a in (self, other) if a.n]
        if not parts:
            return out
        out.h_ref = parts[0].h_ref
        for a in parts:
            assert a.h_ref is not None and out.h_ref is not None
            # re-centre a's shifted second moment on out.h_ref: sum (h-r')(h-r')^T with r' = out.h_ref
            shift = (a.h_ref - out.h_ref).double()  # r - r'
            s = a.h_sum - 2 * a.n * a.h_ref.double()  # sum (h - r) over the 2n pooled rows
            cross = shift[:, :, None] * s[:, None, :]
            corr = cross + cross.transpose(1, 2) + 2 * a.n * shift[:, :, None] * shift[:, None, :]
            out.h_gram += (a.h_gram.double() + corr).float()
            out.diff_gram += a.diff_gram
            out.diff_sum += a.diff_sum
            out.h_sum += a.h_sum
            out.resid_norm_sum += a.resid_norm_sum
            out.diff_norm_sum += a.diff_norm_sum
            out.n += a.n
        return out

    def directions(
        self, method: Method | str = "pca"
    ) -> tuple[Float[Tensor, "layer d_model"], dict[str, Float[Tensor, " layer"]]]:
        """Unit direction per layer (by the method registered as ``method``) and its statistics (see `STAT_NAMES`)."""
        fn = get_direction_method(method)
        if self.n == 0:
            raise ValueError("No contrast pairs were accumulated; pass at least one instruction.")
        n = self.n
        mean_diff = self.diff_sum / n  # float64 [L, d]
        vecs = torch.empty(self.n_layers, self.d_model, dtype=torch.float64)
        for layer in range(self.n_layers):
            v = fn(self.diff_gram[layer].double(), mean_diff[layer], n)
            norm = v.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise ValueError(f"Layer {layer}: the contrast pairs do not differ, so no direction exists.")
            v = v / norm
            if torch.dot(v, mean_diff[layer]) < 0:
                v = -v
            vecs[layer] = v
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
