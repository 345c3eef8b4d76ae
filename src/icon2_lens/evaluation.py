"""Evaluation: base vs trained model (`evaluate`), preference-pair figures (`pair_report`), probe means.

The scorers and judges (`ProbeScorer`, `RewardModelScorer`, `PairwiseJudge`, the `Scorer` and
`Judge` protocols) live in `icon2_lens.judges`, and the report's Markdown and figure in
`icon2_lens.reports`; the scorers are importable from here too.

The text metrics (`distinct_n`, `is_degenerate`, `degeneration_stats`, `parse_verdict`) live in
`icon2_lens.math.text` and the probe in `icon2_lens.math.probe`; they are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from .activations import check_context
from .directions import DirectionSet
from .errors import BadInputError, check_finite
from .gen.base import check_count
from .judges import Judge, PairwiseJudge, ProbeScorer, RewardModelScorer, Scorer, is_pairwise, judge_summary
from .math.bootstrap import DEFAULT_LEVEL, DEFAULT_N_BOOT, paired_difference
from .math.probe import orthogonalize_criteria, probe_scores, project
from .math.text import degeneration_stats, distinct_n, is_degenerate, parse_verdict
from .models import LoadedModel
from .preference import PreferencePair, check_held_out, evaluate_preferences, load_preference_set
from .prompts import render_chat
from .reports import evaluation_markdown, preference_figure, probe_shift_figure

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
    "probe_readings",
    "self_probe_shift",
    "evaluate",
]


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Settings of `evaluate`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        max_new_tokens: token budget per answer.
        batch_size: answers per generation batch and preference pairs per forward pass.
        preference_set: a JSONL file of held-out preference pairs (``prompt``, ``chosen``, ``rejected``,
            optional ``criterion``); ``None``: the shipped set's ``test`` split.
        n_boot: bootstrap resamples of every interval.
        level: interval coverage (0.9: 90% intervals).
    """

    max_new_tokens: int = 128
    batch_size: int = 8
    preference_set: str | None = None
    n_boot: int = DEFAULT_N_BOOT
    level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "n_boot"):
            check_count(getattr(self, name), name)
        check_finite(self.level, "level")
        if not 0 < self.level < 1:
            raise BadInputError(f"level is an interval's coverage, in (0, 1); got {self.level}.", option="level")



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


def probe_readings(model: LoadedModel, directions: DirectionSet, instructions: Sequence[str], *,
                   layers: Sequence[int] | None = None, batch_size: int = 16,
                   orthogonal: bool = True) -> Float[Tensor, "instruction criterion"]:
    """Per instruction and criterion: the standardised projection of the model's last-token residual
    (instruction as the user turn, no system prompt of our own) on the criterion's direction, averaged
    over ``layers``. With ``orthogonal`` (default) each direction has the other criteria's directions
    projected out first (`icon2_lens.math.orthogonalize_criteria`) and the projection is divided by the
    feature set's projection spread (no centring: base and trained are compared on the same scale).

    A *self-probe*: it reads the directions that made the data (EVIDENCE.md).

    Examples:
        >>> probe_readings(trained, base_dirs, heldout).shape  # doctest: +SKIP
        torch.Size([16, 4])
    """
    from .activations import read_last_token
    from .prompts import scoring_texts

    directions.check_compatible(model)
    layer_ids = list(layers or directions.suggested_layers or directions.layers)
    cols = [directions.layers.index(x) for x in layer_ids]
    h = read_last_token(model, scoring_texts(model.tokenizer, instructions), hook=directions.hook, layers=layer_ids,
                        batch_size=batch_size, progress=False)
    vecs = directions.vectors[:, cols]
    if orthogonal:
        return (project(h, orthogonalize_criteria(vecs)) / directions.stats["proj_std"][None, :, cols]).mean(-1)
    return probe_scores(h, vecs, mean=directions.stats["proj_mean"][:, cols], std=directions.stats["proj_std"][:, cols])


def probe_means(model: LoadedModel, directions: DirectionSet, instructions: Sequence[str], *,
                layers: Sequence[int] | None = None, batch_size: int = 16) -> dict[str, float]:
    """Mean standardised projection of the model's last-token residual (instruction as the user
    turn, no system prompt of our own) on each criterion's direction, averaged over ``layers``
    (a *self-probe*; `probe_readings` with ``orthogonal=False``, averaged over instructions).

    Examples:
        >>> probe_means(trained, base_dirs, heldout)["helpful"]  # doctest: +SKIP
        0.12
    """
    z = probe_readings(model, directions, instructions, layers=layers, batch_size=batch_size, orthogonal=False).mean(0)
    return {c: float(z[i]) for i, c in enumerate(directions.criteria)}


