"""Choosing the steering strengths gamma+ and gamma- (the paper's App. J rule, METHOD.md section 4).

On ``n`` instructions (a seeded random sample of the table's rows that are *not* training rows:
the rows a ``score`` folder selected, or ``exclude=``), every gamma of the grid (``gammas_pos`` and
``gammas_neg``) generates one response per instruction (all in mixed batches with per-row gammas).
A scorer scores them; a response that degenerates (`icon2_lens.evaluation.is_degenerate`) gets the
lowest score seen in the sweep, and a pair with a degenerate side counts as a loss. Then:

1. gamma+ = the one with the highest mean score;
2. gamma- = among those whose pairs (gamma+, gamma-) have chosen > rejected in more than
   ``win_threshold`` (0.9) of the instructions, the one with the highest mean score (the smallest
   reliable gap: large gaps invite reward hacking). If none passes, the one with the highest win
   share, with a warning.

The rule is re-applied to ``n_boot`` resamples of the instructions (`CalibrationResult.bootstrap`:
how often each (gamma+, gamma-) would have been chosen), and each gamma's summed push at the last
steering layer is reported (`icon2_lens.math.gamma.cumulative_push`: a share of the residual norm and
a multiple of the criterion's P+/P- projection gap), so a strength can be compared across scales.

**The scorer must not be the data's own signal** (EVIDENCE.md). The default is
`icon2_lens.reward_probe.RewardProbeScorer`, a linear probe fitted on human-written better/worse
answers (not on the steering directions); its preference accuracy on the shipped held-out
preference set (``test`` split) is recorded beside the choice. ``scorer="self-probe"`` (or a
`icon2_lens.judges.ProbeScorer`) reads the steering directions themselves: circular, warned about and
labelled *self-probe*. A reward model (`icon2_lens.judges.RewardModelScorer`) or a pairwise judge
(`icon2_lens.judges.PairwiseJudge`) the user names works too.

The rule itself is the pure `icon2_lens.math.gamma.choose_gammas` (tested on made-up tables); this
module samples, generates and scores the sweep and reports it.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from tqdm.auto import tqdm

from .directions import DirectionSet, instruction_hash
from .errors import BadFileError, read_yaml
from .judges import Judge, ProbeScorer, Scorer, is_pairwise
from .math.gamma import bootstrap_choices, check_win_threshold, choose_gammas, cumulative_push, gamma_grid
from .math.text import distinct_n, is_degenerate
from .models import LoadedModel
from .pairs import DEFAULT_DECODING, generate_steered, table_rows
from .prompts import render_chat
from .reports import calibration_figure, calibration_table
from .reward_probe import PreferenceLike, RewardProbeScorer
from .runs import names
from .runs.io import atomic_write_text, read_jsonl
from .steering import Positions, Scale, steering_vectors

if TYPE_CHECKING:
    import matplotlib.figure

__all__ = ["calibrate_gamma", "calibration_sample", "CalibrationResult", "DEFAULT_GAMMAS_POS", "DEFAULT_GAMMAS_NEG",
           "DEFAULT_GRIDS", "DEFAULT_N_BOOT", "ScorerName", "load_gammas"]

#: Named scorers: the independent reward probe (default) and the circular self-probe.
ScorerName = Literal["reward-probe", "self-probe"]
#: Resamples of the instructions for the stability of the choice.
DEFAULT_N_BOOT = 100
#: The label of a scorer that reads the steering directions.
SELF_PROBE = "self-probe"
#: Below this share of resamples choosing the same pair, calibration warns that the choice is unstable.
STABILITY_WARNING_SHARE = 0.5

#: The default grid (``scale="relative"``: fractions of the layer's mean residual norm at each layer).
DEFAULT_GAMMAS_POS = (0.02, 0.05, 0.1, 0.2)
DEFAULT_GAMMAS_NEG = (-0.02, -0.05, -0.1, -0.2)
#: The default grid of each scale (gamma+ values, gamma- values): ``"contrast"`` in units of the criterion's
#: projection gap (summed over the steering layers), ``"unit"`` in residual-stream units.
DEFAULT_GRIDS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "relative": (DEFAULT_GAMMAS_POS, DEFAULT_GAMMAS_NEG),
    "contrast": ((0.5, 1.0, 2.0, 4.0), (-0.5, -1.0, -2.0, -4.0)),
    "unit": ((1.0, 2.0, 4.0, 8.0), (-1.0, -2.0, -4.0, -8.0)),
}
#: Share of degenerate responses at a gamma above which calibration warns that it breaks fluency.
FLUENCY_WARNING_SHARE = 0.25


@dataclass
class CalibrationResult:
    """The sweep and the chosen strengths.

    Attributes:
        gamma_pos: the chosen strength of the chosen side.
        gamma_neg: the chosen strength of the rejected side.
        per_gamma: one dict per gamma: ``gamma``, ``mean_score``, ``degenerate_share``, ``distinct2``, ``n``,
            ``push_share`` and ``push_gap`` (the summed push at the last steering layer as a share of its
            mean residual norm and as a multiple of the criterion's projection gap, averaged over the
            sample's rows) and ``push`` (the same per criterion).
        pairs: one dict per (gamma+, gamma-): ``gamma_pos``, ``gamma_neg``, ``win_share``.
        settings: scorer (and, for the reward probe, its held-out preference accuracy), layers, scale,
            decoding, n, win threshold, the sample (seed, pool, excluded rows, instruction hashes), n_boot.
        examples: a few (instruction, gamma, response) rows.
        bootstrap: how often the rule picks each (gamma+, gamma-) over resamples of the instructions:
            ``gamma_pos``, ``gamma_neg``, ``share`` (most frequent first; shares sum to 1).
    """

    gamma_pos: float
    gamma_neg: float
    per_gamma: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    settings: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    bootstrap: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Markdown: mean score etc. per gamma, then the win-share matrix (rows gamma+, columns gamma-)."""
        return calibration_table(self.to_dict())

    def figure(self) -> matplotlib.figure.Figure:
        """Mean score and degenerate share per gamma; win share per gamma- for the chosen gamma+."""
        return calibration_figure(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"gamma_pos": self.gamma_pos, "gamma_neg": self.gamma_neg, "per_gamma": self.per_gamma,
                "pairs": self.pairs, "bootstrap": self.bootstrap, "settings": self.settings, "examples": self.examples}

    def gammas_config(self) -> dict[str, Any]:
        """What `icon2-lens generate --gammas FILE` (and the pipeline) reads."""
        s = self.settings
        return {"gamma_pos": self.gamma_pos, "gamma_neg": self.gamma_neg, "layers": s["layers"], "scale": s["scale"],
                "positions": s["positions"], **s["decoding"]}

    def save(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``calibration.json``, ``calibration.md``, ``calibration.png`` and ``gammas.yaml`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "calibration.json", "md": folder / "calibration.md",
                 "png": folder / "calibration.png", "gammas": folder / "gammas.yaml"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2))
        atomic_write_text(paths["md"], self.table() + "\n")
        atomic_write_text(paths["gammas"], yaml.safe_dump(self.gammas_config(), sort_keys=False))
        tmp = paths["png"].with_name(".calibration.tmp.png")
        try:
            self.figure().savefig(tmp, dpi=110)
            tmp.replace(paths["png"])
        finally:
            tmp.unlink(missing_ok=True)
        return paths


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: The settings a ``gammas.yaml`` may hold, with a test of their type and what that type is, in words.
_GAMMAS_TYPES: dict[str, tuple[Any, str]] = {
    "gamma_pos": (_is_number, "a finite number"),
    "gamma_neg": (_is_number, "a finite number"),
    "layers": (lambda v: v in ("suggested", "all") or (isinstance(v, list) and v != [] and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v)), "'suggested', 'all' or a list of layer numbers"),
    "scale": (lambda v: isinstance(v, str), "text"),
    "positions": (lambda v: isinstance(v, str), "text"),
    "criterion": (lambda v: v is None or isinstance(v, str), "a criterion name"),
    "engine": (lambda v: isinstance(v, str), "text"),
    "max_new_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (_is_number, "a finite number"),
    "top_p": (_is_number, "a finite number"),
    "repetition_penalty": (_is_number, "a finite number"),
}


def load_gammas(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``gammas.yaml`` written by `CalibrationResult.save` (or a folder holding one).

    A file that does not parse, lacks ``gamma_pos``/``gamma_neg`` or holds a value of the wrong type (a
    list for a number, ``.nan``) is a `icon2_lens.errors.BadFileError` naming it.

    Examples:
        >>> load_gammas("runs/calibration")["gamma_pos"]  # doctest: +SKIP
        0.1
    """
    p = Path(path)
    if p.is_dir():
        p = p / "gammas.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; run `icon2-lens calibrate` first or pass the gammas directly.")
    todo = ("Fix the value in the file, or run `icon2-lens calibrate` again to write a new gammas.yaml "
            "(or leave out --gammas and give --gamma-pos/--gamma-neg).")
    data = read_yaml(p, what="a gammas.yaml written by `icon2-lens calibrate`", todo=todo)
    if not isinstance(data, dict) or "gamma_pos" not in data or "gamma_neg" not in data:
        raise BadFileError(p, "has no gamma_pos/gamma_neg; it is not a calibration output", todo)
    for key, value in data.items():
        test, want = _GAMMAS_TYPES.get(key, (None, ""))
        if test is not None and not test(value):
            raise BadFileError(p, f"{key} is {value!r}, not {want}", todo)
    return data


def _table_source(table: Any) -> tuple[Any, list[str] | None, str, bool]:
    """The rows to sample from, the training instructions the source names (or ``None``), a label, and whether
    the source is a ``score`` folder.

    A ``score`` output folder gives its full ``scores.jsonl`` and the instructions of its
    ``selected.jsonl`` (the rows that become training pairs); anything else is taken as it is.
    """
    if isinstance(table, (str, os.PathLike)) and Path(table).is_dir():
        folder = Path(table)
        scores, selected = folder / names.SCORES, folder / names.SELECTED
        if scores.is_file():
            chosen = [r["instruction"] for r in read_jsonl(selected)] if selected.is_file() else None
            return read_jsonl(scores), chosen, str(scores), True
        return table, None, str(folder), False
    return table, None, str(table) if isinstance(table, (str, os.PathLike)) else "rows", False


def calibration_sample(
    table: Any,
    n: int,
    directions: DirectionSet,
    *,
    exclude: Sequence[str] | None = None,
    criterion: str | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``n`` calibration rows: a seeded random sample of the table's rows that are not training rows.

    Args:
        table: a ``score`` output folder (its full ``scores.jsonl``; the rows of its ``selected.jsonl``
            are excluded unless ``exclude`` is given), a JSONL file, or a list of rows (``instruction``
            and ``criterion``).
        n: rows to draw.
        directions: the `DirectionSet` (criteria are checked against it).
        exclude: instructions that must not be drawn (the training rows; compared by
            `icon2_lens.directions.instruction_hash`, surrounding space ignored). ``None``: the
            folder's selected rows, else none (with a warning that nothing was checked).
        criterion: steer every row along this criterion instead of the table's.
        seed: sampling seed (a local `random.Random`).

    Returns:
        The rows (in table order) and the sample's record: ``source``, ``pool`` (rows in the table),
        ``excluded`` (rows left out as training rows), ``seed``, ``hashes`` (instruction hashes of the sample).

    Examples:
        >>> rows, info = calibration_sample("runs/score", 32, dirs)  # doctest: +SKIP
        >>> info["excluded"]  # doctest: +SKIP
        24
    """
    source, named_training, label, score_folder = _table_source(table)
    rows = table_rows(source, criterion, directions)
    if exclude is None and named_training is None:
        what = (f"{table} has no {names.SELECTED}, so the training rows are unknown" if score_folder else
                "No exclude= given and the table is not a `score` folder")
        warnings.warn(f"{what}: the calibration sample is not checked against the training rows (held out means held "
                      "out); pass exclude= with the instructions that become pairs (CLI: --exclude FILE).",
                      stacklevel=3)
    excluded = {instruction_hash(x) for x in (exclude if exclude is not None else named_training or [])}
    pool = [r for r in rows if instruction_hash(r["instruction"]) not in excluded]
    if len(pool) < n:
        raise ValueError(f"Only {len(pool)} of the table's {len(rows)} rows are left after excluding "
                         f"{len(rows) - len(pool)} training rows, fewer than n={n}; pass n <= {len(pool)} (or score "
                         "more instructions).")
    picked = sorted(random.Random(seed).sample(range(len(pool)), n))
    sample = [pool[i] for i in picked]
    hashes = [instruction_hash(r["instruction"]) for r in sample]
    training = {instruction_hash(x) for x in (named_training or [])} | excluded
    overlap = sum(h in training for h in hashes)
    if overlap:
        warnings.warn(f"{overlap} of the {n} calibration instructions are training rows (selected for pairs): "
                      "the calibration is not held out from the data it chooses gammas for.", stacklevel=3)
    return sample, {"source": label, "pool": len(rows), "excluded": len(rows) - len(pool), "seed": seed,
                    "hashes": hashes}


def _resolve_scorer(scorer: Any, model: LoadedModel, directions: DirectionSet, layers: list[int],
                    probe_layers: Sequence[int] | range | None, progress: bool) -> tuple[Any, str]:
    """The scorer object and its label (``reward_probe``, ``self-probe`` or the scorer's own name)."""
    if scorer is None or scorer == "reward-probe":
        return RewardProbeScorer.fit(model, layers=layers or None, progress=progress), RewardProbeScorer.name
    if scorer == SELF_PROBE:
        scorer = ProbeScorer(model, directions, layers=probe_layers)
    elif isinstance(scorer, str):
        raise ValueError(f"Unknown scorer {scorer!r}; use 'reward-probe' (default), 'self-probe', or pass a scorer "
                         "object (RewardModelScorer, PairwiseJudge, ...).")
    if isinstance(scorer, ProbeScorer):
        warnings.warn("The self-probe scorer reads the steering directions themselves: calibrating with it is circular "
                      "(steering along u, then finding more u), a manipulation check rather than a quality measure; "
                      "its figures are labelled self-probe. The default reward probe, a reward model or a judge does "
                      "not share the data's signal.", stacklevel=3)
        return scorer, SELF_PROBE
    return scorer, getattr(scorer, "name", type(scorer).__name__)


def _pushes(directions: DirectionSet, crits: Sequence[str], grid: Sequence[float], layers: list[int],
            scale: Scale) -> dict[float, dict[str, Any]]:
    """Per gamma: the summed push at the last steering layer, per criterion and averaged over the rows."""
    out: dict[float, dict[str, Any]] = {}
    for g in grid:
        per: dict[str, dict[str, float]] = {}
        for c in sorted(set(crits)):
            vecs = steering_vectors(directions, c, g, layers=layers or None, scale=scale)
            ci, li = directions.index(c), directions.layers.index(max(vecs))
            push = cumulative_push(vecs, float(directions.stats["resid_norm"][ci, li]),
                                   float(directions.stats["proj_gap"][ci, li]))
            per[c] = {"share": push["share_of_resid_norm"], "gap": push["gap_multiple"]}
        out[g] = {"push_share": sum(per[c]["share"] for c in crits) / len(crits),
                  "push_gap": sum(per[c]["gap"] for c in crits) / len(crits), "push": per}
    return out


def calibrate_gamma(
    model: LoadedModel,
    directions: DirectionSet,
    table: Any,
    *,
    n: int = 32,
    gammas_pos: Sequence[float] | None = None,
    gammas_neg: Sequence[float] | None = None,
    scorer: Scorer | Judge | ScorerName | Any | None = None,
    win_threshold: float = 0.9,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
    positions: Positions = "all",
    criterion: str | None = None,
    max_new_tokens: int = DEFAULT_DECODING["max_new_tokens"],
    repetition_penalty: float = DEFAULT_DECODING["repetition_penalty"],
    batch_size: int = 16,
    seed: int = 0,
    exclude: Sequence[str] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    preference_pairs: Sequence[PreferenceLike] | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Sweep gamma+ and gamma- on ``n`` held-out instructions and pick them by the paper's rule (module docs).

    Args:
        model: from `icon2_lens.load_model`; must match the directions.
        directions: the `DirectionSet` (its suggested layers are the default range).
        table: a ``score`` output folder (its full ``scores.jsonl``, the ``selected.jsonl`` rows left
            out), a JSONL file or a list of rows (``instruction`` and ``criterion``); ``n`` rows are drawn
            at random (seeded), in table order (`calibration_sample`).
        n: instructions (the paper: 100 suffice; 32 is the CPU default here). Fewer rows left after the
            exclusion is an error.
        gammas_pos: the grid of chosen-side strengths (default: `DEFAULT_GRIDS` of ``scale``).
        gammas_neg: the grid of rejected-side strengths, each below every gamma+ (default: `DEFAULT_GRIDS`).
        scorer: ``None`` / ``"reward-probe"`` (default: `icon2_lens.reward_probe.RewardProbeScorer` fitted
            on the built-in human-written response pairs at the steering layers; its accuracy on the
            held-out preference set is recorded), ``"self-probe"`` (`icon2_lens.judges.ProbeScorer`: the
            steering directions themselves; circular, warned about and labelled), any pointwise scorer
            (e.g. a `RewardModelScorer`), or a `PairwiseJudge` (then a gamma's score is its win rate
            against the unsteered response, and a pair wins when the judge prefers chosen in both orders).
        win_threshold: the share of chosen > rejected a gamma- must exceed.
        layers: steering layers (default: the suggested range; see `icon2_lens.steer`).
        scale: ``"relative"``, ``"unit"`` or ``"contrast"`` (see `icon2_lens.steer`).
        positions: ``"all"`` or ``"generated"`` (see `icon2_lens.steer`).
        criterion: steer every row along this criterion instead of the table's.
        max_new_tokens: token budget per response (greedy decoding).
        repetition_penalty: HF repetition penalty of the sweep's decoding.
        batch_size: rows per generation batch (rows mix gammas).
        seed: seed of the sample, the generation and the bootstrap.
        exclude: the training instructions, never drawn (default: a ``score`` folder's selected rows).
        n_boot: resamples of the ``n`` instructions for `CalibrationResult.bootstrap` (0: none).
        preference_pairs: the held-out pairs the reward probe's accuracy is measured on (default: the
            shipped set's ``test`` split, `icon2_lens.preference.load_preference_set`).
        progress: progress bar.

    Returns:
        A `CalibrationResult` (``.table()``, ``.figure()``, ``.save(dir)``). Warns when a gamma makes
        more than 25% of responses degenerate, and when the chosen pair wins under half of the resamples.

    Examples:
        >>> cal = il.calibrate_gamma(model, dirs, "runs/scores", n=32)  # doctest: +SKIP
        >>> print(cal.table()); cal.save("runs/calibration")  # doctest: +SKIP
    """
    directions.check_compatible(model)
    if scale not in DEFAULT_GRIDS:
        raise ValueError(f"Unknown scale {scale!r}; use one of {sorted(DEFAULT_GRIDS)}.")
    gp, gn = gamma_grid(DEFAULT_GRIDS[scale][0] if gammas_pos is None else gammas_pos,
                        DEFAULT_GRIDS[scale][1] if gammas_neg is None else gammas_neg)
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be positive (got n={n}, max_new_tokens={max_new_tokens}).")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}.")
    check_win_threshold(win_threshold)
    rows, sample_info = calibration_sample(table, n, directions, exclude=exclude, criterion=criterion, seed=seed)
    layer_list = list(layers) if layers is not None else list(directions.suggested_layers or [])
    qs = [r["instruction"] for r in rows]
    crits = [r["criterion"] for r in rows]
    pairwise = is_pairwise(scorer)
    grid = gn + ([0.0] if pairwise else []) + gp
    pushes = _pushes(directions, crits, grid, layer_list, scale)  # also checks the layers before any work
    score_fn, scorer_label = _resolve_scorer(scorer, model, directions, layer_list, layers, progress)
    scorer_info: dict[str, Any] = {}
    if isinstance(score_fn, RewardProbeScorer):
        scorer_info = {"scorer_probe": score_fn.describe(), "scorer_cosine": score_fn.cosine_with(directions),
                       "scorer_accuracy": _probe_accuracy(score_fn, preference_pairs)}
    tok = model.tokenizer
    jobs = [(g, i) for g in grid for i in range(len(rows))]
    texts: dict[tuple[float, int], str] = {}
    with tqdm(total=len(jobs), desc="calibration sweep", unit="response", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            gen = generate_steered(
                model, [render_chat(tok, rows[i]["instruction"]) for _, i in batch], directions=directions,
                criteria=[rows[i]["criterion"] for _, i in batch], gammas=[g for g, _ in batch],
                layers=layer_list or None, scale=scale, positions=positions, max_new_tokens=max_new_tokens,
                repetition_penalty=repetition_penalty, seed=seed)
            for (g, i), r in zip(batch, gen, strict=True):
                texts[(g, i)] = r["text"]
            bar.update(len(batch))
    deg = {k: is_degenerate(t) for k, t in texts.items()}
    scores: dict[tuple[float, int], float] = {}
    idx = range(len(rows))
    beats = None
    if pairwise:
        for g in grid:
            vs = [0.5] * len(rows) if g == 0.0 else score_fn.compare(qs, [texts[(g, i)] for i in idx],
                                                                     [texts[(0.0, i)] for i in idx])
            scores.update({(g, i): v for i, v in enumerate(vs)})
        # a pair wins when the judge prefers chosen in both orders
        beats = {(p, q): [v == 1.0 for v in score_fn.compare(qs, [texts[(p, i)] for i in idx],
                                                             [texts[(q, i)] for i in idx])]
                 for p in gp for q in gn}
    else:
        flat = list(texts)
        vals = score_fn([qs[i] for _, i in flat], [texts[k] for k in flat], [crits[i] for _, i in flat])
        scores = dict(zip(flat, (float(v) for v in vals), strict=True))
    table_scores = {g: [scores[(g, i)] for i in idx] for g in grid}
    table_deg = {g: [deg[(g, i)] for i in idx] for g in grid}
    choice = choose_gammas(table_scores, table_deg, gp, gn, win_threshold=win_threshold, beats=beats)
    boot = bootstrap_choices(table_scores, table_deg, gp, gn, win_threshold=win_threshold, beats=beats,
                             n_boot=n_boot, seed=seed)
    per_gamma = [{"gamma": g, "mean_score": choice.mean_score[g], "degenerate_share": choice.degenerate_share[g],
                  "distinct2": sum(distinct_n(texts[(g, i)], 2) for i in idx) / len(idx), "n": len(idx),
                  **pushes[g]} for g in grid]
    pairs = [{"gamma_pos": p, "gamma_neg": q, "win_share": w} for (p, q), w in choice.win_share.items()]
    best_pos, best_neg, win = choice.gamma_pos, choice.gamma_neg, choice.win_share
    if not choice.threshold_met:
        warnings.warn(f"No gamma- reaches a win share above {win_threshold} with gamma+ = {best_pos:g} (best: "
                      f"{win[(best_pos, best_neg)]:.2f} at gamma- = {best_neg:g}); widen the grid or use more "
                      "instructions.", stacklevel=2)
    for r in per_gamma:
        if r["degenerate_share"] > FLUENCY_WARNING_SHARE:
            warnings.warn(f"gamma = {r['gamma']:g} breaks fluency: {r['degenerate_share']:.0%} of its responses "
                          "degenerate (repetition or very low distinct-2).", stacklevel=2)
    stable = next((b["share"] for b in boot if (b["gamma_pos"], b["gamma_neg"]) == (best_pos, best_neg)), 0.0)
    if boot and stable < STABILITY_WARNING_SHARE:
        warnings.warn(f"The choice is unstable: (gamma+ {best_pos:g}, gamma- {best_neg:g}) is chosen in only "
                      f"{stable:.0%} of {n_boot} resamples of the {n} instructions; use more instructions.",
                      stacklevel=2)
    examples = [{"instruction": qs[i], "criterion": crits[i], "gamma": g, "response": texts[(g, i)],
                 "score": scores[(g, i)], "degenerate": deg[(g, i)]} for i in range(min(3, len(rows))) for g in grid]
    settings = {"scorer": scorer_label, **scorer_info, "n": len(rows), "layers": layer_list,
                "scale": scale, "positions": positions, "win_threshold": win_threshold, "seed": seed,
                "n_boot": n_boot, "sample": sample_info,
                "decoding": {"max_new_tokens": max_new_tokens, "do_sample": False,
                             "repetition_penalty": repetition_penalty},
                "model": model.info.model_id}
    return CalibrationResult(gamma_pos=best_pos, gamma_neg=best_neg, per_gamma=per_gamma, pairs=pairs,
                             settings=settings, examples=examples, bootstrap=boot)


def _probe_accuracy(scorer: RewardProbeScorer, pairs: Sequence[PreferenceLike] | None) -> dict[str, Any] | None:
    """The reward probe's preference accuracy on held-out pairs (default: the shipped ``test`` split)."""
    source = "given"
    if pairs is None:
        try:
            from .preference import load_preference_set

            pairs, source = load_preference_set(split="test"), "shipped test split"
        except (ImportError, OSError, ValueError) as exc:
            warnings.warn(f"The shipped preference set could not be read ({exc}); the reward probe's held-out "
                          "accuracy is not recorded. Pass preference_pairs= to measure it.", stacklevel=3)
            return None
    return {**scorer.accuracy(pairs), "set": source}
