"""Evaluation: base vs trained model (`evaluate`), preference-pair figures (`pair_report`), probe means.

The scorers and judges (`ProbeScorer`, `RewardModelScorer`, `PairwiseJudge`, the `Scorer` and
`Judge` protocols) live in `icon2_lens.judges`, and the report's Markdown and figure in
`icon2_lens.reports`; the scorers are importable from here too.

The text metrics (`distinct_n`, `is_degenerate`, `degeneration_stats`, `parse_verdict`) live in
`icon2_lens.math.text` and the probe in `icon2_lens.math.probe`; they are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .directions import DirectionSet
from .judges import Judge, PairwiseJudge, ProbeScorer, RewardModelScorer, Scorer, is_pairwise, verdicts
from .math.probe import probe_scores
from .math.text import degeneration_stats, distinct_n, is_degenerate, parse_verdict
from .models import LoadedModel
from .prompts import render_chat
from .reports import evaluation_markdown, probe_shift_figure

__all__ = [
    "EvaluateConfig",
    "Scorer",
    "Judge",
    "ProbeScorer",
    "RewardModelScorer",
    "PairwiseJudge",
    "distinct_n",
    "is_degenerate",
    "pair_report",
    "parse_verdict",
    "degeneration_stats",
    "probe_means",
    "evaluate",
]


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Settings of `evaluate`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        max_new_tokens: token budget per answer.
        batch_size: answers per generation batch.
    """

    max_new_tokens: int = 128
    batch_size: int = 8



def pair_report(pairs: Any, *, scorer: Any | None = None, n_examples: int = 5) -> dict[str, Any]:
    """Figures of a preference-pair dataset (`icon2_lens.generate_pairs` output).

    ``identical_share`` (chosen == rejected), per side: mean distinct-2 per response, corpus
    distinct-2 (over all responses of the side), ``degenerate_share``, ``finished_share``, mean
    words; with a ``scorer``: ``win_share`` (chosen scores above rejected and neither degenerates)
    and mean scores; and the first ``n_examples`` pairs.

    Examples:
        >>> pair_report(pairs, scorer=ProbeScorer(model, dirs))["win_share"]  # doctest: +SKIP
        0.94
    """
    rows = [dict(r) for r in pairs]
    if not rows:
        raise ValueError("No pairs to report on.")
    qs = [r["instruction"] for r in rows]
    crits = [r["criterion"] for r in rows]
    side = {s: [r[s][0]["content"] for r in rows] for s in ("chosen", "rejected")}
    identical = sum(a == b for a, b in zip(side["chosen"], side["rejected"], strict=True))
    out: dict[str, Any] = {"n_pairs": len(rows), "identical_share": identical / len(rows)}
    for s, texts in side.items():
        corpus = " ".join(t.replace("\n", " ") for t in texts)
        out[s] = {"distinct2_mean": sum(distinct_n(t, 2) for t in texts) / len(texts),
                  "distinct2_corpus": distinct_n(corpus, 2),
                  "degenerate_share": sum(is_degenerate(t) for t in texts) / len(texts),
                  "finished_share": sum(bool(r.get(f"{s}_finished", True)) for r in rows) / len(rows),
                  "mean_words": sum(len(t.split()) for t in texts) / len(texts)}
    if scorer is not None:
        if is_pairwise(scorer):
            verdict = scorer.compare(qs, side["chosen"], side["rejected"])
            wins = [v == 1.0 for v in verdict]
        else:
            sc, sr = scorer(qs, side["chosen"], crits), scorer(qs, side["rejected"], crits)
            wins = [a > b for a, b in zip(sc, sr, strict=True)]
            out["chosen"]["mean_score"], out["rejected"]["mean_score"] = sum(sc) / len(sc), sum(sr) / len(sr)
        ok = [w and not is_degenerate(a) and not is_degenerate(b)
              for w, a, b in zip(wins, side["chosen"], side["rejected"], strict=True)]
        out["win_share"] = sum(ok) / len(ok)
        out["scorer"] = getattr(scorer, "name", type(scorer).__name__)
    out["examples"] = [{"instruction": q, "criterion": c, "chosen": a, "rejected": b}
                       for q, c, a, b in list(zip(qs, crits, side["chosen"], side["rejected"],
                                                  strict=True))[:n_examples]]
    return out


def _answers(model: LoadedModel, instructions: Sequence[str], *, max_new_tokens: int, batch_size: int,
             progress: bool, desc: str) -> list[str]:
    from tqdm.auto import tqdm

    from .pairs import generate_steered

    out: list[str] = []
    with tqdm(total=len(instructions), desc=desc, unit="answer", disable=not progress) as bar:
        for start in range(0, len(instructions), batch_size):
            chunk = instructions[start:start + batch_size]
            rows = generate_steered(model, [render_chat(model.tokenizer, q) for q in chunk],
                                    max_new_tokens=max_new_tokens, repetition_penalty=1.1)
            out.extend(r["text"] for r in rows)
            bar.update(len(chunk))
    return out


