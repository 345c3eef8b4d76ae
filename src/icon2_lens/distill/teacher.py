"""Mind's Mirror's teacher data: k chain-of-thought rationales per question and m self-evaluations of each.

Liu et al. (NAACL 2024, arXiv 2311.09214) distil from a teacher (1) several distinct rationales per question,
each ending "The answer is X.", and (2) the teacher's own evaluation of each rationale, written as
"Evaluation:\\n\\n<reasoning>\\n\\nEvaluation result: the given answer is correct | wrong | uncertain." (the output
format of the public data, ``../shared/BASELINES.md`` section 3). `make_teacher_data` makes both with any model
`icon2_lens.load_model` opens, on the shared resumable, shardable, seeded batch runner; `rationale_dataset` and
`self_eval_dataset` turn its rows into the paper's two training sets; `teacher_summary` measures the teacher
(accuracy, extraction and parse rates, agreement of its self-evaluation with the gold answers, data yield).

The prompts are ours. The paper's teacher prompts are not published (its data "can be obtained from the OpenAI
API using the Tree of Thoughts method"; only the outputs are in the repository), so `RATIONALE_PROMPT` asks for
step-by-step reasoning ending "The answer is X." with two short worked examples in the user message, and
`EVALUATION_PROMPT` asks, without examples, for the paper's evaluation format (a one-shot example was tried on
SmolLM2-135M: no more parseable labels, and the labels copied the example's verdict). The assistant turn of a
self-evaluation starts with ``config.eval_prefix`` ("Evaluation:", the format's first line; in a small trial on
SmolLM2-135M, 3 of 6 evaluations gave a parseable label with it and 1 of 6 without); the stored evaluation text
is that prefix, a blank line and what the teacher wrote.

Details not in the paper, chosen here:

- Sampling: ``temperature`` 0.7 and ``top_p`` 0.95 for both the rationales and the self-evaluations (the paper's
  ToT sampling settings are not published); no repetition penalty (arithmetic repeats numbers). Every rationale
  and every evaluation has its own seed (``row_seed(batch seed, ...)``), so a row's samples do not depend on how
  the prompts are grouped into forward batches.
- A small teacher that has seen few-shot examples often goes on to write the next "Question: ..." itself; a
  generation is cut at a line that starts with ``Question:`` (the examples' format), and a cut rationale counts
  as finished.
- Every rationale is self-evaluated, also one whose answer could not be extracted, so each row has k x m
  evaluations; `self_eval_dataset` keeps those whose label parses.

Rows (one per question, plus ``index``, ``batch`` and ``seed`` from the runner): ``question``, ``answer`` (gold),
``equation``, ``rationales`` (k texts), ``rationale_answers`` (k normalised numbers or ``None``),
``rationale_correct`` (k bools), ``rationale_finished`` (k bools), ``evaluations`` (k lists of m texts) and
``evaluation_labels`` (k lists of m labels or ``None``).

Costs: rationales are the ``generation`` phase, self-evaluations the ``labelling`` phase.

Examples:
    >>> rows = make_teacher_data(model, make_problems(8), TeacherConfig(k=3, m=2))  # doctest: +SKIP
    >>> teacher_summary(rows)["rationale_accuracy"]["rate"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..gen import Decoding, engine, row_seed
from ..models import LoadedModel
from ..prompts import render_chat
from ..reward_probe import wilson_interval
from ..runs import names
from ..runs.batches import BatchJob, run_batches
from ..runs.costs import CostMeter, measure_costs
from ..runs.shards import check_shard
from .extract import (
    LABELS,
    answers_match,
    evaluation_rationale,
    extract_answer,
    extract_label,
    extract_rationale,
)
from .problems import Problem, load_problems

if TYPE_CHECKING:
    import datasets

__all__ = ["TeacherConfig", "make_teacher_data", "rationale_dataset", "self_eval_dataset", "teacher_summary",
           "rationale_prompt", "evaluation_prompt", "RATIONALE_PROMPT", "EVALUATION_PROMPT", "STAGE",
           "TEACHER_SETTINGS", "TEACHER_DATA", "TEACHER_FILES", "GENERATION", "LABELLING"]

#: The stage name (in ``shard.json`` and ``costs.json``).
STAGE = "distill_teacher"
#: The settings file of a teacher run folder (a rerun with the same settings resumes).
TEACHER_SETTINGS = "teacher.json"
#: The rows file of a teacher run folder (append-only, batch by batch).
TEACHER_DATA = "teacher.jsonl"
#: The files of a teacher run folder.
TEACHER_FILES = names.StageFiles(TEACHER_SETTINGS, TEACHER_DATA, (TEACHER_DATA, TEACHER_SETTINGS, names.COSTS),
                                 (TEACHER_DATA, TEACHER_SETTINGS, names.SHARD))
#: The cost phases (the Icon2 paper's Table 4 split, as the pair-making methods use it).
GENERATION = "generation"
LABELLING = "labelling"

#: The rationale request (ours: the paper's teacher prompts are unpublished). ``{question}`` is filled in.
RATIONALE_PROMPT = """\
Solve the math word problem. Think step by step, then finish with the sentence "The answer is X." where X is \
the final number.

