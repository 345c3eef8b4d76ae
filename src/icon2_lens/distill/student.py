"""The Mind's Mirror student: the two-task loss on TRL, the two-stage schedule, and its evaluation.

Mind's Mirror (Liu et al., NAACL 2024, arXiv 2311.09214; ``../shared/BASELINES.md`` section 3) trains a T5
student on two tasks at once, marked by an input prefix: ``"predict: " + x`` -> the label and ``"explain: " + x``
-> the rationale, with the loss ``alpha * CE(predict) + (1 - alpha) * CE(explain)`` (``alpha`` 0.5; the public
code's ``TaskPrefixTrainer``). Each training example gives both tasks, so every batch holds both. A
self-evaluation model is trained first (on the teacher's evaluations of its own rationales) and training then
continues on the rationales (``--continue_train``).

**The student here is a causal chat LM** (any HF causal LM with a chat template; default: a fresh copy of the
embedded SmolLM2-135M-Instruct), so each task is one chat exchange, rendered with `icon2_lens.render_chat`
(no system prompt: a template's own default one is kept) and ended by the template's end-of-turn token:

=====================  ==============================================================  ==============================
task                   user turn                                                       assistant turn (the target)
=====================  ==============================================================  ==============================
rationale, predict     ``predict: <question>``                                         ``<answer>``
rationale, explain     ``explain: <question>``                                         ``<rationale> The answer is
                                                                                       <answer>.``
self-eval, predict     ``predict: <question>\\nProposed solution: <rationale> The       ``the given answer is <label>``
                       answer is <answer>.``
self-eval, explain     ``explain: <same>``                                             ``<evaluation>``
=====================  ==============================================================  ==============================

The self-evaluation rows mirror the paper's prefix scheme on its ``tree2`` data, whose input is the question
with the chain of thought [INF in BASELINES.md] and whose label is ``correct | wrong | uncertain``: here the
proposed solution follows the question after ``Proposed solution:``, the predict target is the paper's result
phrase (so `icon2_lens.distill.extract.extract_label` reads it) and the explain target is the teacher's
evaluation reasoning (every line but the result line). One deliberate difference from the paper's CoT rows:
its explain target stops before "The answer is"; here it ends with the answer sentence, so ``explain:`` is a
usable chain-of-thought mode of the student at inference (and is evaluated as one, `student_accuracy`).

**The loss.** `TwoTaskTrainer` is a ``trl.SFTTrainer`` whose ``compute_loss`` is `two_task_loss`: one forward
pass over the batch's ``2B`` sequences (``B`` predict rows, then their ``B`` explain rows, right-padded), the
token-level cross-entropy of the next token over the *assistant-turn tokens only* (prompt and padding are
``-100``), averaged over all tokens of each task in the batch (as the paper's per-task HF loss is), and
combined as ``alpha * CE(predict) + (1 - alpha) * CE(explain)``. Both task losses go to ``train_log.jsonl``
beside the combined one at every step.

**Schedule.** With self-evaluation data: a first TRL run on it, then a second run (fresh optimizer and
schedule, as the paper's ``--continue_train`` restarts one) on the rationale data, continuing the same weights.
``max_steps`` and ``epochs`` apply to each stage. Linear decay without warm-up (the HF trainer's default,
which the paper's trainer uses), AdamW, no gradient checkpointing, the precision from `choose_precision`.

**Ablation.** ``mode="single"`` keeps one rationale per question (`single_rationale`: the first correct one,
else the first): the single-rationale distillation baseline, in the same code.

Examples:
    >>> res = train_student(rationale_ds, self_eval_ds, output_dir="runs/student")  # doctest: +SKIP
    >>> student = il.load_model(res.output_dir)  # doctest: +SKIP
    >>> student_accuracy(student, test_problems)["predict"]["accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..hardware import choose_precision
from ..prompts import pre_query_template, render_chat
from ..reward_probe import wilson_interval
from ..runs.io import atomic_folder, atomic_write_text
from ..training.config import check_type
from .extract import answers_match, extract_answer, extract_label

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["StudentConfig", "StudentResult", "StudentMode", "TASKS", "train_student", "single_rationale",
           "student_accuracy", "self_eval_accuracy", "two_task_loss", "TwoTaskCollator", "solution_text",
           "rationale_examples", "self_eval_examples", "tokenize_examples", "predict_prompt", "explain_prompt",
           "self_eval_user", "parse_answer"]

#: ``"multi"``: every rationale of a question is one example (Mind's Mirror); ``"single"``: one per question.
StudentMode = Literal["multi", "single"]
#: The two tasks, in their index order in a batch's ``task`` tensor.
TASKS = ("predict", "explain")
_SELF_EVAL_LABELS = ("correct", "wrong", "uncertain")


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """The settings of `train_student` (the paper's defaults where they fit a CPU demo).

    Attributes:
        alpha: weight of the predict task in ``alpha * CE(predict) + (1 - alpha) * CE(explain)`` (paper: 0.5).
        learning_rate: peak learning rate (AdamW, linear decay, no warm-up; paper: 5e-5).
        epochs: passes over each stage's data.
        batch_size: examples per step; each gives a predict and an explain sequence, so a step holds
            ``2 * batch_size`` sequences.
        max_length: tokens per sequence (prompt + target); longer targets are cut at the end, and an example
            whose prompt alone does not fit is left out (counted in ``student_config.json``).
        max_steps: optimizer steps per stage (``-1``: all epochs).
        precision: ``"auto"`` (`icon2_lens.hardware.choose_precision`), ``"fp32"`` or ``"bf16"``.
        seed: seed of the trainer (shuffling, initialisation of anything new).

    Examples:
        >>> StudentConfig(alpha=0.3).alpha
        0.3
        >>> StudentConfig(alpha=2)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be in [0, 1], got 2; it weighs the predict task against the explain task.
    """

    alpha: float = 0.5
    learning_rate: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 4
    max_length: int = 384
    max_steps: int = -1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}; it weighs the predict task against the "
                             "explain task.")
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (train all epochs) or a positive number of optimizer steps, "
                             f"got {self.max_steps}.")


@dataclass
class StudentResult:
    """Where `train_student` wrote what.

    Attributes:
        output_dir: the saved student (an HF folder `icon2_lens.load_model` opens).
        log_path: ``train_log.jsonl``: one row per optimizer step with ``stage`` (``"self_eval"`` or
            ``"rationale"``), ``step`` (within the stage), ``loss`` (the combined loss), ``loss_predict``,
            ``loss_explain``, ``learning_rate`` and ``elapsed_s``.
        config_path: ``student_config.json`` (the config, mode, precision, base model, counts, steps).
        steps: optimizer steps per stage, in the order run.
        n_examples: training examples per stage (each gives a predict and an explain sequence).
        history: the logged rows.
    """

    output_dir: Path
    log_path: Path
    config_path: Path
    steps: dict[str, int]
    n_examples: dict[str, int]
    history: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------ the task format


def predict_prompt(question: str) -> str:
    """The user turn of the predict task.

    Examples:
        >>> predict_prompt("What is 2 + 3?")
        'predict: What is 2 + 3?'
    """
    return f"predict: {question.strip()}"


def explain_prompt(question: str) -> str:
    """The user turn of the explain task.

    Examples:
        >>> explain_prompt("What is 2 + 3?")
        'explain: What is 2 + 3?'
    """
    return f"explain: {question.strip()}"


def self_eval_user(question: str, solution: str) -> str:
    """The question and a proposed solution: the input of both self-evaluation tasks (after the task prefix).

    Examples:
        >>> predict_prompt(self_eval_user("What is 2 + 3?", "2 + 3 = 5. The answer is 5."))
        'predict: What is 2 + 3?\\nProposed solution: 2 + 3 = 5. The answer is 5.'
    """
    return f"{question.strip()}\nProposed solution: {solution.strip()}"


def solution_text(rationale: str, answer: object = None) -> str:
    """A rationale ending with its answer sentence: ``"<rationale> The answer is <answer>."``.

    With ``answer=None`` the rationale is taken as it is (it is expected to carry its own answer sentence);
    a rationale that already ends with the sentence for ``answer`` is not given a second one.

    Examples:
        >>> solution_text("2 + 3 = 5.", "5")
        '2 + 3 = 5. The answer is 5.'
        >>> solution_text("2 + 3 = 5. The answer is 5.", "5"), solution_text("", 5)
        ('2 + 3 = 5. The answer is 5.', 'The answer is 5.')
    """
    text = rationale.strip()
    if answer is None:
        return text
    ans = str(answer).strip()
    if re.search(r"answer is\s*" + re.escape(ans) + r"\s*\.?\s*$", text, flags=re.IGNORECASE):
        return text
    return f"{text} The answer is {ans}.".strip()


def parse_answer(text: str) -> str | None:
    """The answer in a student's output: after the last "answer is", else the output read as the answer itself.

    The same rules as the teacher's (`icon2_lens.distill.extract.extract_answer`): a predict output such as
    ``"12"`` is read as ``extract_answer("The answer is 12")``, so "12 apples." and "(3 * 4)" read as ``"12"``.

    Examples:
        >>> parse_answer("3 * 4 = 12. The answer is 12."), parse_answer("12"), parse_answer(" 12 apples.")
        ('12', '12', '12')
        >>> parse_answer("") is None
        True
    """
    found = extract_answer(text)
    if found is not None:
        return found
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return extract_answer(f"The answer is {first}") if first else None


def _field(row: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
    if isinstance(row, Mapping):
        if name in row:
            return row[name]
    elif hasattr(row, name):
        return getattr(row, name)
    if default is not dataclasses.MISSING:
        return default
    raise ValueError(f"A row lacks {name!r}: {row!r}.")


def _rows(data: Any) -> list[dict[str, Any]]:
    if data is None:
        return []
    return [dict(r) if isinstance(r, Mapping) else dict(vars(r)) for r in data]


def rationale_examples(rows: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[str, str, str, str]], int]:
    """Rationale rows as ``(predict user, predict target, explain user, explain target)``, and rows skipped.

    A row needs ``question``, ``rationale`` and ``answer``; one whose answer is missing or empty (the teacher's
    chain had no readable answer) is skipped and counted.

    Examples:
        >>> rationale_examples([{"question": "2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5"}])[0][0]
        ('predict: 2 + 3?', '5', 'explain: 2 + 3?', '2 + 3 = 5. The answer is 5.')
    """
    out, skipped = [], 0
    for r in rows:
        for need in ("question", "rationale", "answer"):
            if need not in r:
                raise ValueError(f"A rationale row lacks {need!r} (has {sorted(r)}); pass the teacher's rationale "
                                 "dataset (question, rationale, answer, gold, correct, source_index).")
        ans = r["answer"]
        if ans is None or not str(ans).strip():
            skipped += 1
            continue
        q = str(r["question"])
        out.append((predict_prompt(q), str(ans).strip(), explain_prompt(q),
                    solution_text(str(r["rationale"] or ""), ans)))
    return out, skipped


def self_eval_examples(rows: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[str, str, str, str]], int]:
    """Self-evaluation rows as ``(predict user, predict target, explain user, explain target)``, and rows skipped.

    A row needs ``question``, ``rationale``, ``label`` and ``evaluation``; the proposed solution is
    ``solution_text(rationale, row.get("answer"))``. A row whose label is not ``correct | wrong | uncertain``
    is skipped and counted.

    Examples:
        >>> ex, _ = self_eval_examples([{"question": "2 + 3?", "rationale": "2 + 3 = 5. The answer is 5.",
        ...                              "label": "correct", "evaluation": "The sum is right."}])
        >>> ex[0][1], ex[0][3]
        ('the given answer is correct', 'The sum is right.')
    """
    out, skipped = [], 0
    for r in rows:
        for need in ("question", "rationale", "label", "evaluation"):
            if need not in r:
                raise ValueError(f"A self-evaluation row lacks {need!r} (has {sorted(r)}); pass the teacher's "
                                 "self-evaluation dataset (question, rationale, label, evaluation, rationale_correct).")
        label = r["label"]
        if label not in _SELF_EVAL_LABELS:
            skipped += 1
            continue
        user = self_eval_user(str(r["question"]), solution_text(str(r["rationale"] or ""), r.get("answer")))
        out.append((predict_prompt(user), f"the given answer is {label}", explain_prompt(user),
                    str(r["evaluation"] or "").strip()))
    return out, skipped


def single_rationale(dataset: Any) -> Any:
    """One rationale per question: the first correct one, else the first (the single-rationale baseline).

    Questions are told apart by ``source_index`` where the rows have it, else by ``question``; the order of
    first appearance is kept. A ``datasets.Dataset`` gives a ``Dataset``, anything else a list of dicts.

    Examples:
        >>> rows = [{"question": "a", "correct": False, "rationale": "r1"}, {"question": "a", "correct": True,
        ...          "rationale": "r2"}, {"question": "b", "correct": False, "rationale": "r3"}]
        >>> [r["rationale"] for r in single_rationale(rows)]
        ['r2', 'r3']
    """
    is_ds = type(dataset).__name__ == "Dataset" and hasattr(dataset, "select")
    rows = _rows(dataset)
    chosen: dict[Any, int] = {}
    for i, r in enumerate(rows):
        key = ("source_index", r["source_index"]) if r.get("source_index") is not None else ("question", r["question"])
        if key not in chosen or (not rows[chosen[key]].get("correct") and r.get("correct")):
            chosen[key] = i
    keep = sorted(chosen.values())
    if is_ds:
        return dataset.select(keep)
    return [rows[i] for i in keep]


# ------------------------------------------------------------------------------------------------ tokens and loss


def tokenize_examples(tokenizer: Any, examples: Sequence[tuple[str, str, str, str]], max_length: int,
              end_of_turn: int) -> tuple[list[dict[str, Any]], int]:
    """Tokenised examples ``{pred_input_ids, pred_prompt_len, expl_input_ids, expl_prompt_len}``, and the count dropped.

    Each sequence is the rendered user turn (`icon2_lens.render_chat`, ending at the assistant-turn start),
    then the target's tokens and ``end_of_turn``, cut at ``max_length``; an example whose prompt alone fills
    ``max_length`` is dropped (both its tasks, so every batch keeps its pairs).
    """
    out, dropped = [], 0
    cache: dict[str, list[int]] = {}

    def prompt_ids(user: str) -> list[int]:
        if user not in cache:
            cache[user] = tokenizer(render_chat(tokenizer, user), add_special_tokens=False)["input_ids"]
        return cache[user]

    def seq(user: str, target: str) -> tuple[list[int], int] | None:
        p = prompt_ids(user)
        if len(p) >= max_length:
            return None
        t = (tokenizer(target, add_special_tokens=False)["input_ids"] if target else []) + [end_of_turn]
        return (p + t)[:max_length], len(p)

    for pu, pt, eu, et in examples:
        a, b = seq(pu, pt), seq(eu, et)
        if a is None or b is None:
            dropped += 1
            continue
        out.append({"pred_input_ids": a[0], "pred_prompt_len": a[1], "expl_input_ids": b[0], "expl_prompt_len": b[1]})
    return out, dropped


@dataclass
class TwoTaskCollator:
    """Batches of tokenised pairs: ``B`` predict sequences then their ``B`` explain sequences, right-padded.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on the prompt and the padding) of shape
    ``[2B, L]`` and ``task`` (``[2B]``: 0 predict, 1 explain).

    Examples:
        >>> c = TwoTaskCollator(pad_token_id=0)
        >>> b = c([{"pred_input_ids": [5, 6, 7], "pred_prompt_len": 2, "expl_input_ids": [5, 8], "expl_prompt_len": 1}])
        >>> b["labels"].tolist(), b["task"].tolist()
        ([[-100, -100, 7], [-100, 8, -100]], [0, 1])
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        seqs = ([(list(f["pred_input_ids"]), int(f["pred_prompt_len"])) for f in features]
                + [(list(f["expl_input_ids"]), int(f["expl_prompt_len"])) for f in features])
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, p) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, p:len(s)] = torch.tensor(s[p:], dtype=torch.long)
        task = torch.tensor([0] * len(features) + [1] * len(features), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": task}


def two_task_loss(logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"],
                  task: Int[Tensor, " batch"], alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """``alpha * CE(predict) + (1 - alpha) * CE(explain)``, and the two task losses.

    Each task's CE is the mean next-token cross-entropy over all target tokens (``labels != -100``) of that
    task's rows in the batch; a task with no target tokens in the batch contributes 0.

    Examples:
        >>> logits = torch.zeros(2, 2, 4); labels = torch.tensor([[-100, 1], [-100, 2]])
        >>> loss, lp, le = two_task_loss(logits, labels, torch.tensor([0, 1]), 0.5)
        >>> round(loss.item(), 4), round(lp.item(), 4)  # uniform over 4 tokens: log 4
        (1.3863, 1.3863)
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(shift_labels.shape)
    valid = shift_labels != -100
    parts = []
    for t in range(len(TASKS)):
        m = valid & (task == t)[:, None]
        n = m.sum()
        parts.append((ce * m).sum() / n.clamp(min=1))
    loss = alpha * parts[0] + (1 - alpha) * parts[1]
    return loss, parts[0], parts[1]


def _trainer_class() -> type:
    from trl import SFTTrainer

    class TwoTaskTrainer(SFTTrainer):
        """``trl.SFTTrainer`` with Mind's Mirror's two-task loss (`two_task_loss`) and both task losses logged."""

        alpha: float = 0.5

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            task = inputs["task"]
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            loss, lp, le = two_task_loss(outputs.logits, labels, task, self.alpha)
            mode = "train" if model.training else "eval"
            self._metrics[mode]["loss_predict"].append(float(lp.detach()))
            self._metrics[mode]["loss_explain"].append(float(le.detach()))
            return (loss, outputs) if return_outputs else loss

    return TwoTaskTrainer


# ------------------------------------------------------------------------------------------------ training


def _run_stage(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, stage: str, config: StudentConfig,
               precision: str, device: str, work: Path, log_path: Path, history: list[dict[str, Any]],
               progress: bool) -> int:
    import shutil

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig

    from ..training.trainer import checkpointing_kwargs

    class _Log(TrainerCallback):
        start = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or "loss" not in logs:
                return
            row: dict[str, Any] = {"stage": stage, "step": int(state.global_step)}
            for key in ("loss", "loss_predict", "loss_explain", "learning_rate", "grad_norm"):
                if key in logs:
                    row[key] = float(logs[key])
            row["elapsed_s"] = round(time.perf_counter() - self.start, 3)
            history.append(row)
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    args = SFTConfig(
        output_dir=str(work), learning_rate=config.learning_rate, num_train_epochs=config.epochs,
        max_steps=config.max_steps, per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=device == "cpu", seed=config.seed, disable_tqdm=not progress, max_length=config.max_length,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        # explicit, never TRL's defaults (bf16=True, gradient_checkpointing=True): see choose_precision
        bf16=precision == "bf16", fp16=False, **checkpointing_kwargs(SFTConfig, False),
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tokenizer, data_collator=TwoTaskCollator(tokenizer.pad_token_id),
                               callbacks=[_Log()])
    trainer.alpha = config.alpha
    try:
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return int(trainer.state.global_step)


def train_student(
    rationale_data: Any,
    self_eval_data: Any = None,
    *,
    config: StudentConfig | None = None,
    mode: StudentMode = "multi",
    model_source: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str],
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> StudentResult:
    """Distil the teacher's rationales (and, first, its self-evaluations) into a fresh copy of a causal LM.

    See the module docs for the task format, the loss and the schedule.

    Args:
        rationale_data: the teacher's rationale dataset (a ``datasets.Dataset`` or rows with ``question``,
            ``rationale``, ``answer``; ``correct`` and ``source_index`` are used by ``mode="single"``).
        self_eval_data: the teacher's self-evaluation dataset (``question``, ``rationale``, ``label``,
            ``evaluation``); given, it is trained on first.
        config: the training settings (`StudentConfig`; default: the paper's alpha and learning rate).
        mode: ``"multi"`` (every rationale; Mind's Mirror) or ``"single"`` (`single_rationale`: the baseline).
        model_source: the student, as `icon2_lens.load_model` takes it (default: the embedded model). Its HF
            weights are loaded afresh in float32, as `icon2_lens.training.train` does.
        output_dir: the folder to write (refused if it exists and is not empty, unless ``overwrite``).
        device: ``"cpu"``/``"cuda"`` (default: CUDA if available).
        overwrite: replace an existing output folder.
        progress: show the trainer's progress bar.
        log: where the one-line summaries (precision, data) go.

    Returns:
        A `StudentResult`. The folder (model, tokenizer, ``train_log.jsonl``, ``student_config.json``) is written
        atomically: an interrupted run leaves no partial folder.

    Examples:
        >>> res = train_student(rat, sev, config=StudentConfig(max_steps=20), output_dir="runs/mm")  # doctest: +SKIP
        training precision: fp32 (CPU without native bf16 (...))
        >>> [r["stage"] for r in res.history][:1], res.steps  # doctest: +SKIP
        (['self_eval'], {'self_eval': 20, 'rationale': 20})
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve_source
    from ..runs.io import check_output_folder

    config = StudentConfig() if config is None else config
    if not isinstance(config, StudentConfig):
        raise ValueError(f"config must be a StudentConfig, got {type(config).__name__}.")
    if mode not in ("multi", "single"):
        raise ValueError(f"Unknown mode {mode!r}; use 'multi' (every rationale) or 'single' (one per question).")
    out = check_output_folder(output_dir, overwrite=overwrite)
    rat_rows = _rows(rationale_data)
    if not rat_rows:
        raise ValueError("No rationale rows to train on; make the teacher's data first (`icon2-lens distill data`).")
    n_given = len(rat_rows)
    if mode == "single":
        rat_rows = single_rationale(rat_rows)
    stages: list[tuple[str, list[tuple[str, str, str, str]], int]] = []
    if self_eval_data is not None:
        ex, skipped = self_eval_examples(_rows(self_eval_data))
        if not ex:
            raise ValueError(f"None of the self-evaluation rows has a label in {list(_SELF_EVAL_LABELS)} "
                             f"({skipped} skipped); pass self_eval_data=None to train on the rationales alone.")
        stages.append(("self_eval", ex, skipped))
    ex, skipped = rationale_examples(rat_rows)
    if not ex:
        raise ValueError(f"None of the {len(rat_rows)} rationale rows has an answer; nothing to train on.")
    stages.append(("rationale", ex, skipped))

    _, hf_path, model_id, _ = resolve_source(model_source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto, reason = choose_precision(device)
    precision = auto if config.precision == "auto" else config.precision
    if config.precision != "auto":
        reason = f"asked for; auto would choose {auto}: {reason}"
    log(f"training precision: {precision} ({reason})")
    tokenizer = AutoTokenizer.from_pretrained(hf_path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    end_of_turn = pre_query_template(tokenizer).end_of_turn_id  # also checks the chat template
    model = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)

    tokenized = []
    for name, ex, skipped in stages:
        rows, dropped = tokenize_examples(tokenizer, ex, config.max_length, end_of_turn)
        if not rows:
            raise ValueError(f"No {name} example fits in max_length={config.max_length} tokens; raise max_length.")
        log(f"{name}: {len(rows)} examples ({skipped} rows without an answer/label skipped, {dropped} longer than "
            f"max_length dropped)")
        tokenized.append((name, rows, skipped, dropped))

    history: list[dict[str, Any]] = []
    steps: dict[str, int] = {}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        log_path = tmp / "train_log.jsonl"
        for name, rows, _, _ in tokenized:
            steps[name] = _run_stage(model, tokenizer, rows, stage=name, config=config, precision=precision,
                                     device=device, work=out.parent / f".{out.name}.{name}.trainer",
                                     log_path=log_path, history=history, progress=progress)
        model.config.use_cache = True  # the trainer turns the KV cache off; generation from the folder needs it
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        log_path.touch()
        atomic_write_text(tmp / "student_config.json", json.dumps(
            {**dataclasses.asdict(config), "mode": mode, "precision_used": precision, "precision_reason": reason,
             "base_model": model_id, "device": device, "schedule": [name for name, *_ in tokenized],
             "steps": steps, "n_rationale_rows_given": n_given,
             "n_examples": {name: len(rows) for name, rows, _, _ in tokenized},
             "n_skipped": {name: s for name, _, s, _ in tokenized},
             "n_too_long": {name: d for name, _, _, d in tokenized},
             "task_format": {"predict": "user 'predict: <question>' -> '<answer>'",
                             "explain": "user 'explain: <question>' -> '<rationale> The answer is <answer>.'",
                             "self_eval_predict": "user 'predict: <question>\\nProposed solution: <solution>' -> "
                                                  "'the given answer is <label>'",
                             "self_eval_explain": "user 'explain: <question>\\nProposed solution: <solution>' -> "
                                                  "'<evaluation>'"}},
            indent=2))
    return StudentResult(output_dir=out, log_path=out / "train_log.jsonl", config_path=out / "student_config.json",
                         steps=steps, n_examples={name: len(rows) for name, rows, _, _ in tokenized}, history=history)


# ------------------------------------------------------------------------------------------------ evaluation


def _generate(model: LoadedModel, users: Sequence[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    from ..gen import Decoding, engine

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    eng = engine(model)
    tok = model.tokenizer
    decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=False)
    texts: list[str] = []
    for start in range(0, len(users), batch_size):
        prompts = [render_chat(tok, u) for u in users[start:start + batch_size]]
        texts.extend(g.text for g in eng.generate(prompts, decoding, seed=0))
    return texts


def _share(hits: int, n: int, level: float) -> dict[str, Any]:
    lo, hi = wilson_interval(hits, n, level=level) if n else (float("nan"), float("nan"))
    return {"accuracy": hits / n if n else float("nan"), "n": n, "correct": hits, "ci_low": lo, "ci_high": hi,
            "level": level}


def student_accuracy(
    model: LoadedModel,
    problems: Sequence[Any],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    explain_max_new_tokens: int = 192,
    tasks: Sequence[str] = TASKS,
    level: float = 0.9,
) -> dict[str, Any]:
    """The student's greedy accuracy on ``problems``, asked as ``predict:`` and as ``explain:``.

    Each question is asked through the engine seam (`icon2_lens.gen.engine`), greedy, as the chat user turn
    ``predict: <question>`` (the answer alone) and ``explain: <question>`` (a rationale ending "The answer
    is X."). The answer is read by `parse_answer`: the teacher's rule (`extract_answer`, after the last
    "answer is"), else the output's first line read as the answer itself; it is right when it matches the
    gold answer as a number (`answers_match`). An output with no readable answer counts as wrong.

    Args:
        model: the student (`icon2_lens.load_model` of `train_student`'s folder, or any model to compare).
        problems: objects or dicts with ``question`` and ``answer`` (e.g. `icon2_lens.distill.problems.Problem`).
        batch_size: questions per generation batch.
        max_new_tokens: token budget of a predict answer.
        explain_max_new_tokens: token budget of an explain rationale.
        tasks: which of ``"predict"``, ``"explain"`` to ask.
        level: coverage of the Wilson intervals.

    Returns:
        ``{task: {"accuracy", "n", "correct", "ci_low", "ci_high", "level", "n_unparsed"}}`` per task asked, and
        ``"items"``: per problem ``{"question", "gold", "<task>_text", "<task>_answer", "<task>_correct"}``.

    Examples:
        >>> acc = student_accuracy(student, test_problems)  # doctest: +SKIP
        >>> acc["predict"]["accuracy"], acc["explain"]["ci_low"]  # doctest: +SKIP
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"Unknown tasks {unknown}; ask one or both of {list(TASKS)}.")
    if not problems:
        raise ValueError("No problems to evaluate on.")
    questions = [str(_field(p, "question")) for p in problems]
    golds = [str(_field(p, "answer")) for p in problems]
    items: list[dict[str, Any]] = [{"question": q, "gold": g} for q, g in zip(questions, golds, strict=True)]
    out: dict[str, Any] = {}
    for t in tasks:
        users = [predict_prompt(q) if t == "predict" else explain_prompt(q) for q in questions]
        budget = max_new_tokens if t == "predict" else explain_max_new_tokens
        texts = _generate(model, users, max_new_tokens=budget, batch_size=batch_size)
        hits = unparsed = 0
        for item, text, gold in zip(items, texts, golds, strict=True):
            ans = parse_answer(text)
            ok = answers_match(ans, gold)
            item.update({f"{t}_text": text, f"{t}_answer": ans, f"{t}_correct": ok})
            hits += ok
            unparsed += ans is None
        out[t] = {**_share(hits, len(items), level), "n_unparsed": unparsed}
    out["items"] = items
    return out


def self_eval_accuracy(
    model: LoadedModel,
    problems: Sequence[Any],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    level: float = 0.9,
) -> dict[str, Any]:
    """How often the student's own label on its own answers agrees with the gold answer.

    For each problem the student's solution (``answers[i]``: e.g. its ``explain`` output from `student_accuracy`'s
    ``items``, or a bare answer, which is given as "The answer is X.") is shown back to it as the self-evaluation
    task ``predict: <question>\\nProposed solution: <solution>``; its greedy output's label (`extract_label`:
    correct, wrong or uncertain) is compared with whether the solution's answer (`parse_answer`) matches the
    gold. Agreement: "correct" on a right answer or "wrong" on a wrong one; "uncertain" and no label count as
    disagreement (``decided_accuracy`` leaves them out).

    Returns:
        ``accuracy``, ``n``, ``correct``, ``ci_low``, ``ci_high``, ``level`` (agreement with gold),
        ``decided_accuracy`` and ``n_decided`` (rows labelled correct or wrong), ``label_counts``
        (correct, wrong, uncertain, none), ``answers_right`` (solutions whose answer is right) and ``items``.

    Examples:
        >>> acc = student_accuracy(student, test, tasks=["explain"])  # doctest: +SKIP
        >>> self_eval_accuracy(student, test, [i["explain_text"] for i in acc["items"]])["accuracy"]  # doctest: +SKIP
    """
    if len(answers) != len(problems):
        raise ValueError(f"Got {len(answers)} answers for {len(problems)} problems; give one answer per problem.")
    if not problems:
        raise ValueError("No problems to evaluate on.")
    questions = [str(_field(p, "question")) for p in problems]
    golds = [str(_field(p, "answer")) for p in problems]
    solutions = [a.strip() if extract_answer(a) is not None else solution_text("", a.strip()) for a in answers]
    users = [predict_prompt(self_eval_user(q, s)) for q, s in zip(questions, solutions, strict=True)]
    texts = _generate(model, users, max_new_tokens=max_new_tokens, batch_size=batch_size)
    counts = {"correct": 0, "wrong": 0, "uncertain": 0, "none": 0}
    items, hits, decided, decided_hits, right = [], 0, 0, 0, 0
    for q, g, s, text in zip(questions, golds, solutions, texts, strict=True):
        label = extract_label(text)
        ok = answers_match(parse_answer(s), g)
        agree = (label == "correct" and ok) or (label == "wrong" and not ok)
        counts[label or "none"] += 1
        hits += agree
        right += ok
        if label in ("correct", "wrong"):
            decided += 1
            decided_hits += agree
        items.append({"question": q, "gold": g, "solution": s, "answer_right": ok, "text": text, "label": label,
                      "agrees": agree})
    return {**_share(hits, len(items), level), "decided_accuracy": decided_hits / decided if decided else float("nan"),
            "n_decided": decided, "label_counts": counts, "answers_right": right, "items": items}
