"""Pure math of icon2_lens: torch, jaxtyping and the standard library only, no model, no files.

Everything here is tested without a model (``tests/unit``); the stage modules call it.

Modules:
    contrast: `ContrastAccumulator` (streaming contrast statistics, with ``merge``), the direction
        methods as a registry of typed callables (`DirectionMethod`, `DIRECTION_METHODS`,
        `register_direction_method`), `split_halves`, `cosine_per_layer`.
    probe: `project`, Eq. 2 (`consistency_scores`) and the standardised probe (`probe_scores`),
        Eq. 3 (`assign_criteria`).
    selection: the selection rules of `icon2_lens.select_instructions` over scores and labels
        (`select_indices`, top fraction / top k / threshold, `balanced_quotas`).
    layerstats: `separation`, `steering_score`, `suggest_layer_range` (the layer report's numbers).
    gamma: the App. J rule for gamma+ / gamma- and win shares (`choose_gammas`).
    bootstrap: `bootstrap_mean`, `paired_difference` (percentile-bootstrap intervals, `Interval`).
    text: `distinct_n`, `is_degenerate`, `degeneration_stats`, `parse_verdict`, `normalize_text`,
        character shingles and Jaccard similarity for near-duplicates.

Examples:
    >>> import torch
    >>> from icon2_lens import math as ilm
    >>> u, stats = ilm.directions_from_activations(torch.randn(8, 2, 4) + 1, torch.randn(8, 2, 4))
    >>> ilm.assign_criteria(ilm.probe_scores(torch.randn(3, 2, 4), u[None]))[1].tolist()
    [0, 0, 0]
"""

from .bootstrap import DEFAULT_LEVEL, DEFAULT_N_BOOT, Interval, bootstrap_mean, paired_difference
from .contrast import (
    DIRECTION_METHODS,
    STAT_NAMES,
    ContrastAccumulator,
    DirectionMethod,
    Method,
    Storage,
    cosine_per_layer,
    directions_from_activations,
    finish_directions,
    get_direction_method,
    register_direction_method,
    split_halves,
)
from .gamma import GammaChoice, check_win_threshold, choose_gammas, effective_scores, gamma_grid, win_shares
from .layerstats import separation, steering_score, suggest_layer_range
from .probe import (
    assign_criteria,
    consistency_scores,
    orthogonalize_criteria,
    probe_scores,
    project,
    project_criterion,
)
from .selection import (
    DEFAULT_TOP_FRACTION,
    balanced_quotas,
    rank_best_first,
    select_balanced,
    select_indices,
    select_threshold,
    select_top,
)
from .text import (
    degeneration_stats,
    distinct_n,
    is_degenerate,
    jaccard,
    normalize_text,
    parse_verdict,
    shingles,
    trim_to_sentence,
)

__all__ = [
    # bootstrap
    "DEFAULT_LEVEL", "DEFAULT_N_BOOT", "Interval", "bootstrap_mean", "paired_difference",
    # contrast
    "ContrastAccumulator", "DirectionMethod", "DIRECTION_METHODS", "Method", "Storage", "STAT_NAMES",
    "cosine_per_layer", "directions_from_activations", "finish_directions", "get_direction_method",
    "register_direction_method", "split_halves",
    # probe
    "assign_criteria", "consistency_scores", "orthogonalize_criteria", "probe_scores", "project", "project_criterion",
    # selection
    "DEFAULT_TOP_FRACTION", "balanced_quotas", "rank_best_first", "select_balanced", "select_indices",
    "select_threshold", "select_top",
    # layer statistics
    "separation", "steering_score", "suggest_layer_range",
    # gamma
    "GammaChoice", "check_win_threshold", "choose_gammas", "effective_scores", "gamma_grid", "win_shares",
    # text
    "degeneration_stats", "distinct_n", "is_degenerate", "jaccard", "normalize_text", "parse_verdict", "shingles",
    "trim_to_sentence",
]
