"""Sampling-Ranking (Icon2 paper, Table 1/4, App. B.1; the SimPO on-policy recipe): k samples per instruction,
scored one by one by a reward model; chosen = the highest score, rejected = the lowest.

Sources (``../shared/BASELINES.md`` sec. 2). Icon2, App. B.1: "For Sampling-Ranking, we randomly generated five
responses, then used ArmoRM-Llama3-8B-v0.1 as the reward model to score the responses." The recipe is SimPO's
on-policy data (Meng et al. 2024, ``princeton-nlp/SimPO``, ``on_policy_data_gen``): 5 samples at temperature 0.8
and top-p 0.95, ArmoRM scores, chosen = max, rejected = min. Those are this module's defaults (``k=5``,
``temperature=0.8``, ``top_p=0.95``); the token budget and repetition penalty are the shared `ResponseBudget`
ones, so every method gets the same budget.

The scorer. ArmoRM is an 8B hub model, so the offline default (``scorer=None``) is a stand-in:
`icon2_lens.reward_probe.RewardProbeScorer` fitted on the same model (``RewardProbeScorer.fit(model)``: a linear
read-out of answer quality fitted on the package's human-written better/worse answers, not on anything this
method makes). It is much weaker than ArmoRM; measure it before trusting it:
``RewardProbeScorer.fit(model).accuracy(il.load_preference_set())`` gives its accuracy on held-out human pairs.
It is fitted when the first batch is scored (inside the ``labelling`` cost phase, so its cost is counted; not at
all when a resumed run has nothing left to do). ``scorer="path/or/hf-id"`` opens any HF sequence-classification
reward model with `icon2_lens.judges.RewardModelScorer` (ArmoRM itself, where it is available); a library user can
pass any object with the `icon2_lens.judges.Scorer` protocol as ``scorer_object=``. The scorer's name is part of
the run's settings, so a run with another scorer is another run (a resume into the same folder is refused).

Details not in the sources, chosen here. The k samples of a batch are one ``generate`` call with the batch seed.
Each distinct sample text of an instruction is scored once (identical samples get identical scores, which also
means a pair never has the same text on both sides); if all distinct samples score the same (or all k samples
are the same text) the row is dropped with ``drop_reason: "tie"``. Ties between samples are broken by sample
order (the first maximum, the first minimum).

Row provenance: ``scores`` (the k samples' scores, in sample order), ``chosen_rank_index`` and
``rejected_rank_index`` (indices into ``scores``), ``scorer`` (its name), ``k``, ``n_finished_samples`` and
``judge`` (`judge_stats`: ``comparisons`` = distinct samples scored, all ``parsed``, ``first_position`` None: a
pointwise scorer has no positions).

Costs: sampling is ``generation``; scoring (and fitting the probe) is ``labelling``.

Examples:
    >>> pairs = sampling_ranking.make_pairs(model, ["Name a river."], max_new_tokens=64)  # doctest: +SKIP
    >>> pairs[0]["scores"], pairs[0]["scorer"]  # doctest: +SKIP
    ([0.3, -1.2, 0.9, 0.1, 0.4], 'reward_probe')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..gen import Generation, engine
from ..judges import RewardModelScorer, Scorer
from ..models import LoadedModel
from ..prompts import render_chat
from ..reward_probe import RewardProbeScorer
from ..runs.costs import CostMeter
from .common import (
    GENERATION,
    LABELLING,
    InstructionRow,
    Phase,
    ResponseBudget,
    dropped_row,
    instruction_rows,
    pair_row,
    run_method,
)

__all__ = ["SamplingRankingConfig", "make_pairs", "METHOD", "best_and_worst", "distinct", "judge_stats",
           "DEFAULT_CRITERION"]

METHOD = "sampling_ranking"
#: The criterion passed to the scorer for a row without one (a pooled probe or a reward model ignores it).
DEFAULT_CRITERION = "general"


@dataclass(frozen=True, kw_only=True)
class SamplingRankingConfig(ResponseBudget):
    """Settings of Sampling-Ranking (defaults: SimPO's on-policy recipe, as Icon2 ran it).

    Attributes:
        k: samples per instruction (Icon2 and SimPO: 5).
        temperature: sampling temperature (SimPO's on-policy data: 0.8).
        top_p: nucleus mass (SimPO's on-policy data: 0.95).
        scorer: ``None``: the offline stand-in for ArmoRM, a `icon2_lens.reward_probe.RewardProbeScorer` fitted on
            the model itself; a string: a local folder (or HF id, when downloads are allowed) of an HF
            sequence-classification reward model, opened with `icon2_lens.judges.RewardModelScorer`.
        scorer_batch_size: responses per forward pass of the scorer.

    Examples:
        >>> SamplingRankingConfig().k, SamplingRankingConfig().temperature, SamplingRankingConfig().top_p
        (5, 0.8, 0.95)
    """

    k: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    scorer: str | None = None
    scorer_batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"k must be an integer of at least 2 (one chosen, one rejected), got {self.k!r}.")
        if (isinstance(self.scorer_batch_size, bool) or not isinstance(self.scorer_batch_size, int)
                or self.scorer_batch_size < 1):
            raise ValueError(f"scorer_batch_size must be a positive integer, got {self.scorer_batch_size!r}.")
        if self.scorer is not None and (not isinstance(self.scorer, str) or not self.scorer.strip()):
            raise ValueError(f"scorer must be None (the reward probe) or a reward model's folder/HF id, got "
                             f"{self.scorer!r}.")


def judge_stats(comparisons: int, parsed: int, first_position: int | None = None) -> dict[str, int | None]:
    """The judge statistics every row of a self-judging (or scoring) method carries.

    Args:
        comparisons: judge queries made for the instruction (scorer calls, pairwise prompts, judge samples).
        parsed: how many gave a usable verdict.
        first_position: how many of the parsed pairwise verdicts picked the response shown first (``None`` for a
            pointwise scorer or judge).

    Examples:
        >>> judge_stats(4, 4, 3)
        {'comparisons': 4, 'parsed': 4, 'first_position': 3}
    """
    if not 0 <= parsed <= comparisons:
        raise ValueError(f"parsed ({parsed}) must be between 0 and comparisons ({comparisons}).")
    if first_position is not None and not 0 <= first_position <= parsed:
        raise ValueError(f"first_position ({first_position}) must be between 0 and parsed ({parsed}).")
    return {"comparisons": int(comparisons), "parsed": int(parsed),
            "first_position": None if first_position is None else int(first_position)}


def distinct(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and for each text the index of its distinct text.

    Examples:
        >>> distinct(["a", "b", "a", "c"])
        (['a', 'b', 'c'], [0, 1, 0, 2])
    """
    first: dict[str, int] = {}
    where = [first.setdefault(t, len(first)) for t in texts]
    return list(first), where


def best_and_worst(scores: Sequence[float | None]) -> tuple[int, int] | None:
    """The indices of the highest and the lowest score (the first of equals), or ``None`` for a tie.

    ``None`` scores (unscored candidates) are skipped; fewer than two scores, or all scores equal, is a tie.

    Examples:
        >>> best_and_worst([0.2, 0.9, -1.0, 0.9])
        (1, 2)
        >>> best_and_worst([0.5, 0.5]) is None, best_and_worst([None, 3.0]) is None
        (True, True)
    """
    known = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(known) < 2:
        return None
    hi = max(s for s, _ in known)
    lo = min(s for s, _ in known)
    if hi == lo:
        return None
    return next(i for s, i in known if s == hi), next(i for s, i in known if s == lo)


def _scorer_name(scorer: Any) -> str:
    return str(getattr(scorer, "name", None) or type(scorer).__name__)


def _watched(scorer: Any, model: LoadedModel) -> list[Any]:
    """The scorer's own model, to count its forwards (not the generating model: that one is counted already)."""
    inner = getattr(scorer, "model", None)
    if inner is None or inner is model:
        return []
    return [inner] if isinstance(inner, torch.nn.Module) or hasattr(inner, "bridge") else []


def make_pairs(
    model: LoadedModel,
    instructions: Any,
    config: SamplingRankingConfig | None = None,
    *,
    scorer_object: Scorer | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
) -> list[dict[str, Any]]:
    """One pair per instruction: the best- vs the worst-scored of ``k`` samples.

    Args:
        model: from `icon2_lens.load_model` (it samples; with the default scorer it also reads).
        instructions: what `icon2_lens.baselines.instruction_rows` reads.
        config: a `SamplingRankingConfig`.
        scorer_object: any `icon2_lens.judges.Scorer` (``scorer(instructions, responses, criteria) -> scores``,
            with a ``name``); it replaces ``config.scorer``.
        seed: the run's seed (per-batch seeds).
        out: a folder (``pairs.jsonl``, ``generation.json``, ``costs.json``); a rerun resumes.
        shard: ``(i, n)`` for data-parallel runs.
        progress: progress bar.
        meter: count costs into this meter (the pipeline's) instead of writing ``costs.json``.

    Returns:
        Rows in TRL's conversational format (see `icon2_lens.baselines.pair_row`) plus ``scores``,
        ``chosen_rank_index``, ``rejected_rank_index``, ``scorer``, ``k``, ``n_finished_samples`` and ``judge``;
        a tie is a ``kept: false`` row (``drop_reason: "tie"``).

    Examples:
        >>> rows = make_pairs(model, ["Name a river."], SamplingRankingConfig(k=3))  # doctest: +SKIP
    """
    cfg = config or SamplingRankingConfig()
    rows = instruction_rows(instructions)
    eng, tok = engine(model), model.tokenizer
    decoding = cfg.decoding(do_sample=True)
    scorer: Any = scorer_object
    if scorer is None and cfg.scorer is not None:
        scorer = RewardModelScorer(cfg.scorer, batch_size=cfg.scorer_batch_size)
    name = _scorer_name(scorer) if scorer is not None else RewardProbeScorer.name
    cache: dict[str, Any] = {"scorer": scorer}

    def score(qs: list[str], texts: list[str], crits: list[str]) -> list[float]:
        if cache["scorer"] is None:  # the default: fitted once, when first needed
            cache["scorer"] = RewardProbeScorer.fit(model, batch_size=cfg.scorer_batch_size)
        return [float(x) for x in cache["scorer"](qs, texts, crits)]

    def make(batch: list[InstructionRow], s: int, phase: Phase) -> list[dict[str, Any]]:
        k = cfg.k
        prompts = [render_chat(tok, r.instruction) for r in batch for _ in range(k)]
        with phase(GENERATION):
            gen = eng.generate(prompts, decoding, seed=s)
        samples = [gen[i * k:(i + 1) * k] for i in range(len(batch))]
        uniq = [distinct([g.text for g in row]) for row in samples]
        qs = [r.instruction for r, (u, _) in zip(batch, uniq, strict=True) for _ in u]
        crits = [r.criterion or DEFAULT_CRITERION for r, (u, _) in zip(batch, uniq, strict=True) for _ in u]
        with phase(LABELLING):
            flat = score(qs, [t for u, _ in uniq for t in u], crits)
        out_rows, start = [], 0
        for r, row_samples, (u, where) in zip(batch, samples, uniq, strict=True):
            mine = flat[start:start + len(u)]
            start += len(u)
            out_rows.append(_row(r, row_samples, [mine[j] for j in where], scorer=name,
                                 judge=judge_stats(len(u), len(u))))
        return out_rows

    return run_method(method=METHOD, model=model, rows=rows, config=cfg, make=make, seed=seed, out=out, shard=shard,
                      progress=progress, meter=meter, watch=_watched(scorer, model), settings={"scorer_name": name})


def _row(r: InstructionRow, samples: Sequence[Generation], scores: list[float], *, scorer: str,
         judge: dict[str, Any]) -> dict[str, Any]:
    prov: dict[str, Any] = {"scores": scores, "scorer": scorer, "k": len(samples),
                            "n_finished_samples": sum(g.finished for g in samples), "judge": judge}
    pick = best_and_worst(scores)
    if pick is None:
        return dropped_row(r, method=METHOD, reason="tie", chosen_rank_index=None, rejected_rank_index=None, **prov)
    c, j = pick
    return pair_row(r, samples[c], samples[j], method=METHOD, chosen_rank_index=c, rejected_rank_index=j, **prov)
