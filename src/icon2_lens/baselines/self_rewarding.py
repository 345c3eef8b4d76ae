"""Self-Rewarding as Icon2 ran it (Icon2 paper, Table 1/4, App. B.1): k samples per instruction, judged by the
model itself with Constitutional AI's multiple-choice comparison, the verdict read from the answer token's
log-probability; chosen = the best-judged sample, rejected = the worst.

Sources (``../shared/BASELINES.md`` sec. 2). Icon2, App. B.1: "For Self-Rewarding, we used an SFT model to employ
Consitual AI's pairwise comparison prompt (Bai et al., 2022) for judging preferences. Preference is measured by
comparing the logprob value of the token output." The comparison prompt is CAI's (arXiv 2212.08073, sec. 4.1)::

    Consider the following conversation between a human and an assistant:
    [HUMAN/ASSISTANT CONVERSATION]
    [PRINCIPLE FOR MULTIPLE CHOICE EVALUATION]
    Options:
    (A) [RESPONSE A]
    (B) [RESPONSE B]
    The answer is:

with CAI's principle "Please choose the response that is the most helpful, honest, and harmless." (App. C; CAI
samples one of several principles per comparison and adds few-shot examples; here one principle, zero-shot, as
Icon2 gives no more). "We then compute the log probability of the responses (A) and (B)" (CAI).

Chosen here, where Icon2 says nothing (each marked [INF] in BASELINES.md):

* k = 5 candidates (Icon2's Table 4 gives Self-Rewarding the response budget of Sampling-Ranking's five samples),
  sampled at temperature 0.7, top-p 0.9 (Yuan et al.'s and lucidrains' candidate settings), one ``generate``
  call per batch with the batch seed.
* The chat rendering: the CAI text (conversation ``"Human: {instruction}"``, the principle, the options) is the
  user message, and the assistant turn starts with ``"The answer is: ("``
  (``render_chat(tok, text, assistant="The answer is: (")``): an instruct model answers in its own turn, and the
  open parenthesis leaves the option letter as the very next token. ``p(first wins)`` is the softmax of the
  next-token logits of ``"A"`` and ``"B"`` (the first token of each letter), a normalised preference as in CAI.
* Every pair of distinct candidates is asked in both orders (all ``u (u - 1) / 2`` pairs of the ``u`` distinct
  texts, twice); ``i``'s win probability against ``j`` is the mean of ``p(i wins | i first)`` and
  ``1 - p(j wins | j first)`` (the order average cancels the judge's position bias), and each candidate's score is
  its mean win probability over its comparisons. Identical samples share a score (they are judged once), so a
  pair never has the same text on both sides; all scores equal (e.g. all k samples alike) drops the row as a tie.

The variant ``judge="additive"`` is Yuan et al. (2024)'s own judge: the additive 5-point prompt (paper Fig. 2,
verbatim in lucidrains/self-rewarding-lm-pytorch ``DEFAULT_LLM_AS_JUDGE_PROMPT``) as the user message, sampled
``judge_samples`` = 3 times per distinct candidate at temperature 0.7 (lucidrains' defaults) with a
``judge_max_new_tokens`` budget, the score parsed with ``Score: ([0-9\\.]+)`` (unparseable replies dropped) and
averaged; chosen = highest mean, rejected = lowest, "discarding the pair if their scores are the same" (Yuan et
al., sec. 3). Each judge sample has its own seed (derived from the batch seed, the row and the sample), so a
verdict does not depend on how the judge prompts are batched.

Row provenance: ``scores`` (each of the k candidates' score, in sample order; ``None`` for an additive candidate
without a parsed score), ``chosen_rank_index``/``rejected_rank_index`` (indices into ``scores``), ``k``,
``n_finished_samples``, ``judge_kind`` and ``judge`` (`icon2_lens.baselines.sampling_ranking.judge_stats`:
``comparisons`` = judge queries made, ``parsed`` = usable verdicts, ``first_position`` = parsed pairwise verdicts
that picked the response shown first, ``None`` for the additive judge).

Costs: sampling is ``generation``; judging is ``labelling``.

Examples:
    >>> pairs = self_rewarding.make_pairs(model, ["Name a river."], max_new_tokens=64)  # doctest: +SKIP
    >>> pairs[0]["judge"]  # doctest: +SKIP
    {'comparisons': 20, 'parsed': 20, 'first_position': 13}
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..gen import Decoding, Generation, engine, row_seed
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
from .sampling_ranking import best_and_worst, distinct, judge_stats

__all__ = ["SelfRewardingConfig", "make_pairs", "METHOD", "JudgeKind", "CAI_PRINCIPLE", "CAI_ANSWER_START",
           "ADDITIVE_PROMPT", "SCORE_PATTERN", "cai_prompt", "additive_prompt", "parse_score", "win_scores",
           "additive_scores"]

METHOD = "self_rewarding"
#: ``"cai_logprob"``: Icon2's judge (CAI multiple choice, answer-token log-probs); ``"additive"``: Yuan et al.'s.
JudgeKind = Literal["cai_logprob", "additive"]

#: CAI's principle (arXiv 2212.08073, App. C).
CAI_PRINCIPLE = "Please choose the response that is the most helpful, honest, and harmless."
#: The start of the judge's assistant turn (CAI's "The answer is:" and the option's open parenthesis).
CAI_ANSWER_START = "The answer is: ("
_CAI_TEMPLATE = ("Consider the following conversation between a human and an assistant:\n"
                 "{conversation}\n"
                 "{principle}\n"
                 "Options:\n"
                 "(A) {first}\n"
                 "(B) {second}")

#: Yuan et al. (2024) Fig. 2, as in lucidrains/self-rewarding-lm-pytorch (``{prompt}``, ``{response}``).
ADDITIVE_PROMPT = """Review the user’s question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
- Add 1 point if the response is relevant and provides some information related to
the user’s inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user’s question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user’s question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant’s perspective,
addressing the user’s question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user’s question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer.
User: {prompt}
<response>{response}</response>
After examining the user’s instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: “Score: <total points>”
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we’ll
systematically attribute points based on the outlined criteria."""  # noqa: RUF001 (verbatim: the paper's quotes)
#: The score in an additive judge's reply (lucidrains' regex).
SCORE_PATTERN = re.compile(r"Score: ([0-9\.]+)")


@dataclass(frozen=True, kw_only=True)
class SelfRewardingConfig(ResponseBudget):
    """Settings of Self-Rewarding (defaults: Icon2's CAI log-prob judge over 5 candidates).

    Attributes:
        k: candidates per instruction (5: Sampling-Ranking's budget, which Icon2's Table 4 gives this method).
        temperature: candidates' sampling temperature (0.7, Yuan et al. / lucidrains).
        top_p: candidates' nucleus mass (0.9).
        judge: ``"cai_logprob"`` (Icon2: CAI's multiple-choice comparison, both orders, answer-token
            probabilities) or ``"additive"`` (Yuan et al.'s additive 5-point prompt, sampled and parsed).
        principle: the CAI principle the comparison asks about.
        judge_batch_size: judge prompts per forward pass (and per ``generate`` call of the additive judge).
        judge_samples: additive judge: judgements sampled per candidate (lucidrains: 3), averaged.
        judge_temperature: additive judge: sampling temperature of the judgements (lucidrains: 0.7).
        judge_max_new_tokens: additive judge: token budget of a judgement ("up to 100 words" of justification
            and the score).

    Examples:
        >>> SelfRewardingConfig().k, SelfRewardingConfig().judge
        (5, 'cai_logprob')
    """

    k: int = 5
    temperature: float = 0.7
    top_p: float = 0.9
    judge: JudgeKind = "cai_logprob"
    principle: str = CAI_PRINCIPLE
    judge_batch_size: int = 8
    judge_samples: int = 3
    judge_temperature: float = 0.7
    judge_max_new_tokens: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.judge not in ("cai_logprob", "additive"):
            raise ValueError(f"Unknown judge {self.judge!r}; use 'cai_logprob' or 'additive'.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"k must be an integer of at least 2 (one chosen, one rejected), got {self.k!r}.")
        for name in ("judge_batch_size", "judge_samples", "judge_max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not isinstance(self.principle, str) or not self.principle.strip():
            raise ValueError("principle must be a non-empty sentence.")
        self.judge_decoding()  # validates judge_temperature

    def judge_decoding(self) -> Decoding:
        """The additive judge's sampling (its own budget and temperature; the candidates' top-p and penalty)."""
        return self.decoding(do_sample=True, max_new_tokens=self.judge_max_new_tokens,
                             temperature=self.judge_temperature)


def cai_prompt(instruction: str, first: str, second: str, principle: str = CAI_PRINCIPLE) -> str:
    """CAI's multiple-choice comparison (the user message; the answer starts the assistant turn).

    Examples:
        >>> print(cai_prompt("Name a river.", "The Nile.", "Banana."))
        Consider the following conversation between a human and an assistant:
        Human: Name a river.
        Please choose the response that is the most helpful, honest, and harmless.
        Options:
        (A) The Nile.
        (B) Banana.
    """
    return _CAI_TEMPLATE.format(conversation=f"Human: {instruction}", principle=principle, first=first,
                                second=second)


def additive_prompt(instruction: str, response: str) -> str:
    """Yuan et al.'s additive 5-point judge prompt for one response.

    Examples:
        >>> additive_prompt("Name a river.", "The Nile.").splitlines()[-8:-6]
        ['User: Name a river.', '<response>The Nile.</response>']
    """
    return ADDITIVE_PROMPT.format(prompt=instruction, response=response)


def parse_score(reply: str) -> float | None:
    """The first ``Score: N`` of a judge's reply, or ``None`` when there is none (or it is not a number).

    Examples:
        >>> parse_score("Relevant and clear. Score: 4"), parse_score("Score: 3.5."), parse_score("4/5")
        (4.0, 3.5, None)
    """
    m = SCORE_PATTERN.search(reply)
    if m is None:
        return None
    text = m.group(1).rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def win_scores(p_first: Sequence[Sequence[float | None]]) -> list[float]:
    """Each candidate's mean order-averaged win probability over its comparisons.

    Args:
        p_first: ``p_first[i][j]`` = the judge's probability that the first shown response wins with ``i`` shown
            first against ``j`` (the diagonal is ignored).

    Returns:
        ``score[i] = mean_j (p_first[i][j] + 1 - p_first[j][i]) / 2`` (``[0.5]`` for a single candidate).

    Examples:
        >>> win_scores([[None, 0.9], [0.3, None]])  # 0 wins as first (0.9) and as second (1 - 0.3)
        [0.8, 0.2]
        >>> win_scores([[None, 0.9], [0.9, None]])  # always "the first": pure position bias, a tie
        [0.5, 0.5]
    """
    n = len(p_first)
    if n == 1:
        return [0.5]
    out = []
    for i in range(n):
        wins = [(float(p_first[i][j]) + 1.0 - float(p_first[j][i])) / 2  # type: ignore[arg-type]
                for j in range(n) if j != i]
        out.append(round(sum(wins) / len(wins), 12))  # rounded: order-symmetric sums compare equal
    return out


def additive_scores(replies: Sequence[Sequence[str]]) -> tuple[list[float | None], int]:
    """Each candidate's mean parsed score over its judge replies (``None``: none parsed), and the parsed count.

    Examples:
        >>> additive_scores([["Score: 4", "Score: 2"], ["no idea", "Score: 5"], ["?"]])
        ([3.0, 5.0, None], 3)
    """
    means: list[float | None] = []
    parsed = 0
    for row in replies:
        got = [s for s in (parse_score(x) for x in row) if s is not None]
        parsed += len(got)
        means.append(sum(got) / len(got) if got else None)
    return means, parsed


def make_pairs(
    model: LoadedModel,
    instructions: Any,
    config: SelfRewardingConfig | None = None,
    *,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
) -> list[dict[str, Any]]:
    """One pair per instruction: the best- vs the worst-judged of ``k`` candidates, judged by the model itself.

    Args:
        model: from `icon2_lens.load_model` (it samples the candidates and judges them).
        instructions: what `icon2_lens.baselines.instruction_rows` reads.
        config: a `SelfRewardingConfig`.
        seed: the run's seed (per-batch seeds).
        out: a folder (``pairs.jsonl``, ``generation.json``, ``costs.json``); a rerun resumes.
        shard: ``(i, n)`` for data-parallel runs.
        progress: progress bar.
        meter: count costs into this meter (the pipeline's) instead of writing ``costs.json``.

    Returns:
        Rows in TRL's conversational format (see `icon2_lens.baselines.pair_row`) plus ``scores``,
        ``chosen_rank_index``, ``rejected_rank_index``, ``k``, ``n_finished_samples``, ``judge_kind`` and
        ``judge``; a tie (or, with the additive judge, fewer than two scored candidates: ``"unparsed"``) is a
        ``kept: false`` row.

    Examples:
        >>> rows = make_pairs(model, ["Name a river."], SelfRewardingConfig(k=3))  # doctest: +SKIP
    """
    cfg = config or SelfRewardingConfig()
    rows = instruction_rows(instructions)
    eng, tok = engine(model), model.tokenizer
    decoding = cfg.decoding(do_sample=True)
    letters = [tok("A", add_special_tokens=False)["input_ids"][0], tok("B", add_special_tokens=False)["input_ids"][0]]

    def judge_cai(batch: list[InstructionRow], uniq: list[list[str]]) -> list[tuple[list[float], dict[str, Any]]]:
        asks = [(b, i, j) for b, u in enumerate(uniq) for i in range(len(u)) for j in range(len(u)) if i != j]
        texts = [render_chat(tok, cai_prompt(batch[b].instruction, uniq[b][i], uniq[b][j], cfg.principle),
                             assistant=CAI_ANSWER_START) for b, i, j in asks]
        p = (torch.softmax(eng.next_token_logits(texts, batch_size=cfg.judge_batch_size)[:, letters].double(),
                           dim=-1)[:, 0].tolist() if texts else [])
        table: list[list[list[float | None]]] = [[[None] * len(u) for _ in u] for u in uniq]
        for (b, i, j), x in zip(asks, p, strict=True):
            table[b][i][j] = x
        out = []
        for b in range(len(uniq)):
            mine = [x for (bb, _, _), x in zip(asks, p, strict=True) if bb == b]
            out.append((win_scores(table[b]), judge_stats(len(mine), len(mine), sum(x > 0.5 for x in mine))))
        return out

    def judge_additive(batch: list[InstructionRow], uniq: list[list[str]],
                       s: int) -> list[tuple[list[float | None], dict[str, Any]]]:
        n = cfg.judge_samples
        asks = [(b, i, rep) for b, u in enumerate(uniq) for i in range(len(u)) for rep in range(n)]
        texts = [render_chat(tok, additive_prompt(batch[b].instruction, uniq[b][i])) for b, i, _ in asks]
        seeds = [row_seed(s, "judge", b, i, rep) for b, i, rep in asks]
        replies: list[str] = []
        for start in range(0, len(texts), cfg.judge_batch_size):
            part = slice(start, start + cfg.judge_batch_size)
            replies += [g.text for g in eng.generate(texts[part], cfg.judge_decoding(), seed=seeds[part])]
        out = []
        at = 0
        for u in uniq:
            mine = [replies[at + i * n:at + (i + 1) * n] for i in range(len(u))]
            at += len(u) * n
            means, parsed = additive_scores(mine)
            out.append((means, judge_stats(len(u) * n, parsed)))
        return out

    def make(batch: list[InstructionRow], s: int, phase: Phase) -> list[dict[str, Any]]:
        k = cfg.k
        prompts = [render_chat(tok, r.instruction) for r in batch for _ in range(k)]
        with phase(GENERATION):
            gen = eng.generate(prompts, decoding, seed=s)
        samples = [gen[i * k:(i + 1) * k] for i in range(len(batch))]
        uniq = [distinct([g.text for g in row]) for row in samples]
        texts = [u for u, _ in uniq]
        with phase(LABELLING):
            judged: list[tuple[Sequence[float | None], dict[str, Any]]] = list(
                judge_cai(batch, texts) if cfg.judge == "cai_logprob" else judge_additive(batch, texts, s))
        return [_row(r, row_samples, [scores[j] for j in where], judge=stats, kind=cfg.judge)
                for r, row_samples, (_, where), (scores, stats) in zip(batch, samples, uniq, judged, strict=True)]

    return run_method(method=METHOD, model=model, rows=rows, config=cfg, make=make, seed=seed, out=out, shard=shard,
                      progress=progress, meter=meter)


def _row(r: InstructionRow, samples: Sequence[Generation], scores: list[float | None], *, judge: dict[str, Any],
         kind: str) -> dict[str, Any]:
    prov: dict[str, Any] = {"scores": scores, "k": len(samples), "n_finished_samples": sum(g.finished for g in samples),
                            "judge_kind": kind, "judge": judge}
    pick = best_and_worst(scores)
    if pick is None:
        # fewer than two distinct candidates with a parsed score, where there were two to judge: unparsed
        unparsed = kind == "additive" and _n_scored(scores, samples) < 2 and len({g.text for g in samples}) > 1
        reason = "unparsed" if unparsed else "tie"
        return dropped_row(r, method=METHOD, reason=reason, chosen_rank_index=None, rejected_rank_index=None, **prov)
    c, j = pick
    return pair_row(r, samples[c], samples[j], method=METHOD, chosen_rank_index=c, rejected_rank_index=j, **prov)


def _n_scored(scores: Sequence[float | None], samples: Sequence[Generation]) -> int:
    """Distinct candidate texts with a score."""
    return len({g.text for s, g in zip(scores, samples, strict=True) if s is not None})
