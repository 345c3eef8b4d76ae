"""Choosing the steering strengths gamma+ and gamma- (the paper's App. J rule, METHOD.md section 4).

On ``n`` instructions, every gamma of the grid (``gammas_pos`` and ``gammas_neg``) generates one
response per instruction (all in mixed batches with per-row gammas). A scorer scores them; a
response that degenerates (`icon2_lens.evaluation.is_degenerate`) gets the lowest score seen in the
sweep, and a pair with a degenerate side counts as a loss. Then:

1. gamma+ = the one with the highest mean score;
2. gamma- = among those whose pairs (gamma+, gamma-) have chosen > rejected in more than
   ``win_threshold`` (0.9) of the instructions, the one with the highest mean score (the smallest
   reliable gap: large gaps invite reward hacking). If none passes, the one with the highest win
   share, with a warning.

The rule itself is the pure `icon2_lens.math.gamma.choose_gammas` (tested on made-up tables); this
module generates and scores the sweep and reports it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from .directions import DirectionSet
from .judges import ProbeScorer, Scorer, is_pairwise
from .math.gamma import check_win_threshold, choose_gammas, gamma_grid
from .math.text import distinct_n, is_degenerate
from .models import LoadedModel
from .pairs import DEFAULT_DECODING, generate_steered, table_rows
from .prompts import render_chat
from .reports import calibration_figure, calibration_table
from .runs.io import atomic_write_text
from .steering import Positions, Scale

if TYPE_CHECKING:
    import matplotlib.figure

__all__ = ["calibrate_gamma", "CalibrationResult", "DEFAULT_GAMMAS_POS", "DEFAULT_GAMMAS_NEG", "load_gammas"]

#: The default grid (``scale="relative"``: fractions of the layer's mean residual norm).
DEFAULT_GAMMAS_POS = (0.02, 0.05, 0.1, 0.2)
DEFAULT_GAMMAS_NEG = (-0.02, -0.05, -0.1, -0.2)
#: Share of degenerate responses at a gamma above which calibration warns that it breaks fluency.
FLUENCY_WARNING_SHARE = 0.25


@dataclass
class CalibrationResult:
    """The sweep and the chosen strengths.

    Attributes:
        gamma_pos: the chosen strength of the chosen side.
        gamma_neg: the chosen strength of the rejected side.
        per_gamma: one dict per gamma: ``gamma``, ``mean_score``, ``degenerate_share``, ``distinct2``, ``n``.
        pairs: one dict per (gamma+, gamma-): ``gamma_pos``, ``gamma_neg``, ``win_share``.
        settings: scorer, layers, scale, decoding, n, win threshold.
        examples: a few (instruction, gamma, response) rows.
    """

    gamma_pos: float
    gamma_neg: float
    per_gamma: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    settings: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Markdown: mean score etc. per gamma, then the win-share matrix (rows gamma+, columns gamma-)."""
        return calibration_table(self.to_dict())

    def figure(self) -> matplotlib.figure.Figure:
        """Mean score and degenerate share per gamma; win share per gamma- for the chosen gamma+."""
        return calibration_figure(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"gamma_pos": self.gamma_pos, "gamma_neg": self.gamma_neg, "per_gamma": self.per_gamma,
                "pairs": self.pairs, "settings": self.settings, "examples": self.examples}

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


