"""The paper's App. J rule for the steering strengths gamma+ and gamma- (pure; METHOD.md section 4).

Given, for every gamma of a sweep, one score per instruction (higher is better) and whether each
response degenerated:

0. a degenerate response gets the lowest score of the whole sweep, and a pair (gamma+, gamma-) with
   a degenerate side counts as a loss;
1. gamma+ = the one with the highest mean score (ties: the smaller gamma+);
2. gamma- = among those whose pairs (gamma+, gamma-) have chosen beating rejected in more than
   ``win_threshold`` of the instructions, the one with the highest mean score (the smallest reliable
   gap: large gaps invite reward hacking; ties: the gamma- closer to 0). If none passes, the one with
   the highest win share (ties: closer to 0), and `GammaChoice.threshold_met` is ``False``.

`icon2_lens.calibrate_gamma` generates and scores the sweep and calls `choose_gammas`;
`bootstrap_choices` re-applies the rule to resamples of the instructions (how stable is the choice?),
and `cumulative_push` says what the vectors of one gamma add up to at the last steering layer.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GammaChoice",
    "gamma_grid",
    "check_win_threshold",
    "effective_scores",
    "win_shares",
    "choose_gammas",
    "bootstrap_choices",
    "cumulative_push",
]


@dataclass(frozen=True)
class GammaChoice:
    """The chosen strengths and the tables they were chosen on.

    Attributes:
        gamma_pos: the chosen gamma+.
        gamma_neg: the chosen gamma-.
        mean_score: per gamma of the sweep, the mean score with degenerate responses at the sweep's floor.
        degenerate_share: per gamma, the share of degenerate responses.
        win_share: per (gamma+, gamma-), the share of instructions where chosen beats rejected and
            neither side degenerated (gamma+ major, in the order given).
        threshold_met: whether some gamma- passed ``win_threshold`` with the chosen gamma+.
    """

    gamma_pos: float
    gamma_neg: float
    mean_score: dict[float, float]
    degenerate_share: dict[float, float]
    win_share: dict[tuple[float, float], float]
    threshold_met: bool


def gamma_grid(gammas_pos: Sequence[float], gammas_neg: Sequence[float]) -> tuple[list[float], list[float]]:
    """The sweep's gamma+ and gamma- as sorted distinct floats; every gamma+ must exceed every gamma-.

    Examples:
        >>> gamma_grid([0.1, 0.05, 0.1], [-0.05])
        ([0.05, 0.1], [-0.05])
    """
    gp, gn = sorted(set(float(g) for g in gammas_pos)), sorted(set(float(g) for g in gammas_neg))
    if not gp or not gn:
        raise ValueError("Give at least one gamma+ and one gamma-.")
    if min(gp) <= max(gn):
        raise ValueError(f"Every gamma+ must exceed every gamma- (got gamma+ {gp}, gamma- {gn}).")
    return gp, gn


def check_win_threshold(win_threshold: float) -> None:
    """Refuse a win threshold outside ``[0, 1)``."""
    if not 0 <= win_threshold < 1:
        raise ValueError(f"win_threshold must be in [0, 1), got {win_threshold}.")


def effective_scores(
    scores: Mapping[float, Sequence[float]], degenerate: Mapping[float, Sequence[bool]]
) -> dict[float, list[float]]:
    """The scores with every degenerate response set to the lowest score of the whole sweep.

    Examples:
        >>> effective_scores({0.1: [2.0, 5.0], -0.1: [1.0, 3.0]}, {0.1: [False, True], -0.1: [False, False]})
        {0.1: [2.0, 1.0], -0.1: [1.0, 3.0]}
    """
    floor = min(v for g in scores for v in scores[g])
    return {g: [floor if d else v for v, d in zip(scores[g], degenerate[g], strict=True)] for g in scores}


def win_shares(
    beats: Mapping[tuple[float, float], Sequence[bool]], degenerate: Mapping[float, Sequence[bool]]
) -> dict[tuple[float, float], float]:
    """Per (gamma+, gamma-): the share of instructions where chosen beats rejected and neither side degenerated.

    Examples:
        >>> win_shares({(0.1, -0.1): [True, True, False, True]},
        ...            {0.1: [False, True, False, False], -0.1: [False, False, False, False]})
        {(0.1, -0.1): 0.5}
    """
    out = {}
    for (p, q), b in beats.items():
        wins = [w and not dp and not dq for w, dp, dq in zip(b, degenerate[p], degenerate[q], strict=True)]
        out[(p, q)] = sum(wins) / len(wins)
    return out


def choose_gammas(
    scores: Mapping[float, Sequence[float]],
    degenerate: Mapping[float, Sequence[bool]],
    gammas_pos: Sequence[float],
    gammas_neg: Sequence[float],
    *,
    win_threshold: float = 0.9,
    beats: Mapping[tuple[float, float], Sequence[bool]] | None = None,
) -> GammaChoice:
    """Apply the App. J rule (module docs) to a scored sweep.

    Args:
        scores: per gamma of the sweep (every gamma+ and gamma-, and any other, e.g. an unsteered 0.0
            whose scores count for the floor), one score per instruction, in one instruction order.
        degenerate: per gamma, whether each response degenerated.
        gammas_pos: the gamma+ candidates.
        gammas_neg: the gamma- candidates.
        win_threshold: the share of wins a gamma- must exceed, in ``[0, 1)``.
        beats: per (gamma+, gamma-), whether chosen beats rejected on each instruction (e.g. a pairwise
            judge's verdicts); default: its raw score is higher.

    Returns:
        A `GammaChoice`.

    Examples:
        >>> s = {-0.1: [0.0, 0.0], -0.05: [0.5, 0.9], 0.05: [1.0, 1.0], 0.1: [2.0, 0.0]}
        >>> d = {g: [False, False] for g in s}
        >>> c = choose_gammas(s, d, [0.05, 0.1], [-0.1, -0.05], win_threshold=0.9)
        >>> c.gamma_pos, c.gamma_neg, c.win_share[(0.05, -0.05)]
        (0.05, -0.05, 1.0)
    """
    check_win_threshold(win_threshold)
    if not gammas_pos or not gammas_neg:
        raise ValueError("Give at least one gamma+ and one gamma-.")
    missing = [g for g in (*gammas_pos, *gammas_neg) if g not in scores or g not in degenerate]
    if missing:
        raise ValueError(f"No scores or degenerate flags for gammas {missing}.")
    eff = effective_scores(scores, degenerate)
    mean = {g: sum(v) / len(v) for g, v in eff.items()}
    deg_share = {g: sum(degenerate[g]) / len(degenerate[g]) for g in scores}
    if beats is None:
        beats = {(p, q): [a > b for a, b in zip(scores[p], scores[q], strict=True)]
                 for p in gammas_pos for q in gammas_neg}
    win = win_shares({(p, q): beats[(p, q)] for p in gammas_pos for q in gammas_neg}, degenerate)
    best_pos = max(gammas_pos, key=lambda g: (mean[g], -g))  # ties: the gentler strength
    passing = [q for q in gammas_neg if win[(best_pos, q)] > win_threshold]
    if passing:
        best_neg = max(passing, key=lambda g: (mean[g], g))
    else:
        best_neg = max(gammas_neg, key=lambda g: (win[(best_pos, g)], g))
    return GammaChoice(gamma_pos=best_pos, gamma_neg=best_neg, mean_score=mean, degenerate_share=deg_share,
                       win_share=win, threshold_met=bool(passing))


def bootstrap_choices(
    scores: Mapping[float, Sequence[float]],
    degenerate: Mapping[float, Sequence[bool]],
    gammas_pos: Sequence[float],
    gammas_neg: Sequence[float],
    *,
    win_threshold: float = 0.9,
    beats: Mapping[tuple[float, float], Sequence[bool]] | None = None,
    n_boot: int = 100,
    seed: int = 0,
) -> list[dict[str, float]]:
    """How often each (gamma+, gamma-) is chosen when the rule is re-applied to resampled instructions.

    Each of the ``n_boot`` resamples draws the ``n`` instructions with replacement (one seeded
    `random.Random`, so the caller's RNG is untouched) and applies `choose_gammas` to the resampled
    table (scores, degenerate flags and, if given, verdicts of the same instructions).

    Args:
        scores: per gamma, one score per instruction (as for `choose_gammas`).
        degenerate: per gamma, whether each response degenerated.
        gammas_pos: the gamma+ candidates.
        gammas_neg: the gamma- candidates.
        win_threshold: the share of wins a gamma- must exceed.
        beats: optional per-(gamma+, gamma-) verdicts per instruction (a judge's).
        n_boot: resamples (``0``: none, an empty list).
        seed: resampling seed.

    Returns:
        One dict per pair that was chosen at least once: ``gamma_pos``, ``gamma_neg``, ``share``
        (of the resamples; the shares sum to 1), most frequent first (ties: gamma+ then gamma- ascending).

    Examples:
        >>> s = {-0.1: [0.0, 0.0, 0.0], 0.1: [1.0, 1.0, 1.0]}
        >>> bootstrap_choices(s, {g: [False] * 3 for g in s}, [0.1], [-0.1], n_boot=10)
        [{'gamma_pos': 0.1, 'gamma_neg': -0.1, 'share': 1.0}]
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}.")
    if n_boot == 0:
        return []
    lengths = {len(v) for v in scores.values()} | {len(v) for v in degenerate.values()}
    if beats is not None:
        lengths |= {len(v) for v in beats.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError("Every gamma needs one score, flag (and verdict) per instruction; got lengths "
                         f"{sorted(lengths)}.")
    n = lengths.pop()
    rng = random.Random(seed)
    counts: Counter[tuple[float, float]] = Counter()

    def pick(values: Sequence[Any], idx: list[int]) -> list[Any]:
        return [values[i] for i in idx]

    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        c = choose_gammas({g: pick(v, idx) for g, v in scores.items()},
                          {g: pick(v, idx) for g, v in degenerate.items()}, gammas_pos, gammas_neg,
                          win_threshold=win_threshold,
                          beats=None if beats is None else {k: pick(v, idx) for k, v in beats.items()})
        counts[(c.gamma_pos, c.gamma_neg)] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1]))
    return [{"gamma_pos": p, "gamma_neg": q, "share": k / n_boot} for (p, q), k in ranked]


