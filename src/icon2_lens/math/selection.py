"""Selection rules over consistency scores (pure; `icon2_lens.select_instructions` applies them to a table).

One rule at a time: the best ``top_fraction`` (``ceil(fraction * n)`` rows), the best ``top_k``, or
every row with ``consistency >= threshold``; with ``balance_criteria`` the fraction or ``k`` is
applied within each assigned criterion (`balanced_quotas`). Rankings are best first and stable
(ties keep input order).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "DEFAULT_TOP_FRACTION",
    "rank_best_first",
    "select_top",
    "select_threshold",
    "balanced_quotas",
    "select_balanced",
    "select_indices",
]

#: Share kept when no rule is given (the paper kept ~100K of 1M).
DEFAULT_TOP_FRACTION = 0.1

G = TypeVar("G", bound=Hashable)


def rank_best_first(consistency: Sequence[float]) -> list[int]:
    """Row indices by decreasing consistency; ties keep input order.

    Examples:
        >>> rank_best_first([0.1, 0.5, 0.1, 0.9])
        [3, 1, 0, 2]
    """
    return sorted(range(len(consistency)), key=lambda i: -consistency[i])


def select_top(consistency: Sequence[float], k: int) -> list[int]:
    """The ``k`` best rows, best first.

    Examples:
        >>> select_top([0.1, 0.5, 0.1, 0.9], 2)
        [3, 1]
    """
    return rank_best_first(consistency)[:k]


def select_threshold(consistency: Sequence[float], threshold: float) -> list[int]:
    """Rows with ``consistency >= threshold``, best first; a clear error when none reaches it.

    Examples:
        >>> select_threshold([0.1, 0.5, 0.1, 0.9], 0.5)
        [3, 1]
    """
    keep = [i for i in rank_best_first(consistency) if consistency[i] >= threshold]
    if not keep:
        raise ValueError(f"No instruction reaches consistency >= {threshold} (the highest is {max(consistency):.4g}); "
                         "lower the threshold or use top_fraction / top_k.")
    return keep


def balanced_quotas(sizes: Mapping[G, int], k: int) -> dict[G, int]:
    """Split ``k`` as evenly as possible over groups; a group too small to fill its share passes the rest on.

    Earlier groups get the remainder first.

    Examples:
        >>> balanced_quotas({"a": 10, "b": 1, "c": 10}, 9)
        {'a': 4, 'b': 1, 'c': 4}
    """
    quota = {g: 0 for g in sizes}
    left = min(k, sum(sizes.values()))
    while left:
        open_groups = [g for g in sizes if quota[g] < sizes[g]]
        share, extra = divmod(left, len(open_groups))
        for gi, g in enumerate(open_groups):
            add = min(share + (1 if gi < extra else 0), sizes[g] - quota[g])
            quota[g] += add
            left -= add
    return quota


def select_balanced(
    consistency: Sequence[float],
    labels: Sequence[G],
    *,
    top_fraction: float | None = None,
    top_k: int | None = None,
) -> list[int]:
    """The best rows within each label (groups in order of first appearance), best first overall.

    ``top_fraction``: ``ceil(fraction * size)`` per label; ``top_k``: ``k`` split by `balanced_quotas`.

    Examples:
        >>> select_balanced([0.9, 0.8, 0.7, 0.1], ["a", "a", "a", "b"], top_k=2)
        [0, 3]
    """
    ranked = rank_best_first(consistency)
    groups = sorted(set(labels), key=list(labels).index)
    members = {g: [i for i in ranked if labels[i] == g] for g in groups}
    if top_k is not None:
        quota = balanced_quotas({g: len(members[g]) for g in groups}, int(top_k))
    else:
        quota = {g: math.ceil(top_fraction * len(members[g])) for g in groups}  # type: ignore[operator]
    return sorted((i for g in groups for i in members[g][:quota[g]]), key=lambda i: -consistency[i])


def select_indices(
    consistency: Sequence[float],
    labels: Sequence[Hashable],
    *,
    top_fraction: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    balance_criteria: bool = False,
) -> list[int]:
    """Check the rule and return the kept rows, best first (see the module docs).

    Give at most one of ``top_fraction``, ``top_k``, ``threshold``; with none, ``DEFAULT_TOP_FRACTION``.
    ``labels`` (the assigned criterion of each row) are used only with ``balance_criteria``.

    Examples:
        >>> select_indices([0.1, 0.5, 0.2, 0.9], ["a", "b", "a", "b"], top_k=2, balance_criteria=True)
        [3, 2]
    """
    given = {k: v for k, v in {"top_fraction": top_fraction, "top_k": top_k, "threshold": threshold}.items()
             if v is not None}
    if len(given) > 1:
        raise ValueError(f"Give one selection rule, not {sorted(given)}: top_fraction, top_k or threshold.")
    if not given:
        top_fraction = DEFAULT_TOP_FRACTION
    n = len(consistency)
    if n == 0:
        raise ValueError("The score table is empty; score at least one instruction first.")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if balance_criteria and threshold is not None:
        raise ValueError("balance_criteria works with top_fraction or top_k, not with a threshold.")
    if threshold is not None:
        return select_threshold(consistency, threshold)
    if balance_criteria:
        return select_balanced(consistency, labels, top_fraction=top_fraction, top_k=top_k)
    k = top_k if top_k is not None else math.ceil(top_fraction * n)  # type: ignore[operator]
    return select_top(consistency, k)