def probe_means(model: LoadedModel, directions: DirectionSet, instructions: Sequence[str], *,
                layers: Sequence[int] | None = None, batch_size: int = 16) -> dict[str, float]:
    """Mean standardised projection of the model's last-token residual (instruction as the user
    turn, no system prompt of our own) on each criterion's direction, averaged over ``layers``.

    Examples:
        >>> probe_means(trained, base_dirs, heldout)["helpful"]  # doctest: +SKIP
        0.12
    """
    from .activations import read_last_token
    from .prompts import scoring_texts

    directions.check_compatible(model)
    layer_ids = list(layers or directions.suggested_layers or directions.layers)
    cols = [directions.layers.index(x) for x in layer_ids]
    h = read_last_token(model, scoring_texts(model.tokenizer, instructions), hook=directions.hook, layers=layer_ids,
                        batch_size=batch_size, progress=False)
    z = probe_scores(h, directions.vectors[:, cols], mean=directions.stats["proj_mean"][:, cols],
                     std=directions.stats["proj_std"][:, cols]).mean(0)
    return {c: float(z[i]) for i, c in enumerate(directions.criteria)}


def evaluate(
    base: LoadedModel,
    trained: LoadedModel,
    directions: DirectionSet,
    instructions: Sequence[str],
    *,
    judge: Any | None = None,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = EvaluateConfig.max_new_tokens,
    batch_size: int = EvaluateConfig.batch_size,
    training_instructions: Sequence[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Base vs trained model on held-out instructions: probe shift, pairwise judge, degeneration.

    Args:
        base: the model before training (its directions are the probes).
        trained: the trained model (same shape: `DirectionSet.check_compatible` must pass).
        directions: the base model's `DirectionSet`.
        instructions: held-out instructions (not trained on).
        judge: a `PairwiseJudge` (default: the base model judging, both orders, flips are ties).
        layers: probe layers (default: the suggested range).
        max_new_tokens: answer budget (greedy, repetition penalty 1.1).
        batch_size: answers per generation batch.
        training_instructions: if given, a warning names the overlap with ``instructions``.
        out: a folder for ``metrics.json``, ``report.md``, ``probe_shift.png`` and the AlpacaEval-format
            ``alpaca_eval_base.json`` / ``alpaca_eval_trained.json`` (written atomically).
        overwrite: replace an existing ``out``.
        progress: progress bars.

    Returns:
        The metrics: ``probe`` (per criterion: base, trained, shift), ``judge`` (win, tie, loss rates of
        trained vs base), ``degeneration`` (per model), ``n``.

    Examples:
        >>> m = il.evaluate(base, trained, dirs, heldout, out="runs/eval")  # doctest: +SKIP
    """
    import json as _json
    import warnings

    from .runs.io import atomic_folder, check_output_folder

    instructions = list(instructions)
    if not instructions:
        raise ValueError("No held-out instructions to evaluate on.")
    if out is not None:
        check_output_folder(out, overwrite=overwrite)
    directions.check_compatible(base)
    directions.check_compatible(trained)
    if training_instructions is not None:
        overlap = set(instructions) & set(training_instructions)
        if overlap:
            warnings.warn(f"{len(overlap)} of the {len(instructions)} evaluation instructions were trained on "
                          f"(e.g. {sorted(overlap)[0]!r}); the evaluation is not held out.", stacklevel=2)
    ans_base = _answers(base, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                        desc="base answers")
    ans_trained = _answers(trained, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc="trained answers")
    pb = probe_means(base, directions, instructions, layers=layers)
    pt = probe_means(trained, directions, instructions, layers=layers)
    judge = judge if judge is not None else PairwiseJudge(base)
    first_share = None
    if hasattr(judge, "orders"):  # keep the raw verdicts: how often the judge simply picks the first position
        ab, ba = judge.orders(instructions, ans_trained, ans_base)
        verdict = verdicts(ab, ba)
        first_share = (sum(ab) + sum(ba)) / (2 * len(ab))
    else:
        verdict = judge.compare(instructions, ans_trained, ans_base)
    n = len(instructions)
    metrics: dict[str, Any] = {
        "n": n,
        "probe": {c: {"base": pb[c], "trained": pt[c], "shift": pt[c] - pb[c]} for c in directions.criteria},
        "judge": {"name": getattr(judge, "name", type(judge).__name__),
                  "win": sum(v == 1.0 for v in verdict) / n, "tie": sum(v == 0.5 for v in verdict) / n,
                  "loss": sum(v == 0.0 for v in verdict) / n, "first_position_share": first_share},
        "degeneration": {"base": degeneration_stats(ans_base), "trained": degeneration_stats(ans_trained)},
        "models": {"base": base.info.model_id, "trained": trained.info.model_id},
    }
    if out is not None:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "metrics.json").write_text(_json.dumps(metrics, indent=2))
            for name, model, answers in (("base", base, ans_base), ("trained", trained, ans_trained)):
                rows = [{"instruction": q, "output": a, "generator": model.info.model_id}
                        for q, a in zip(instructions, answers, strict=True)]
                (tmp / f"alpaca_eval_{name}.json").write_text(_json.dumps(rows, indent=2))
            (tmp / "report.md").write_text(evaluation_markdown(metrics))
            probe_shift_figure(metrics).savefig(tmp / "probe_shift.png", dpi=110)
    return metrics