def cumulative_push(vectors_by_layer: Mapping[int, Tensor], resid_norm_last: float,
                    proj_gap_last: float) -> dict[str, float]:
    """What the vectors added at the steering layers sum to at the last one (one row of steering).

    What is added at an earlier layer is still in the residual stream at the later ones, so at the
    last steering layer the stream carries (to first order) the sum of all the added vectors. This
    gives that sum's norm, as a share of the last layer's mean residual norm and as a multiple of the
    criterion's P+/P- projection gap there (``|proj_gap|``).

    Args:
        vectors_by_layer: layer -> the added vector (``[d_model]`` or ``[1, d_model]``), e.g. one
            criterion and gamma from `icon2_lens.steering.steering_vectors`.
        resid_norm_last: the mean residual norm at the last (highest) steering layer.
        proj_gap_last: the criterion's mean projection of ``h+ - h-`` at that layer.

    Returns:
        ``norm`` (of the summed vector), ``share_of_resid_norm`` (``norm / resid_norm_last``),
        ``gap_multiple`` (``norm / |proj_gap_last|``; ``inf`` for a zero gap and a non-zero push),
        ``per_layer_norm_sum`` (the sum of the per-layer norms: the push if all were parallel),
        ``layers`` (how many).

    Examples:
        >>> v = {3: torch.tensor([3.0, 0.0]), 4: torch.tensor([0.0, 4.0])}
        >>> cumulative_push(v, resid_norm_last=10.0, proj_gap_last=2.5)
        {'norm': 5.0, 'share_of_resid_norm': 0.5, 'gap_multiple': 2.0, 'per_layer_norm_sum': 7.0, 'layers': 2}
    """
    if not vectors_by_layer:
        raise ValueError("No vectors: give at least one layer.")
    flat = []
    for layer, v in vectors_by_layer.items():
        if v.dim() == 2 and v.shape[0] == 1:
            v = v[0]
        if v.dim() != 1:
            raise ValueError(f"Layer {layer}: expected one vector ([d_model] or [1, d_model]), got shape "
                             f"{tuple(v.shape)}; compute one push per row.")
        flat.append(v.double())
    if len({v.shape[0] for v in flat}) != 1:
        raise ValueError("The vectors have different sizes.")
    if not resid_norm_last > 0:
        raise ValueError(f"resid_norm_last must be positive, got {resid_norm_last}.")
    norm = float(torch.stack(flat).sum(0).norm())
    gap = abs(float(proj_gap_last))
    multiple = norm / gap if gap > 0 else (0.0 if norm == 0 else float("inf"))
    return {"norm": norm, "share_of_resid_norm": norm / float(resid_norm_last), "gap_multiple": multiple,
            "per_layer_norm_sum": float(sum(float(v.norm()) for v in flat)), "layers": len(flat)}
