"""System-prompt pairs (Icon2 paper, App. I): chosen under the criterion's positive system prompt, rejected under
its negative one.

The same contrast Icon2 extracts its directions from, used directly as a prompt instead of through the residual
stream. Both sides are decoded the way Icon2's pairs are (greedy by default, the same budget), so the two
methods differ only in how the behaviour is induced. The saved ``prompt`` is the user message alone: the system
prompt that made the response is not part of the training data (a model trained on it learns to answer the plain
instruction the way the system prompt asked).

Costs: everything is ``generation`` (no labelling step).

Examples:
    >>> pairs = system_prompts.make_pairs(model, ["Name a river."], criterion="helpful")  # doctest: +SKIP
    >>> pairs[0]["system_chosen"]  # doctest: +SKIP
    'You are a helpful assistant.'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..criteria import Criterion, resolve_criteria
from ..gen import engine
from ..models import LoadedModel
from ..prompts import render_chat
from ..runs.costs import CostMeter
from .common import GENERATION, InstructionRow, Phase, ResponseBudget, instruction_rows, pair_row, run_method

__all__ = ["SystemPromptsConfig", "make_pairs", "METHOD"]

METHOD = "system_prompts"


@dataclass(frozen=True, kw_only=True)
class SystemPromptsConfig(ResponseBudget):
    """Settings of system-prompt pairs.

    Attributes:
        criterion: the criterion for rows without one (Icon2's selection assigns one per row; a plain instruction
            list has none). One of the default criteria (general, helpful, honest, harmless).
        do_sample: sample both sides (default: greedy, as Icon2's steered pairs).

    Examples:
        >>> SystemPromptsConfig(criterion="helpful").max_new_tokens
        256
    """

    criterion: str = "general"
    do_sample: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_criteria([self.criterion])  # a clear error for an unknown name


def make_pairs(
    model: LoadedModel,
    instructions: Any,
    config: SystemPromptsConfig | None = None,
    *,
    criteria: list[Criterion] | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
) -> list[dict[str, Any]]:
    """One pair per instruction: the answer under the criterion's P+ system prompt vs under its P- one.

    Args:
        model: from `icon2_lens.load_model`.
        instructions: what `icon2_lens.baselines.instruction_rows` reads (rows with ``criterion`` use theirs).
        config: a `SystemPromptsConfig`.
        criteria: the criteria whose prompts are used (default: the four defaults; custom ones by name).
        seed: the run's seed (per-batch seeds; matters with ``do_sample``).
        out: a folder (``pairs.jsonl``, ``generation.json``, ``costs.json``); a rerun resumes.
        shard: ``(i, n)`` for data-parallel runs.
        progress: progress bar.
        meter: count costs into this meter (the pipeline's) instead of writing ``costs.json``.

    Returns:
        Rows in TRL's conversational format (see `icon2_lens.baselines.pair_row`) plus ``system_chosen`` and
        ``system_rejected``.
    """
    cfg = config or SystemPromptsConfig()
    crits = {c.name: c for c in (criteria or resolve_criteria(None))}
    rows = [InstructionRow(r.instruction, r.criterion or cfg.criterion) for r in instruction_rows(instructions)]
    unknown = sorted({str(r.criterion) for r in rows if r.criterion not in crits})
    if unknown:
        raise ValueError(f"Criteria {unknown} have no system prompts here (known: {sorted(crits)}); pass "
                         "criteria=[Criterion(...)] for custom ones.")
    eng, tok = engine(model), model.tokenizer
    decoding = cfg.decoding(do_sample=cfg.do_sample)

    def make(batch: list[InstructionRow], s: int, phase: Phase) -> list[dict[str, Any]]:
        pos = [render_chat(tok, r.instruction, system=crits[str(r.criterion)].positive) for r in batch]
        neg = [render_chat(tok, r.instruction, system=crits[str(r.criterion)].negative) for r in batch]
        with phase(GENERATION):
            gen = eng.generate(pos + neg, decoding, seed=s)
        k = len(batch)
        return [pair_row(r, gen[i], gen[k + i], method=METHOD, system_chosen=crits[str(r.criterion)].positive,
                         system_rejected=crits[str(r.criterion)].negative, do_sample=cfg.do_sample)
                for i, r in enumerate(batch)]

    return run_method(method=METHOD, model=model, rows=rows, config=cfg, make=make, seed=seed, out=out, shard=shard,
                      progress=progress, meter=meter,
                      settings={"criteria": {n: c.to_dict() for n, c in sorted(crits.items())}})