Question: A farmer has 4 pens with 6 sheep in each pen. How many sheep does the farmer have?
Answer: There are 4 pens and each pen has 6 sheep. So the farmer has 4 * 6 = 24 sheep. The answer is 24.

Question: Rosa had 15 stamps. She used 7 stamps and then bought 4 more. How many stamps does she have now?
Answer: Rosa started with 15 stamps and used 7, so she had 15 - 7 = 8 left. Then she bought 4 more, so she has \
8 + 4 = 12 stamps. The answer is 12.

Question: {question}
Answer:"""

#: The self-evaluation request (ours), asking for the paper's output format. ``{question}`` and ``{rationale}``.
EVALUATION_PROMPT = """\
Check the given answer to the math word problem. Think about whether each step and the final number are right, \
then give your verdict. Reply in this format:

Evaluation:

<your reasoning>

Evaluation result: the given answer is correct.

The last line is one of "Evaluation result: the given answer is correct.", "Evaluation result: the given answer \
is wrong." or "Evaluation result: the given answer is uncertain."

Question: {question}
Given answer: {rationale}"""

_NEXT_QUESTION = "\nQuestion:"


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """Settings of the teacher data (defaults: the paper's 5 rationales and 5 self-evaluations of each).

    Attributes:
        k: rationales per question (the paper: 5).
        m: self-evaluations per rationale (the paper: 5).
        temperature: sampling temperature of the rationales.
        top_p: nucleus mass of the rationales and the self-evaluations.
        max_new_tokens: token budget per rationale.
        eval_tokens: token budget per self-evaluation.
        eval_temperature: sampling temperature of the self-evaluations.
        eval_prefix: the start of the teacher's self-evaluation turn, written for it ("": none); the stored
            evaluation begins with it.
        batch_size: questions per batch (a batch generates ``batch_size * k`` rationales at once, and its
            self-evaluations in groups of that many).

    Examples:
        >>> TeacherConfig().k, TeacherConfig().m, TeacherConfig(k=2).max_new_tokens
        (5, 5, 192)
    """

    k: int = 5
    m: int = 5
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 192
    eval_tokens: int = 96
    eval_temperature: float = 0.7
    eval_prefix: str = "Evaluation:"
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("k", "m", "max_new_tokens", "eval_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not isinstance(self.eval_prefix, str):
            raise ValueError(f"eval_prefix must be a string, got {self.eval_prefix!r}.")
        self.rationale_decoding()  # validates temperature and top_p
        self.evaluation_decoding()

    def rationale_decoding(self) -> Decoding:
        """The sampling of the rationales."""
        return Decoding(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                        top_p=self.top_p)

    def evaluation_decoding(self) -> Decoding:
        """The sampling of the self-evaluations."""
        return Decoding(max_new_tokens=self.eval_tokens, do_sample=True, temperature=self.eval_temperature,
                        top_p=self.top_p)


def rationale_prompt(tokenizer: Any, question: str) -> str:
    """The rendered chat prompt that asks the teacher for one rationale.

    Examples:
        >>> rationale_prompt(tok, "What is 2 + 3?").endswith("<|im_start|>assistant\\n")  # doctest: +SKIP
        True
    """
    return render_chat(tokenizer, RATIONALE_PROMPT.format(question=question))


def evaluation_prompt(tokenizer: Any, question: str, rationale: str, *, prefix: str = "Evaluation:") -> str:
    """The rendered chat prompt that asks the teacher to evaluate ``rationale``; the turn starts with ``prefix``.

    Examples:
        >>> text = evaluation_prompt(tok, "What is 2 + 3?", "2 + 3 = 5. The answer is 5.")  # doctest: +SKIP
        >>> text.endswith("<|im_start|>assistant\\nEvaluation:")  # doctest: +SKIP
        True
    """
    user = EVALUATION_PROMPT.format(question=question, rationale=rationale.strip() or "(no answer)")
    return render_chat(tokenizer, user, assistant=prefix) if prefix else render_chat(tokenizer, user)


def _cut(text: str) -> tuple[str, bool]:
    """The text before a self-written next question, and whether it was cut."""
    at = text.find(_NEXT_QUESTION)
    if at < 0 and text.startswith(_NEXT_QUESTION.lstrip()):
        at = 0
    return (text[:at].strip(), True) if at >= 0 else (text, False)


def _problems(problems: Any) -> list[Problem]:
    if isinstance(problems, Sequence) and not isinstance(problems, str) and problems and all(
            isinstance(p, Problem) for p in problems):
        return list(problems)
    return load_problems(problems)


@contextmanager
def _metered(model: LoadedModel, meter: CostMeter | None,
             out: str | os.PathLike[str] | None) -> Iterator[CostMeter | None]:
    if meter is not None:  # the caller's meter (a pipeline's): it writes costs.json itself
        meter.watch_model(model)
        yield meter
    elif out is not None:
        with measure_costs(STAGE, model) as own:
            yield own
        if own.costs.rows or not (Path(out) / names.COSTS).is_file():  # a rerun that made nothing keeps the figures
            own.costs.save(Path(out))
    else:
        yield None


def make_teacher_data(
    model: LoadedModel,
    problems: Any,
    config: TeacherConfig | None = None,
    *,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
) -> list[dict[str, Any]]:
    """Per question, ``k`` sampled rationales with their answers, and ``m`` self-evaluations of each.

    Args:
        model: the teacher, from `icon2_lens.load_model` (any model with a chat template).
        problems: a list of `icon2_lens.distill.problems.Problem`, or what
            `icon2_lens.distill.problems.load_problems` reads (``"arithmetic"``, a JSONL file, rows).
        config: a `TeacherConfig`.
        seed: the run's seed; batch ``b`` gets ``row_seed(seed, b)``, each sample a seed derived from that.
        out: a folder: ``teacher.json`` (settings) and ``teacher.jsonl`` (rows, appended batch by batch; a rerun
            with the same settings resumes), and ``costs.json`` when finished.
        shard: ``(i, n)``: only the batches ``b % n == i`` (merge the shards' rows by ``index``).
        progress: progress bar.
        meter: count costs into this meter (e.g. a pipeline's) instead of writing ``costs.json``.

    Returns:
        One row per question, in index order (see the module docstring for the fields).
    """
    cfg = config or TeacherConfig()
    rows = _problems(problems)
    shard = check_shard(shard)
    eng, tok = engine(model), model.tokenizer
    k, m = cfg.k, cfg.m
    digest = hashlib.sha256(json.dumps([[p.question, p.answer] for p in rows]).encode()).hexdigest()
    prompts_digest = hashlib.sha256((RATIONALE_PROMPT + "\0" + EVALUATION_PROMPT).encode()).hexdigest()
    settings = {"stage": STAGE, **asdict(cfg), "seed": seed, "model": model.info.model_id,
                "fingerprint": model.info.fingerprint, "problems_sha256": digest, "prompts_sha256": prompts_digest}
    chunk = cfg.batch_size * k

    def check(row: dict[str, Any], index: int) -> None:
        if row.get("question") != rows[index].question:
            raise ValueError(f"{out} holds teacher data of other questions (row {index} differs); choose another "
                             "folder.")

    made: list[dict[str, Any]] = []
    with _metered(model, meter, out) as mtr:
        def phase(name: str) -> AbstractContextManager[Any]:
            return mtr.phase(name) if mtr is not None else nullcontext()

        def make(b: int, covers: range, s: int) -> list[dict[str, Any]]:
            batch = [rows[i] for i in covers]
            prompts = [rationale_prompt(tok, p.question) for p in batch for _ in range(k)]
            seeds = [row_seed(s, "rationale", i, j) for i in range(len(batch)) for j in range(k)]
            with phase(GENERATION):
                gen = eng.generate(prompts, cfg.rationale_decoding(), seed=seeds)
            cut = [_cut(g.text) for g in gen]
            texts = [t for t, _ in cut]
            finished = [g.finished or was_cut for g, (_, was_cut) in zip(gen, cut, strict=True)]
            eval_prompts = [evaluation_prompt(tok, batch[n // k].question, texts[n], prefix=cfg.eval_prefix)
                            for n in range(len(texts)) for _ in range(m)]
            eval_seeds = [row_seed(s, "evaluation", n // k, n % k, e) for n in range(len(texts)) for e in range(m)]
            evals: list[str] = []
            with phase(LABELLING):
                for start in range(0, len(eval_prompts), chunk):
                    part = eng.generate(eval_prompts[start:start + chunk], cfg.evaluation_decoding(),
                                        seed=eval_seeds[start:start + chunk])
                    evals += [_evaluation_text(cfg.eval_prefix, _cut(g.text)[0]) for g in part]
            new = []
            for i, p in enumerate(batch):
                mine = texts[i * k:(i + 1) * k]
                answers = [extract_answer(t) for t in mine]
                ev = [evals[(i * k + j) * m:(i * k + j + 1) * m] for j in range(k)]
                new.append({"question": p.question, "answer": p.answer, "equation": p.equation,
                            "rationales": mine, "rationale_answers": answers,
                            "rationale_correct": [answers_match(a, p.answer) for a in answers],
                            "rationale_finished": finished[i * k:(i + 1) * k],
                            "evaluations": ev, "evaluation_labels": [[extract_label(t) for t in e] for e in ev]})
            made.extend(new)
            return new

        job = BatchJob(stage=STAGE, n_rows=len(rows), batch_size=cfg.batch_size, seed=seed, make=make, check=check,
                       desc="teacher data", unit="question", shard_settings={"problems_sha256": digest},
                       files=TEACHER_FILES)
        done = run_batches(job, out=out, settings=settings, shard=shard, progress=progress)
        if mtr is not None:
            mtr.costs.rows = len(made)
    return done


def _evaluation_text(prefix: str, text: str) -> str:
    if not prefix:
        return text
    return f"{prefix}\n\n{text}" if text else prefix


def _dataset(records: list[dict[str, Any]], columns: Sequence[str]) -> datasets.Dataset:
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in records] for c in columns})


_RATIONALE_COLUMNS = ("question", "rationale", "answer", "gold", "correct", "source_index", "rationale_index")
_SELF_EVAL_COLUMNS = ("question", "rationale", "label", "evaluation", "rationale_correct", "source_index",
                      "rationale_index", "evaluation_index")


def _index(row: Mapping[str, Any], position: int) -> int:
    return int(row.get("index", position))


def rationale_dataset(rows: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """The rationale training set (question -> rationale + answer): one row per rationale whose answer was read.

    Returns:
        A ``datasets.Dataset`` with ``question``, ``rationale`` (`icon2_lens.distill.extract.extract_rationale`
        of the teacher's text: before "The answer is", up to its last period), ``answer`` (the rationale's own
        answer), ``gold``, ``correct`` (the two match), ``source_index`` (the teacher row's ``index``) and
        ``rationale_index``. Wrong rationales are kept (``correct`` false): the caller chooses.

    Examples:
        >>> row = {"question": "Q", "answer": "5", "rationales": ["2 + 3 = 5. The answer is 5.", "no idea"],
        ...        "rationale_answers": ["5", None], "rationale_correct": [True, False]}
        >>> list(rationale_dataset([row])["rationale"])
        ['2 + 3 = 5.']
    """
    records = []
    for pos, row in enumerate(rows):
        for j, (text, answer) in enumerate(zip(row["rationales"], row["rationale_answers"], strict=True)):
            if answer is None:
                continue
            records.append({"question": row["question"], "rationale": extract_rationale(text), "answer": answer,
                            "gold": row["answer"], "correct": bool(row["rationale_correct"][j]),
                            "source_index": _index(row, pos), "rationale_index": j})
    return _dataset(records, _RATIONALE_COLUMNS)


def self_eval_dataset(rows: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """The self-evaluation training set (question + rationale -> label + evaluation): one row per parsed label.

    Returns:
        A ``datasets.Dataset`` with ``question``, ``rationale`` (the whole rationale the teacher evaluated),
        ``label`` (correct, wrong or uncertain), ``evaluation`` (`icon2_lens.distill.extract.evaluation_rationale`:
        the evaluation without its result line), ``rationale_correct`` (the rationale's answer matches the gold
        one), ``source_index``, ``rationale_index`` and ``evaluation_index``.

    Examples:
        >>> ev = "Evaluation:\\n\\nFine.\\n\\nEvaluation result: the given answer is correct."
        >>> row = {"question": "Q", "answer": "5", "rationales": ["The answer is 5."], "rationale_correct": [True],
        ...        "evaluations": [[ev, "?"]],
        ...        "evaluation_labels": [["correct", None]]}
        >>> list(self_eval_dataset([row])["evaluation"])
        ['Evaluation:\\n\\nFine.']
    """
    records = []
    for pos, row in enumerate(rows):
        for j, text in enumerate(row["rationales"]):
            for e, (ev, label) in enumerate(zip(row["evaluations"][j], row["evaluation_labels"][j], strict=True)):
                if label is None:
                    continue
                records.append({"question": row["question"], "rationale": text, "label": label,
                                "evaluation": evaluation_rationale(ev),
                                "rationale_correct": bool(row["rationale_correct"][j]),
                                "source_index": _index(row, pos), "rationale_index": j, "evaluation_index": e})
    return _dataset(records, _SELF_EVAL_COLUMNS)


def _share(successes: int, n: int, level: float) -> dict[str, Any]:
    if n == 0:
        return {"rate": None, "successes": 0, "n": 0, "ci_low": None, "ci_high": None}
    lo, hi = wilson_interval(successes, n, level=level)
    return {"rate": successes / n, "successes": successes, "n": n, "ci_low": lo, "ci_high": hi}


def _agrees(label: str | None, correct: bool) -> bool:
    return (label == "correct" and correct) or (label == "wrong" and not correct)


def _majority(items: Sequence[Any]) -> Any:
    """The most common item (the first seen of equals), ``None`` for none."""
    counts = Counter(x for x in items if x is not None)
    return counts.most_common(1)[0][0] if counts else None


def teacher_summary(rows: Sequence[Mapping[str, Any]], *, level: float = 0.9) -> dict[str, Any]:
    """How good the teacher and its self-evaluation are, and how much data they gave.

    Every share comes as ``{"rate", "successes", "n", "ci_low", "ci_high"}`` (a Wilson interval of coverage
    ``level``; ``rate`` and the bounds are ``None`` when ``n`` is 0).

    Returns:
        ``n_questions``, ``k``, ``m``, ``level``;
        ``rationale_accuracy`` (rationales whose answer matches the gold one, of all rationales),
        ``majority_vote_accuracy`` (questions whose most common extracted answer, the first seen of equals, is
        right; a question without any extracted answer counts as wrong), ``any_correct`` (questions with at least
        one right rationale);
        ``answer_extraction_rate`` and ``finished_rate`` (of all rationales), ``label_parse_rate`` (of all
        self-evaluations);
        ``self_eval_agreement`` (of the parsed labels, those that agree with gold: "correct" on a right rationale
        or "wrong" on a wrong one; "uncertain" disagrees), ``self_eval_agreement_all`` (the same over all
        evaluations, an unparsed one counting as disagreement), ``rationale_vote_agreement`` (per rationale with
        a parsed label, its most common label agrees with gold);
        ``label_distribution`` (counts of correct, wrong, uncertain and unparsed) and ``labels_by_gold``
        (the same counts on right and on wrong rationales);
        ``yield`` (``rationale_rows``, ``correct_rationale_rows`` and ``self_eval_rows`` as
        `rationale_dataset` and `self_eval_dataset` make them, each also per question).

    Examples:
        >>> row = {"question": "Q", "answer": "5", "rationales": ["The answer is 5.", "The answer is 4."],
        ...        "rationale_answers": ["5", "4"], "rationale_correct": [True, False],
        ...        "rationale_finished": [True, True], "evaluations": [["a"], ["b"]],
        ...        "evaluation_labels": [["correct"], ["correct"]]}
        >>> s = teacher_summary([row])
        >>> s["rationale_accuracy"]["rate"], s["self_eval_agreement"]["rate"]
        (0.5, 0.5)
    """
    rows = list(rows)
    n_q = len(rows)
    n_rat = n_right = n_extracted = n_finished = 0
    n_vote = n_any = 0
    n_eval = n_parsed = n_agree = 0
    n_rat_voted = n_rat_vote_agree = 0
    dist = dict.fromkeys((*LABELS, "unparsed"), 0)
    by_gold = {"correct_rationales": dict(dist), "wrong_rationales": dict(dist)}
    k = m = 0
    for row in rows:
        answers, right = row["rationale_answers"], [bool(c) for c in row["rationale_correct"]]
        k = max(k, len(answers))
        n_rat += len(answers)
        n_right += sum(right)
        n_extracted += sum(a is not None for a in answers)
        n_finished += sum(bool(f) for f in row.get("rationale_finished", [True] * len(answers)))
        n_any += any(right)
        vote = _majority(answers)
        n_vote += answers_match(vote, row["answer"])
        for j, labels in enumerate(row["evaluation_labels"]):
            m = max(m, len(labels))
            side = by_gold["correct_rationales" if right[j] else "wrong_rationales"]
            for label in labels:
                key = label if label is not None else "unparsed"
                dist[key] += 1
                side[key] += 1
                n_eval += 1
                n_parsed += label is not None
                n_agree += _agrees(label, right[j])
            voted = _majority(labels)
            if voted is not None:
                n_rat_voted += 1
                n_rat_vote_agree += _agrees(voted, right[j])
    n_self_rows = n_parsed

    def per(x: int) -> float | None:
        return x / n_q if n_q else None

    return {
        "n_questions": n_q, "k": k, "m": m, "level": level,
        "rationale_accuracy": _share(n_right, n_rat, level),
        "majority_vote_accuracy": _share(n_vote, n_q, level),
        "any_correct": _share(n_any, n_q, level),
        "answer_extraction_rate": _share(n_extracted, n_rat, level),
        "finished_rate": _share(n_finished, n_rat, level),
        "label_parse_rate": _share(n_parsed, n_eval, level),
        "self_eval_agreement": _share(n_agree, n_parsed, level),
        "self_eval_agreement_all": _share(n_agree, n_eval, level),
        "rationale_vote_agreement": _share(n_rat_vote_agree, n_rat_voted, level),
        "label_distribution": dist,
        "labels_by_gold": by_gold,
        "yield": {"rationale_rows": n_extracted, "correct_rationale_rows": n_right, "self_eval_rows": n_self_rows,
                  "rationale_rows_per_question": per(n_extracted),
                  "correct_rationale_rows_per_question": per(n_right),
                  "self_eval_rows_per_question": per(n_self_rows)},
    }
