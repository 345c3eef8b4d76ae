"""Per-layer statistics of the layer report (pure): separations and the suggested steering range.

A *separation* is the share of contrast pairs whose positive member projects above its negative
member on a layer's direction (0.5 = chance). The suggested steering range is the contiguous
window of layers with the highest mean score, the score being the mean over criteria of the
separations (b) paraphrased prompts and (c) response pairs (`steering_score`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["separation", "steering_score", "suggest_layer_range"]


def separation(
    pos_proj: Float[Tensor, "n layer"], neg_proj: Float[Tensor, "n layer"]
) -> Float[Tensor, " layer"]:
    """Share of pairs whose positive member projects above its negative member, per layer.

    Examples:
        >>> separation(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        tensor([1., 0.])
    """
    if pos_proj.shape != neg_proj.shape or pos_proj.ndim != 2 or pos_proj.shape[0] == 0:
        raise ValueError(
            f"Expected two non-empty [n, layer] tensors of one shape, got {pos_proj.shape}, {neg_proj.shape}."
        )
    return (pos_proj > neg_proj).float().mean(0)


def steering_score(
    heldout: Float[Tensor, "criterion layer"],
    paraphrase: Float[Tensor, "criterion layer"],
    response: Float[Tensor, "criterion layer"],
) -> Float[Tensor, " layer"]:
    """The score the steering range is chosen on: mean of (b) and (c) per criterion, then over criteria
    (NaNs, i.e. criteria without paraphrases or response pairs, ignored); where no criterion has either,
    the mean of (a) over criteria.

    Examples:
        >>> nan = float("nan")
        >>> steering_score(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.9]]), torch.tensor([[0.7, nan]]))
        tensor([0.6000, 0.9000])
        >>> steering_score(torch.tensor([[0.2, 0.4]]), torch.full((1, 2), nan), torch.full((1, 2), nan))
        tensor([0.2000, 0.4000])
    """
    score = torch.stack([paraphrase, response]).nanmean(0).nanmean(0)  # [layer]
    if torch.isnan(score).all():  # custom criteria only: fall back to (a)
        score = heldout.mean(0)
    return score


def suggest_layer_range(
    score: Float[Tensor, " layer"], *, width: int | None = None, layers: Sequence[int] | None = None
) -> list[int]:
    """The contiguous window of ``width`` layers with the highest mean score (NaNs ignored).

    ``width`` defaults to a third of the layers (the paper steers layers 10-20 of 32). Ties go to
    the window closest to the middle.

    Examples:
        >>> suggest_layer_range(torch.tensor([0.5, 0.9, 0.95, 0.6, 0.5, 0.5]), width=2)
        [1, 2]
    """
    n = score.shape[0]
    layer_ids = list(layers) if layers is not None else list(range(n))
    w = max(1, round(n / 3)) if width is None else width
    if not 1 <= w <= n:
        raise ValueError(f"width must be between 1 and {n}, got {w}.")
    s = torch.nan_to_num(score.double(), nan=0.0)
    means = torch.stack([s[i:i + w].mean() for i in range(n - w + 1)])
    best = means.max()
    cands = [i for i in range(n - w + 1) if means[i] >= best - 1e-12]
    mid = (n - w) / 2
    start = min(cands, key=lambda i: abs(i - mid))
    return layer_ids[start:start + w]