def self_probe_shift(base: LoadedModel, trained: LoadedModel, directions: DirectionSet, instructions: Sequence[str],
                     *, layers: Sequence[int] | None = None, n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per criterion: trained minus base `probe_readings` (other criteria projected out), paired over the
    instructions, with a bootstrap interval. A *self-probe* (a manipulation check, never a quality result).

    Examples:
        >>> self_probe_shift(base, trained, dirs, heldout)["helpful"]["shift"]  # doctest: +SKIP
    """
    zb = probe_readings(base, directions, instructions, layers=layers)
    zt = probe_readings(trained, directions, instructions, layers=layers)
    out: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(directions.criteria):
        iv = paired_difference(zt[:, i], zb[:, i], n_boot=n_boot, level=level, seed=seed)
        out[c] = {"base": float(zb[:, i].mean()), "trained": float(zt[:, i].mean()), "shift": iv.mean,
                  "shift_ci_low": iv.low, "shift_ci_high": iv.high, "n": iv.n}
    return out


def evaluate(
    base: LoadedModel,
    trained: LoadedModel,
    directions: DirectionSet | None = None,
    instructions: Sequence[str] | None = None,
    *,
    preference_set: str | os.PathLike[str] | Sequence[PreferencePair] | Sequence[Mapping[str, Any]] | None = None,
    controls: Mapping[str, LoadedModel] | None = None,
    judge: Any | None = None,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = EvaluateConfig.max_new_tokens,
    batch_size: int = EvaluateConfig.batch_size,
    training_instructions: Sequence[str] | None = None,
    n_boot: int = EvaluateConfig.n_boot,
    level: float = EvaluateConfig.level,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Base vs trained (and controls): judge-free preference margins first, then answers, judge and self-probe.

    The headline is independent of the steering directions: on held-out human-written preference pairs
    (`icon2_lens.preference`), each model's length-normalised log-likelihood margin of the better over the
    worse answer, preference accuracy, the margin's shift against the base model and the DPO implicit
    reward accuracy, per criterion, with paired bootstrap intervals and both sides' lengths; the trained
    model is compared pair by pair with each control (swapped pairs, random direction: `icon2_lens.controls`).

    With ``instructions``: both models answer them (greedy, repetition penalty 1.1) for a pairwise judge
    (both orders, flips are ties, its first-position share reported, and a judge above 0.8 reported as
    unable to judge) and degeneration figures; with ``directions`` too, the *self-probe* shift per
    criterion (other criteria projected out, with an interval), labelled as such.

    Args:
        base: the model before training (the reference of the margin shift and implicit reward).
        trained: the trained model.
        directions: the base model's `DirectionSet` (for the self-probe; optional).
        instructions: held-out instructions for answers and the judge (optional).
        preference_set: a JSONL file (``prompt``, ``chosen``, ``rejected``, optional ``criterion``), a list of
            `icon2_lens.preference.PreferencePair`, or ``None`` for the shipped set's ``test`` split.
        controls: name -> control model (e.g. ``{"swapped": m1, "random": m2}``), evaluated beside ``trained``.
        judge: a `Judge` (default: the base model judging itself, `PairwiseJudge`).
        layers: self-probe layers (default: the suggested range).
        max_new_tokens: answer budget.
        batch_size: answers per generation batch and pairs per forward pass.
        training_instructions: instructions trained on or used to choose settings: a warning names any overlap
            with ``instructions`` or the preference prompts.
        n_boot: bootstrap resamples.
        level: interval coverage (0.9: 90% intervals).
        seed: bootstrap seed.
        out: a folder for ``metrics.json``, ``report.md``, ``preference.png`` and, with instructions,
            ``probe_shift.png`` and the AlpacaEval-format ``alpaca_eval_base.json`` / ``alpaca_eval_trained.json``
            (written atomically).
        overwrite: replace an existing ``out``.
        progress: progress bars.

    Returns:
        The metrics: ``preference`` (`icon2_lens.preference.evaluate_preferences`: per model and criterion
        ``n``, ``preference_accuracy``, ``margin_mean``, ``margin_ci_low``, ``margin_ci_high``,
        ``implicit_reward_accuracy``, lengths, the shift against base, and the contrasts with the controls),
        and with instructions ``judge``, ``degeneration``, ``self_probe``, ``n_instructions``.

    Examples:
        >>> m = il.evaluate(base, trained, preference_set="my_pairs.jsonl", out="runs/eval")  # doctest: +SKIP
        >>> m["preference"]["models"]["trained"]["all"]["margin_shift_mean"]  # doctest: +SKIP
    """
    import json as _json
    import warnings

    from .runs.io import atomic_folder, check_output_folder

    EvaluateConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, n_boot=n_boot, level=level)  # its checks
    if out is not None:
        check_output_folder(out, overwrite=overwrite)
    if preference_set is None or isinstance(preference_set, (str, os.PathLike)):
        pref_pairs = load_preference_set(preference_set)
    else:  # PreferencePair objects as given; plain dicts validated like a file's lines
        items: list[Any] = list(preference_set)
        pref_pairs = [p if isinstance(p, PreferencePair) else load_preference_set([dict(p)], split="all")[0]
                      for p in items]
    instructions = list(instructions) if instructions is not None else []
    for m in (base, trained):  # the context rule, before any forward pass
        check_context(m, [render_chat(m.tokenizer, q) for q in instructions], what="instructions")
    if directions is not None:
        directions.check_compatible(base)
        directions.check_compatible(trained)
    controls = dict(controls or {})
    clash = {"base", "trained"} & set(controls)
    if clash:
        raise ValueError(f"Control names {sorted(clash)} are taken; name the controls e.g. 'swapped', 'random'.")
    if training_instructions is not None:
        used = list(training_instructions)
        overlap = set(instructions) & set(used)
        if overlap:
            warnings.warn(f"{len(overlap)} of the {len(instructions)} evaluation instructions were trained on "
                          f"(e.g. {sorted(overlap)[0]!r}); the evaluation is not held out.", stacklevel=2)
        seen = check_held_out(pref_pairs, used)
        if seen:
            warnings.warn(f"{len(seen)} of the {len(pref_pairs)} preference prompts were trained on or used to choose "
                          f"settings (e.g. {seen[0]!r}); the preference figures are not held out.", stacklevel=2)
    models = {"base": base, "trained": trained, **controls}
    metrics: dict[str, Any] = {
        "preference": evaluate_preferences(models, pref_pairs, reference="base", subject="trained",
                                           batch_size=batch_size, n_boot=n_boot, level=level, seed=seed),
        "models": {k: m.info.model_id for k, m in models.items()},
        "n_instructions": len(instructions),
    }
    answers: dict[str, list[str]] = {}
    if instructions:
        for name in ("base", "trained"):
            answers[name] = _answers(models[name], instructions, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress, desc=f"{name} answers")
        judge = judge if judge is not None else PairwiseJudge(base)
        if hasattr(judge, "orders"):  # keep the raw verdicts: how often the judge simply picks the first position
            ab, ba = judge.orders(instructions, answers["trained"], answers["base"])
            metrics["judge"] = {"name": getattr(judge, "name", type(judge).__name__), **judge_summary(ab, ba)}
        else:
            verdict = judge.compare(instructions, answers["trained"], answers["base"])
            n = len(verdict)
            metrics["judge"] = {"name": getattr(judge, "name", type(judge).__name__), "n": n,
                                "win": sum(v == 1.0 for v in verdict) / n, "tie": sum(v == 0.5 for v in verdict) / n,
                                "loss": sum(v == 0.0 for v in verdict) / n, "first_position_share": None,
                                "able_to_judge": None, "note": "the judge gave no per-order verdicts"}
        metrics["degeneration"] = {k: degeneration_stats(v) for k, v in answers.items()}
        if directions is not None:
            metrics["self_probe"] = self_probe_shift(base, trained, directions, instructions, layers=layers,
                                                     n_boot=n_boot, level=level, seed=seed)
    if out is not None:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "metrics.json").write_text(_json.dumps(metrics, indent=2))
            for name, answer_list in answers.items():
                rows = [{"instruction": q, "output": a, "generator": models[name].info.model_id}
                        for q, a in zip(instructions, answer_list, strict=True)]
                (tmp / f"alpaca_eval_{name}.json").write_text(_json.dumps(rows, indent=2))
            (tmp / "report.md").write_text(evaluation_markdown(metrics))
            preference_figure(metrics).savefig(tmp / "preference.png", dpi=110)
            if "self_probe" in metrics:
                probe_shift_figure(metrics).savefig(tmp / "probe_shift.png", dpi=110)
    return metrics