def load_gammas(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``gammas.yaml`` written by `CalibrationResult.save` (or a folder holding one).

    Examples:
        >>> load_gammas("runs/calibration")["gamma_pos"]  # doctest: +SKIP
        0.1
    """
    p = Path(path)
    if p.is_dir():
        p = p / "gammas.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; run `icon2-lens calibrate` first or pass the gammas directly.")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or "gamma_pos" not in data or "gamma_neg" not in data:
        raise ValueError(f"{p} has no gamma_pos/gamma_neg; it is not a calibration output.")
    return data


def calibrate_gamma(
    model: LoadedModel,
    directions: DirectionSet,
    table: Any,
    *,
    n: int = 32,
    gammas_pos: Sequence[float] = DEFAULT_GAMMAS_POS,
    gammas_neg: Sequence[float] = DEFAULT_GAMMAS_NEG,
    scorer: Scorer | Any | None = None,
    win_threshold: float = 0.9,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
    positions: Positions = "all",
    criterion: str | None = None,
    max_new_tokens: int = DEFAULT_DECODING["max_new_tokens"],
    repetition_penalty: float = DEFAULT_DECODING["repetition_penalty"],
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """Sweep gamma+ and gamma- on ``n`` instructions and pick them by the paper's rule (module docs).

    Args:
        model: from `icon2_lens.load_model`; must match the directions.
        directions: the `DirectionSet` (its suggested layers are the default range).
        table: scored/selected instructions (``instruction`` and ``criterion`` columns), a list of
            dicts, or a ``score`` output folder; the first ``n`` rows are used.
        n: instructions (the paper: 100 suffice; 32 is the CPU default here).
        gammas_pos: the grid of chosen-side strengths.
        gammas_neg: the grid of rejected-side strengths (each below every gamma+).
        scorer: a pointwise scorer (default `ProbeScorer` on the model itself), e.g. a
            `RewardModelScorer`, or a `PairwiseJudge` (then a gamma's score is its win rate against
            the unsteered response, and a pair wins when the judge prefers chosen in both orders).
        win_threshold: the share of chosen > rejected a gamma- must exceed.
        layers: steering layers (default: the suggested range; see `icon2_lens.steer`).
        scale: ``"relative"`` or ``"unit"`` (see `icon2_lens.steer`).
        positions: ``"all"`` or ``"generated"`` (see `icon2_lens.steer`).
        criterion: steer every row along this criterion instead of the table's.
        max_new_tokens: token budget per response (greedy decoding).
        repetition_penalty: HF repetition penalty of the sweep's decoding.
        batch_size: rows per generation batch (rows mix gammas).
        seed: generation seed.
        progress: progress bar.

    Returns:
        A `CalibrationResult` (``.table()``, ``.figure()``, ``.save(dir)``). Warns when a gamma makes
        more than 25% of responses degenerate.

    Examples:
        >>> cal = il.calibrate_gamma(model, dirs, "runs/scores", n=32)  # doctest: +SKIP
        >>> print(cal.table()); cal.save("runs/calibration")  # doctest: +SKIP
    """
    directions.check_compatible(model)
    gp, gn = gamma_grid(gammas_pos, gammas_neg)
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be positive (got n={n}, max_new_tokens={max_new_tokens}).")
    check_win_threshold(win_threshold)
    rows = table_rows(table, criterion, directions)[:n]
    scorer = scorer if scorer is not None else ProbeScorer(model, directions, layers=layers)
    pairwise = is_pairwise(scorer)
    grid = gn + ([0.0] if pairwise else []) + gp
    layer_list = list(layers) if layers is not None else list(directions.suggested_layers or [])
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
    qs = [r["instruction"] for r in rows]
    crits = [r["criterion"] for r in rows]
    deg = {k: is_degenerate(t) for k, t in texts.items()}
    scores: dict[tuple[float, int], float] = {}
    if is_pairwise(scorer):
        for g in grid:
            vs = [0.5] * len(rows) if g == 0.0 else scorer.compare(qs, [texts[(g, i)] for i in range(len(rows))],
                                                                   [texts[(0.0, i)] for i in range(len(rows))])
            scores.update({(g, i): v for i, v in enumerate(vs)})
    else:
        flat = list(texts)
        vals = scorer([qs[i] for _, i in flat], [texts[k] for k in flat], [crits[i] for _, i in flat])
        scores = dict(zip(flat, (float(v) for v in vals), strict=True))
    idx = range(len(rows))
    beats = None
    if is_pairwise(scorer):  # a pair wins when the judge prefers chosen in both orders
        beats = {(p, q): [v == 1.0 for v in scorer.compare(qs, [texts[(p, i)] for i in idx],
                                                           [texts[(q, i)] for i in idx])]
                 for p in gp for q in gn}
    choice = choose_gammas({g: [scores[(g, i)] for i in idx] for g in grid},
                           {g: [deg[(g, i)] for i in idx] for g in grid},
                           gp, gn, win_threshold=win_threshold, beats=beats)
    per_gamma = [{"gamma": g, "mean_score": choice.mean_score[g], "degenerate_share": choice.degenerate_share[g],
                  "distinct2": sum(distinct_n(texts[(g, i)], 2) for i in idx) / len(idx), "n": len(idx)} for g in grid]
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
    examples = [{"instruction": qs[i], "criterion": crits[i], "gamma": g, "response": texts[(g, i)],
                 "score": scores[(g, i)], "degenerate": deg[(g, i)]} for i in range(min(3, len(rows))) for g in grid]
    settings = {"scorer": getattr(scorer, "name", type(scorer).__name__), "n": len(rows), "layers": layer_list,
                "scale": scale, "positions": positions, "win_threshold": win_threshold, "seed": seed,
                "decoding": {"max_new_tokens": max_new_tokens, "do_sample": False,
                             "repetition_penalty": repetition_penalty},
                "model": model.info.model_id}
    return CalibrationResult(gamma_pos=best_pos, gamma_neg=best_neg, per_gamma=per_gamma, pairs=pairs,
                             settings=settings, examples=examples)

