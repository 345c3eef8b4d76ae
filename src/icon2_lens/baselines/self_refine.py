"""Self-Refine pairs (Icon2 paper, App. B.1; Madaan et al. 2023): a refined response vs an original sample.

Per instruction, the model samples ``n_samples`` responses (3, at temperature 0.7 and top-p 0.9 as Self-Refine's
``run.py``); one of them, drawn uniformly, is critiqued by the model (a feedback prompt) and then rewritten with
that feedback (a refine prompt). The refined response is chosen; the rejected one is drawn uniformly from the
original samples ("randomly selecting one from the original responses", Icon2 B.1), so it may be the very sample
that was refined. An instruction gives no pair when the refinement is empty (``"empty refinement"``) or equals the
rejected text exactly (``"unchanged"``).

The prompts are this project's own: Icon2 does not publish its refine prompt (it cites Kim et al. 2024 and Dong
et al. 2024, whose improver is a trained model), and Self-Refine's dialogue prompts are few-shot completion
prompts for text-davinci-003, not chat prompts a small instruct model can follow. `FEEDBACK_PROMPT` asks for
short, concrete feedback along Self-Refine's dialogue traits (relevant, informative, consistent, helpful, safe,
fluent, ...); `REFINE_PROMPT` gives the instruction, the response and the feedback and asks for the improved
response only. A leading label such as ``Improved response:`` is cut off the refinement (Self-Refine parses the
text after ``Response:``).

Costs: the samples and the refinement are ``generation``; the critique is ``labelling`` (it is the judging step).
Judge statistics (``judge``): one comparison per critique, parsed when the feedback is non-empty,
``first_position`` ``None`` (not pairwise).

Examples:
    >>> pairs = self_refine.make_pairs(model, ["Name a river."])  # doctest: +SKIP
    >>> pairs[0]["refined_index"], pairs[0]["rejected_index"]  # doctest: +SKIP
    (2, 0)
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any

from ..gen import engine, row_seed
from ..models import LoadedModel
from ..prompts import render_chat
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

__all__ = ["SelfRefineConfig", "make_pairs", "METHOD", "FEEDBACK_PROMPT", "REFINE_PROMPT", "clean_refinement"]

METHOD = "self_refine"

#: The critique prompt (ours; the traits are Self-Refine's dialogue feedback traits).
FEEDBACK_PROMPT = (
    "Here is a request and a response to it.\n\n"
    "Request:\n{instruction}\n\n"
    "Response:\n{response}\n\n"
    "Give short, specific feedback on this response. Say where it falls short on being relevant, informative, "
    "consistent, helpful, safe and fluent, and what should change. Do not rewrite the response."
)

#: The refine prompt (ours): the request, the response and its feedback, asking for the improved response only.
REFINE_PROMPT = (
    "Here is a request, a response to it and feedback on the response.\n\n"
    "Request:\n{instruction}\n\n"
    "Response:\n{response}\n\n"
    "Feedback:\n{feedback}\n\n"
    "Use the feedback to write an improved response to the request. Output only the improved response."
)

_LABEL = re.compile(r"^[\s*_#>]*(?:(?:improved|refined|revised|better|new)\s+)?response\s*[*_]*\s*:[\s*_]*",
                    re.IGNORECASE)


def clean_refinement(text: str) -> str:
    """The refined response without a leading label (``Improved response:``, ``**Response:**``) or whitespace.

    Examples:
        >>> clean_refinement("Improved response: The Nile.")
        'The Nile.'
        >>> clean_refinement("**Response:**\\nThe Nile."), clean_refinement("Responses vary.")
        ('The Nile.', 'Responses vary.')
    """
    t = text.strip()
    m = _LABEL.match(t)
    return t[m.end():].strip() if m else t


@dataclass(frozen=True, kw_only=True)
class SelfRefineConfig(ResponseBudget):
    """Settings of Self-Refine pairs (the samples use the budget's temperature 0.7 and top-p 0.9).

    Attributes:
        n_samples: original samples per instruction (Icon2 B.1: three).
        feedback_tokens: token budget of the critique (greedy).
        refine_do_sample: sample the refinement (default: greedy); its budget is ``max_new_tokens``.

    Examples:
        >>> SelfRefineConfig().n_samples, SelfRefineConfig().temperature
        (3, 0.7)
    """

    n_samples: int = 3
    feedback_tokens: int = 128
    refine_do_sample: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_samples", "feedback_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")


def make_pairs(
    model: LoadedModel,
    instructions: Any,
    config: SelfRefineConfig | None = None,
    *,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
) -> list[dict[str, Any]]:
    """One pair per instruction: a refined sample (chosen) vs an original sample drawn at random (rejected).

    Args:
        model: from `icon2_lens.load_model`.
        instructions: what `icon2_lens.baselines.instruction_rows` reads.
        config: a `SelfRefineConfig`.
        seed: the run's seed (per-batch seeds; the sampled indices come from per-row generators).
        out: a folder (``pairs.jsonl``, ``generation.json``, ``costs.json``); a rerun resumes.
        shard: ``(i, n)`` for data-parallel runs.
        progress: progress bar.
        meter: count costs into this meter (the pipeline's) instead of writing ``costs.json``.

    Returns:
        Rows in TRL's conversational format (see `icon2_lens.baselines.pair_row`) plus ``samples``,
        ``refined_index``, ``rejected_index``, ``feedback``, ``refined_finished`` and ``judge``; an instruction
        without a pair has ``kept`` false and a ``drop_reason``.
    """
    cfg = config or SelfRefineConfig()
    rows = instruction_rows(instructions)
    eng, tok = engine(model), model.tokenizer
    n = cfg.n_samples
    sampling = cfg.decoding(do_sample=True)
    critique = cfg.decoding(do_sample=False, max_new_tokens=cfg.feedback_tokens)
    refining = cfg.decoding(do_sample=cfg.refine_do_sample)

    def make(batch: list[InstructionRow], s: int, phase: Phase) -> list[dict[str, Any]]:
        k = len(batch)
        picks = []
        for j in range(k):
            rng = random.Random(row_seed(s, j))
            picks.append((rng.randrange(n), rng.randrange(n)))  # (refined, rejected)
        with phase(GENERATION):  # sample j of row i is at i * n + j
            samples = eng.generate([render_chat(tok, r.instruction) for r in batch for _ in range(n)], sampling,
                                   seed=s)
        picked = [samples[i * n + picks[i][0]] for i in range(k)]
        with phase(LABELLING):
            feedback = eng.generate([render_chat(tok, FEEDBACK_PROMPT.format(instruction=r.instruction,
                                                                            response=g.text))
                                     for r, g in zip(batch, picked, strict=True)], critique,
                                    seed=row_seed(s, "feedback"))
        with phase(GENERATION):
            refined = eng.generate([render_chat(tok, REFINE_PROMPT.format(instruction=r.instruction, response=g.text,
                                                                         feedback=f.text))
                                    for r, g, f in zip(batch, picked, feedback, strict=True)], refining,
                                   seed=row_seed(s, "refine"))
        out_rows = []
        for i, r in enumerate(batch):
            ref_i, rej_i = picks[i]
            rej, fb, ref = samples[i * n + rej_i], feedback[i].text, refined[i]
            text = clean_refinement(ref.text)
            prov = {"samples": n, "refined_index": ref_i, "rejected_index": rej_i, "feedback": fb,
                    "refined_finished": ref.finished,
                    "judge": {"comparisons": 1, "parsed": int(bool(fb.strip())), "first_position": None}}
            if not text:
                out_rows.append(dropped_row(r, method=METHOD, reason="empty refinement", **prov))
            elif text == rej.text:
                out_rows.append(dropped_row(r, method=METHOD, reason="unchanged", **prov))
            else:
                chosen = {"text": text, "finished": ref.finished, "n_tokens": ref.n_tokens}
                out_rows.append(pair_row(r, chosen, rej, method=METHOD, **prov))
        return out_rows

    return run_method(method=METHOD, model=model, rows=rows, config=cfg, make=make, seed=seed, out=out, shard=shard,
                      progress=progress, meter=meter,
                      settings={"feedback_prompt": FEEDBACK_PROMPT, "refine_prompt": REFINE_PROMPT})
