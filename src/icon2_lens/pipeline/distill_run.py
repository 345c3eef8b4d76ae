"""Mind's Mirror end to end: teacher data, the answer probe, three students, evaluation and a report.

`run_distill` runs Liu et al.'s method (NAACL 2024, arXiv 2311.09214; `icon2_lens.distill`) as one resumable
job in a folder ``out``:

a. **problems**: ``config.problems`` (generated arithmetic word problems, or a user's JSONL) split into train and
   test by seed (`icon2_lens.distill.problems`), written to ``problems/{train,test}.jsonl``;
b. **teacher data** for the train *and* the test questions: k rationales each and m self-evaluations of every
   rationale (`icon2_lens.distill.teacher.make_teacher_data`, resumable batch by batch), in ``teacher/`` with its
   ``costs.json`` (generation = rationales, labelling = self-evaluations);
c. **the two datasets** from the train questions only (``data/rationales.jsonl``, ``data/self_eval.jsonl``, with
   ``data/provenance.json``) and the teacher's summary on each split (``data/teacher_summary.json``);
d. **the answer probe** (this library's addition, `icon2_lens.distill.probe.AnswerProbe`): fitted on the train
   questions' rationales (gold-labelled), checked on the test questions' rationales beside the teacher's text
   self-evaluation of the same rationales (``probe/``);
e. **three students**, each a fresh copy of the student model: single-rationale distillation
   (``students/single``), multi-rationale (``students/multi``) and multi-rationale + self-evaluation, the full
   method (``student/``, an HF folder `icon2_lens.load_model` opens);
f. **evaluation** on the test questions (``eval/<student>.json``): the base student and the three trained ones,
   asked ``predict:`` (headline) and ``explain:``, greedy, the answer read by the teacher's rules; the full
   student's self-evaluation of its own ``explain:`` answers;
g. ``metrics.json`` and ``report.md``: the student table with Wilson intervals and the teacher's accuracy on the
   same test questions beside it, the teacher's self-evaluation agreement (text and probe), data yield and cost
   per question.

Every step is recorded in ``steps.json`` with a digest of what it was made from; a rerun skips a step whose
digest is unchanged and whose outputs are there, resumes the teacher data where it stopped, and re-runs a step
whose settings or inputs changed together with everything downstream of it (a new learning rate retrains the
students and re-evaluates them; the teacher data are kept).

Examples:
    >>> res = il.run_distill(out="runs/distill")  # doctest: +SKIP
    >>> res.metrics["students"]["multi_self_eval"]["accuracy"]  # doctest: +SKIP
    >>> student = il.load_model("runs/distill/student")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..distill.probe import AnswerProbe
from ..distill.problems import ARITHMETIC, Problem, load_problems, split_problems
from ..distill.student import StudentConfig, StudentMode, self_eval_accuracy, student_accuracy, train_student
from ..distill.teacher import (
    TEACHER_DATA,
    TEACHER_SETTINGS,
    TeacherConfig,
    make_teacher_data,
    rationale_dataset,
    self_eval_dataset,
    teacher_summary,
)
from ..errors import check_finite
from ..hardware import resolve_device
from ..models import LoadedModel, load_model
from ..reward_probe import wilson_interval
from ..runs import names
from ..runs.costs import load_costs
from ..runs.io import atomic_write_text, read_jsonl
from ..training.config import check_type

__all__ = ["DistillConfig", "DistillResult", "run_distill", "distill_markdown", "text_agreement", "majority_control",
           "STUDENTS", "STEPS", "DISTILL_METRICS", "DISTILL_REPORT"]

DISTILL_METRICS = "metrics.json"
DISTILL_REPORT = "report.md"
STEPS = "steps.json"
#: The student rows of the table, in order.
STUDENTS = ("base", "single", "multi", "multi_self_eval")
_LABELS = {"base": "base student (not distilled)", "single": "single-rationale distillation",
           "multi": "multi-rationale distillation",
           "multi_self_eval": "multi-rationale + self-evaluation (Mind's Mirror)"}
#: Where each trained student is written, relative to ``out``.
_STUDENT_DIRS = {"single": "students/single", "multi": "students/multi", "multi_self_eval": "student"}
#: The steps `run_distill` can stop after.
StopAfter = Literal["data", "probe", "students"]
_STOPS = typing.get_args(StopAfter)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Settings of `run_distill`; the defaults are the demo size: 32 problems (24 train, 8 test), k = 3, m = 2,
    one epoch, about 10 minutes on an idle 2-core CPU with the embedded SmolLM2-135M-Instruct as teacher and
    student (the teacher's data take about two thirds of it).

    The teacher fields are `icon2_lens.distill.teacher.TeacherConfig`'s (``teacher_batch_size`` is its
    ``batch_size``), the student fields `icon2_lens.distill.student.StudentConfig`'s; the paper's sizes are k = 5,
    m = 5 and many epochs (``../shared/BASELINES.md`` section 3).

    Attributes:
        problems: ``"arithmetic"`` (generated word problems, `icon2_lens.distill.problems.make_problems`) or a
            JSONL file with ``question`` and ``answer`` per line (SVAMP, GSM8K or your own).
        n_problems: problems to use (train and test together; a file's first ``n_problems``).
        test_fraction: share of the questions held out for the test split (no question text on both sides).
        k: rationales the teacher writes per question (the paper: 5).
        m: self-evaluations the teacher writes per rationale (the paper: 5).
        temperature: sampling temperature of the teacher's rationales.
        top_p: nucleus mass of the teacher's rationales and self-evaluations.
        max_new_tokens: token budget per teacher rationale.
        eval_tokens: token budget per teacher self-evaluation.
        eval_temperature: sampling temperature of the teacher's self-evaluations.
        eval_prefix: the start of the teacher's self-evaluation turn, written for it ("": none).
        teacher_batch_size: questions per teacher batch (each generates ``teacher_batch_size * k`` rationales).
        correct_only: train the students only on rationales whose answer matches the gold one (rejection
            sampling; not the paper's default, which learns every rationale and lets the self-evaluation tell
            them apart). The probe and the teacher's figures always use every rationale.
        probe: fit the answer probe on the teacher's residual stream and compare it with the text
            self-evaluation.
        alpha: weight of the predict task in the students' loss (the paper: 0.5).
        learning_rate: the students' peak learning rate (AdamW, linear decay; the paper: 5e-5 over 60-80 epochs,
            here twice that for a one-epoch demo).
        epochs: passes over each training stage's data.
        max_steps: optimizer steps per training stage (``-1``: all epochs).
        batch_size: student training examples per step (each gives a predict and an explain sequence).
        max_length: tokens per student training sequence.
        precision: student training precision: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        predict_tokens: token budget of a student's ``predict:`` answer (and of its self-evaluation label).
        explain_tokens: token budget of a student's ``explain:`` rationale.
        test_batch_size: questions per generation batch in the evaluation.
        level: coverage of every interval (Wilson).

    Examples:
        >>> DistillConfig().teacher_config().k, DistillConfig(learning_rate=1e-4).student_config().learning_rate
        (3, 0.0001)
    """

    problems: str = ARITHMETIC
    n_problems: int = 32
    test_fraction: float = 0.25
    k: int = 3
    m: int = 2
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96
    eval_tokens: int = 48
    eval_temperature: float = 0.7
    eval_prefix: str = "Evaluation:"
    teacher_batch_size: int = 4
    correct_only: bool = False
    probe: bool = True
    alpha: float = 0.5
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    max_length: int = 384
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    predict_tokens: int = 16
    explain_tokens: int = 96
    test_batch_size: int = 8
    level: float = 0.9

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
            if hints[f.name] is float:
                check_finite(getattr(self, f.name), f.name)  # NaN and infinity, before the ranges below
        if not self.problems.strip():
            raise ValueError(f"problems must be '{ARITHMETIC}' or a JSONL file, got an empty string.")
        for name in ("n_problems", "predict_tokens", "explain_tokens", "test_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.n_problems < 2:
            raise ValueError(f"n_problems must be at least 2 (one train and one test question), got "
                             f"{self.n_problems}.")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}.")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}.")
        self.teacher_config()  # their own checks, as this config's errors
        self.student_config()

    def teacher_config(self) -> TeacherConfig:
        """The teacher's settings."""
        return TeacherConfig(k=self.k, m=self.m, temperature=self.temperature, top_p=self.top_p,
                             max_new_tokens=self.max_new_tokens, eval_tokens=self.eval_tokens,
                             eval_temperature=self.eval_temperature, eval_prefix=self.eval_prefix,
                             batch_size=self.teacher_batch_size)

    def student_config(self, seed: int = 0) -> StudentConfig:
        """The students' training settings (every student gets the same)."""
        return StudentConfig(alpha=self.alpha, learning_rate=self.learning_rate, epochs=self.epochs,
                             batch_size=self.batch_size, max_length=self.max_length, max_steps=self.max_steps,
                             precision=self.precision, seed=seed)


@dataclass
class DistillResult:
    """What `run_distill` wrote and found.

    Attributes:
        out: the run folder.
        metrics: the content of ``metrics.json`` (empty when the run stopped before the evaluation).
        report: ``report.md`` (``None`` when the run stopped before the evaluation).
        student: the full method's student (``out/student``, an HF folder), ``None`` before it is trained.
        ran: the steps run this time (``problems``, ``teacher``, ``data``, ``probe``, ``train:multi``,
            ``evaluate:base``, ...); the others were reused.
    """

    out: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None
    student: Path | None = None
    ran: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ helpers


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sha(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _source(source: str | os.PathLike[str] | None) -> str:
    """A model source as recorded in the digests: ``"embedded"``, an absolute path, or an HF id."""
    if source is None or str(source) == "embedded":
        return "embedded"
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else str(source)


class _Steps:
    """``steps.json``: per step, the digest it is (being) made with and whether it finished."""

    def __init__(self, out: Path) -> None:
        self.path = out / STEPS
        self.entries: dict[str, dict[str, str]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.entries, indent=2, sort_keys=True))

    def current(self, key: str, digest: str) -> bool:
        e = self.entries.get(key, {})
        return e.get("digest") == digest and e.get("status") == "finished"

    def begin(self, key: str, digest: str, *folders: Path) -> None:
        """Start a step: a folder made with another digest (or by an unknown run) is cleared first; one started
        with this digest is kept, to be resumed."""
        if self.entries.get(key, {}).get("digest") != digest:
            for folder in folders:
                if folder.is_dir():
                    shutil.rmtree(folder)
                elif folder.exists():
                    folder.unlink()
        self.entries[key] = {"digest": digest, "status": "running"}
        self._save()

    def finish(self, key: str) -> None:
        self.entries[key]["status"] = "finished"
        self._save()


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (``metrics.json`` stays strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in rows))


def _share(correct: int, n: int, level: float) -> dict[str, Any]:
    """``{"accuracy", "n", "correct", "ci_low", "ci_high", "level"}`` (a Wilson interval; ``None`` for n = 0)."""
    if n == 0:
        return {"accuracy": None, "n": 0, "correct": 0, "ci_low": None, "ci_high": None, "level": level}
    lo, hi = wilson_interval(correct, n, level=level)
    p = correct / n
    # the interval holds the estimate (Wilson's bounds can miss 0 or 1 by a rounding error)
    return {"accuracy": p, "n": n, "correct": correct, "ci_low": min(lo, p), "ci_high": max(hi, p), "level": level}


def _from_summary(share: Mapping[str, Any], level: float) -> dict[str, Any]:
    return _share(int(share["successes"]), int(share["n"]), level)


def _verdict(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """``"above"`` / ``"below"`` when the two intervals do not overlap, else ``"not distinguishable at this size"``."""
    if not a.get("n") or not b.get("n"):
        return "no data"
    if a["ci_low"] > b["ci_high"]:
        return "above"
    if a["ci_high"] < b["ci_low"]:
        return "below"
    return "not distinguishable at this size"


def _majority(labels: Sequence[str | None]) -> str | None:
    counts = Counter(x for x in labels if x is not None)
    return counts.most_common(1)[0][0] if counts else None


def text_agreement(rows: Sequence[Mapping[str, Any]], *, level: float = 0.9) -> dict[str, Any]:
    """How often the teacher's text self-evaluation agrees with gold, per rationale with a readable answer.

    The same rationales `icon2_lens.distill.teacher.rationale_dataset` keeps (and the probe reads). A rationale's
    verdict is the most common of its parsed labels (the first seen of equals); it agrees when it is "correct" on
    a right answer or "wrong" on a wrong one ("uncertain" and no parsed label disagree).

    Examples:
        >>> row = {"question": "Q", "answer": "5", "rationale_answers": ["5", "4", None],
        ...        "rationale_correct": [True, False, False],
        ...        "evaluation_labels": [["correct", "wrong", "correct"], [None, None, None], ["wrong"] * 3]}
        >>> text_agreement([row])["accuracy"]
        0.5
    """
    hits = n = 0
    for row in rows:
        for answer, right, labels in zip(row["rationale_answers"], row["rationale_correct"], row["evaluation_labels"],
                                         strict=True):
            if answer is None:
                continue
            verdict = _majority(labels)
            n += 1
            hits += (verdict == "correct" and bool(right)) or (verdict == "wrong" and not right)
    return _share(hits, n, level)


def majority_control(train_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]], *,
                     level: float = 0.9) -> dict[str, Any]:
    """The control for any self-evaluation's agreement: always say the class most common among the train
    rationales ("wrong" for a weak teacher), scored on the same test rationales as `text_agreement`.

    A self-evaluation (text or probe) that does not beat this constant has learnt nothing about correctness
    beyond the base rate.

    Examples:
        >>> train = [{"rationale_answers": ["1", "2"], "rationale_correct": [False, False]}]
        >>> test = [{"rationale_answers": ["5", "4", None], "rationale_correct": [True, False, False]}]
        >>> c = majority_control(train, test); c["label"], c["accuracy"]
        ('wrong', 0.5)
    """
    def classes(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
        return [bool(right) for row in rows
                for answer, right in zip(row["rationale_answers"], row["rationale_correct"], strict=True)
                if answer is not None]

    train_c = classes(train_rows)
    say_right = sum(train_c) > len(train_c) / 2
    test_c = classes(test_rows)
    return {**_share(sum(1 for c in test_c if c == say_right), len(test_c), level),
            "label": "correct" if say_right else "wrong"}


# ------------------------------------------------------------------------------------------------ the run


class _Models:
    """The teacher and the base student, each loaded once on first use."""

    def __init__(self, teacher: str | os.PathLike[str] | None, student: str | os.PathLike[str] | None,
                 device: str | None) -> None:
        self.sources = {"teacher": teacher, "student": student}
        self.device = device
        self.loaded: dict[str, LoadedModel] = {}

    def get(self, which: str) -> LoadedModel:
        if which not in self.loaded:
            other = "student" if which == "teacher" else "teacher"
            if other in self.loaded and _source(self.sources[which]) == _source(self.sources[other]):
                self.loaded[which] = self.loaded[other]  # the same model (the default: embedded for both)
            else:
                self.loaded[which] = load_model(self.sources[which], device=self.device)
        return self.loaded[which]


def _problem_rows(path: Path) -> list[Problem]:
    return [Problem(**r) for r in read_jsonl(path)]


def run_distill(
    config: DistillConfig | None = None,
    *,
    teacher: str | os.PathLike[str] | None = None,
    student: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "runs/distill",
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    stop_after: StopAfter | None = None,
) -> DistillResult:
    """Mind's Mirror end to end, resumable: problems, teacher data, datasets, probe, students, evaluation, report.

    See the module docs for the steps and the layout of ``out``.

    Args:
        config: a `DistillConfig` (default: the demo size).
        teacher: the teacher, as `icon2_lens.load_model` takes it (``None``: the embedded SmolLM2-135M-Instruct).
        student: the student's starting weights, as `icon2_lens.load_model` takes it (``None``: a fresh copy of
            the embedded model); every student is trained from it, and the base row evaluates it untrained.
        out: the run folder; a rerun resumes and reuses what is unchanged.
        seed: seed of the problems, the split, the teacher's sampling and the students' training.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA if available).
        progress: progress bars.
        log: where step lines go (``None``: silent).
        stop_after: stop after ``"data"`` (problems, teacher data and the datasets: what ``icon2-lens distill
            data`` makes), ``"probe"`` or ``"students"``.

    Returns:
        A `DistillResult`.

    Raises:
        ValueError: an invalid config, or teacher data with nothing to train on (no rationale with a readable
            answer; for the full student, no self-evaluation with a readable label), named before any training.

    Examples:
        >>> res = il.run_distill(il.DistillConfig(n_problems=12, k=2, m=1), out="runs/mm")  # doctest: +SKIP
        >>> print(res.report.read_text())  # doctest: +SKIP
    """
    cfg = DistillConfig() if config is None else config
    if not isinstance(cfg, DistillConfig):
        raise ValueError(f"config must be a DistillConfig, got {type(cfg).__name__}.")
    if stop_after is not None and stop_after not in _STOPS:
        raise ValueError(f"stop_after={stop_after!r} is not a step to stop after; use one of {list(_STOPS)}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    resolve_device(device)  # an unknown device, or CUDA where there is none: an error now, not a CPU run later
    source_id: Any = cfg.problems
    if cfg.problems != ARITHMETIC:
        path = Path(cfg.problems).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Problem file {path} does not exist; pass '{ARITHMETIC}' for generated problems, "
                                    "or a JSONL file with 'question' and 'answer' per line.")
        source_id = [str(path.resolve()), _file_sha(path)]
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is a file; choose another folder.")
    if root.is_dir() and any(root.iterdir()) and not (root / STEPS).is_file():
        raise FileExistsError(f"{root} exists, is not empty and holds no distill run (no {STEPS}); choose another "
                              "folder.")
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    steps, ran = _Steps(root), list[str]()
    models = _Models(teacher, student, device)
    result = DistillResult(out=root, ran=ran)
    t_start = time.perf_counter()

    def step(name: str, what: str) -> Callable[[], None]:
        t0 = time.perf_counter()
        say(f"[distill] {name}: {what}")

        def done() -> None:
            steps.finish(name)
            ran.append(name)
            say(f"[distill] {name}: done in {time.perf_counter() - t0:.0f} s")
        return done

    # ---- (a) problems and the split ----
    pdir = root / "problems"
    digest = _sha(["problems", source_id, cfg.n_problems, cfg.test_fraction, seed])
    if not steps.current("problems", digest) or not (pdir / "test.jsonl").is_file():
        steps.begin("problems", digest, pdir)
        done = step("problems", f"{cfg.n_problems} problems from {cfg.problems}, {cfg.test_fraction:.0%} held out")
        problems = load_problems(cfg.problems, limit=cfg.n_problems, seed=seed)
        train_p, test_p = split_problems(problems, test_fraction=cfg.test_fraction, seed=seed)
        _write_jsonl(pdir / "train.jsonl", [p.to_dict() for p in train_p])
        _write_jsonl(pdir / "test.jsonl", [p.to_dict() for p in test_p])
        done()
    train_p, test_p = _problem_rows(pdir / "train.jsonl"), _problem_rows(pdir / "test.jsonl")
    split_digest = _sha([digest, _file_sha(pdir / "train.jsonl", pdir / "test.jsonl")])

    # ---- (b) teacher data for the train and the test questions ----
    tdir = root / "teacher"
    tcfg = cfg.teacher_config()
    teacher_digest = _sha(["teacher", split_digest, dataclasses.asdict(tcfg), _source(teacher), seed])
    if not steps.current("teacher", teacher_digest) or not (tdir / names.COSTS).is_file():
        steps.begin("teacher", teacher_digest, tdir)
        done = step("teacher", f"{tcfg.k} rationales and {tcfg.k}x{tcfg.m} self-evaluations for each of "
                               f"{len(train_p) + len(test_p)} questions ({len(train_p)} train, {len(test_p)} test)")
        make_teacher_data(models.get("teacher"), train_p + test_p, tcfg, seed=seed, out=tdir, progress=progress)
        done()
    rows = sorted(read_jsonl(tdir / TEACHER_DATA), key=lambda r: int(r["index"]))
    if [r["question"] for r in rows] != [p.question for p in train_p + test_p]:
        raise ValueError(f"{tdir / TEACHER_DATA} does not hold the teacher data of {pdir}'s questions; delete "
                         f"{tdir} (or the whole folder) and rerun.")
    train_rows, test_rows = rows[:len(train_p)], rows[len(train_p):]
    teacher_settings = json.loads((tdir / TEACHER_SETTINGS).read_text())

    # ---- (c) the datasets (train questions) and the teacher's summary ----
    ddir = root / "data"
    data_digest = _sha(["data", teacher_digest, cfg.correct_only])
    if not steps.current("data", data_digest) or not (ddir / "provenance.json").is_file():
        steps.begin("data", data_digest, ddir)
        done = step("data", "rationale and self-evaluation datasets from the train questions")
        rat = [r for r in rationale_dataset(train_rows).to_list() if r["correct"] or not cfg.correct_only]
        sev = self_eval_dataset(train_rows).to_list()
        _write_jsonl(ddir / "rationales.jsonl", rat)
        _write_jsonl(ddir / "self_eval.jsonl", sev)
        atomic_write_text(ddir / "provenance.json", json.dumps({
            "teacher": teacher_settings.get("model"), "teacher_fingerprint": teacher_settings.get("fingerprint"),
            "teacher_source": _source(teacher), "teacher_settings": teacher_settings, "seed": seed,
            "problems": cfg.problems, "split": "train", "n_questions": len(train_rows),
            "correct_only": cfg.correct_only, "rows": {"rationales": len(rat), "self_eval": len(sev)},
            "source_rows": f"teacher/{TEACHER_DATA}: source_index is a row's 'index' there, rationale_index the "
                           "rationale, evaluation_index the self-evaluation",
            "columns": {"rationales": "question, rationale (before 'The answer is', up to its last period), answer "
                                      "(the rationale's own), gold, correct, source_index, rationale_index",
                        "self_eval": "question, rationale (the whole text the teacher evaluated), label (correct, "
                                     "wrong, uncertain), evaluation (every line but the result line), "
                                     "rationale_correct, source_index, rationale_index, evaluation_index"}},
            indent=2))
        done()
    atomic_write_text(ddir / "teacher_summary.json", json.dumps(  # cheap, and its intervals follow `level`
        {"train": teacher_summary(train_rows, level=cfg.level), "test": teacher_summary(test_rows, level=cfg.level)},
        indent=2))
    rat_rows = read_jsonl(ddir / "rationales.jsonl")
    sev_rows = read_jsonl(ddir / "self_eval.jsonl")
    if stop_after == "data":
        return _finish(result, say, t_start)

    # ---- (d) the answer probe vs the text self-evaluation ----
    qdir = root / "probe"
    probe_digest = _sha(["probe", teacher_digest])  # its intervals are recomputed at `level` in the metrics
    if cfg.probe and (not steps.current("probe", probe_digest) or not (qdir / "probe.json").is_file()):
        steps.begin("probe", probe_digest, qdir)
        done = step("probe", "answer probe on the teacher's residual stream: fit on train, check on test")
        atomic_write_text(qdir / "probe.json", json.dumps(
            _fit_probe(models.get("teacher"), train_rows, test_rows, qdir, cfg.level), indent=2))
        done()
    if stop_after == "probe":
        return _finish(result, say, t_start)

    # ---- (e) the students ----
    scfg = cfg.student_config(seed)
    jobs: list[tuple[str, StudentMode, bool]] = [("single", "single", False), ("multi", "multi", False),
                                                 ("multi_self_eval", "multi", True)]
    train_digests: dict[str, str] = {}
    pending = []
    for name, mode, with_sev in jobs:
        d = _sha(["train", name, data_digest, dataclasses.asdict(scfg), _source(student), mode, with_sev])
        train_digests[name] = d
        if not steps.current(f"train:{name}", d) or not (root / _STUDENT_DIRS[name] / "config.json").is_file():
            pending.append((name, mode, with_sev, d))
    if pending:  # fail before any training, with what the teacher gave
        _check_trainable(rat_rows, sev_rows, need_self_eval=any(w for _, _, w, _ in pending), where=ddir,
                         correct_only=cfg.correct_only)
    for name, mode, with_sev, d in pending:
        folder = root / _STUDENT_DIRS[name]
        steps.begin(f"train:{name}", d)
        done = step(f"train:{name}", f"{_LABELS[name]} into {folder}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        train_student(rat_rows, sev_rows if with_sev else None, config=scfg, mode=mode, model_source=student,
                      output_dir=folder, device=device, overwrite=True, progress=progress, log=say)
        done()
    result.student = root / _STUDENT_DIRS["multi_self_eval"]
    if stop_after == "students":
        return _finish(result, say, t_start)

    # ---- (f) evaluation on the test questions ----
    edir = root / "eval"
    evals: dict[str, dict[str, Any]] = {}
    for name in STUDENTS:
        trained = train_digests.get(name, _sha(["base", _source(student)]))
        d = _sha(["evaluate", name, trained, split_digest, cfg.predict_tokens, cfg.explain_tokens,
                  cfg.test_batch_size])
        cache = edir / f"{name}.json"
        if not steps.current(f"evaluate:{name}", d) or not cache.is_file():
            steps.begin(f"evaluate:{name}", d, cache)
            done = step(f"evaluate:{name}", f"{_LABELS[name]} on {len(test_p)} test questions")
            m = models.get("student") if name == "base" else load_model(root / _STUDENT_DIRS[name], device=device)
            acc = student_accuracy(m, test_p, batch_size=cfg.test_batch_size, max_new_tokens=cfg.predict_tokens,
                                   explain_max_new_tokens=cfg.explain_tokens, level=cfg.level)
            if name == "multi_self_eval":
                acc["self_eval"] = self_eval_accuracy(m, test_p, [i["explain_text"] for i in acc["items"]],
                                                      batch_size=cfg.test_batch_size,
                                                      max_new_tokens=cfg.predict_tokens, level=cfg.level)
            atomic_write_text(cache, json.dumps(acc, indent=2))
            done()
        evals[name] = json.loads(cache.read_text())

    # ---- (g) metrics and report ----
    probe_res = json.loads((qdir / "probe.json").read_text()) if cfg.probe and (qdir / "probe.json").is_file() else None
    metrics = _finite(_metrics(cfg, root, seed, teacher, student, train_p, test_p, train_rows, test_rows, rat_rows,
                               sev_rows, evals, probe_res, teacher_settings))
    atomic_write_text(root / DISTILL_METRICS, json.dumps(metrics, indent=2))
    result.metrics = metrics
    result.report = atomic_write_text(root / DISTILL_REPORT, distill_markdown(metrics))
    return _finish(result, say, t_start)


def _finish(result: DistillResult, say: Callable[[str], None], t0: float) -> DistillResult:
    say(f"[distill] finished in {time.perf_counter() - t0:.0f} s ({', '.join(result.ran) or 'everything reused'})"
        + (f"; report: {result.report}" if result.report is not None else ""))
    return result


def _check_trainable(rat: Sequence[Mapping[str, Any]], sev: Sequence[Mapping[str, Any]], *, need_self_eval: bool,
                     where: Path, correct_only: bool) -> None:
    summary = where / "teacher_summary.json"
    if not rat:
        why = ("no rationale with a right answer (correct_only is set)" if correct_only else
               "no rationale with a readable answer ('The answer is X.')")
        raise ValueError(f"The teacher gave {why} for the train questions, so there is nothing to distil; see "
                         f"{summary}. Use a stronger teacher, a larger token budget (max_new_tokens) or more "
                         "problems" + (", or drop correct_only." if correct_only else "."))
    if need_self_eval and not any(r.get("label") in ("correct", "wrong", "uncertain") for r in sev):
        raise ValueError(f"None of the teacher's self-evaluations has a readable label ('the given answer is correct "
                         f"| wrong | uncertain'), so the full student has no self-evaluation to learn; see {summary}. "
                         "Use a stronger teacher, a larger eval_tokens budget or more self-evaluations (m).")


def _fit_probe(teacher: LoadedModel, train_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]],
               folder: Path, level: float) -> dict[str, Any]:
    """Fit on the train questions' rationales, check on the test questions'; the vectors go to ``folder``."""
    train_rat = rationale_dataset(train_rows).to_list()
    test_rat = rationale_dataset(test_rows).to_list()
    out: dict[str, Any] = {"fitted": False, "reason": None, "n_train_rationales": len(train_rat),
                           "n_test_rationales": len(test_rat), "probe": None, "agreement": None}
    try:
        probe = AnswerProbe.fit(teacher, train_rat)
    except ValueError as exc:  # one class only (a weak or a perfect teacher), or no rows
        out["reason"] = str(exc)
        return out
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": probe.vectors.contiguous(), "mid": probe.mid.contiguous(),
               "scale": probe.scale.contiguous()}, str(folder / "answer_probe.safetensors"))
    out.update(fitted=True, probe=probe.describe())
    if not test_rat:
        out["reason"] = "no test rationale with a readable answer to check the probe on"
        return out
    agreement = probe.agreement(test_rat, level=level)
    out["agreement"] = {**agreement, **{k: v for k, v in _share(agreement["correct"], agreement["n"], level).items()
                                        if k in ("ci_low", "ci_high")}}
    return out


def _student_row(name: str, ev: Mapping[str, Any], root: Path, level: float) -> dict[str, Any]:
    pred, expl = ev["predict"], ev["explain"]
    path = None if name == "base" else _STUDENT_DIRS[name]
    config_path = root / path / "student_config.json" if path else None
    steps_ = json.loads(config_path.read_text()).get("steps") if config_path and config_path.is_file() else None
    return {"key": name, "label": _LABELS[name], "path": path, **_share(pred["correct"], pred["n"], level),
            "n_unparsed": pred.get("n_unparsed"),
            "explain": {**_share(expl["correct"], expl["n"], level), "n_unparsed": expl.get("n_unparsed")},
            "training_steps": steps_}


def _metrics(cfg: DistillConfig, root: Path, seed: int, teacher: Any, student: Any, train_p: Sequence[Problem],
             test_p: Sequence[Problem], train_rows: Sequence[Mapping[str, Any]], test_rows: Sequence[Mapping[str, Any]],
             rat_rows: Sequence[Mapping[str, Any]], sev_rows: Sequence[Mapping[str, Any]],
             evals: Mapping[str, Mapping[str, Any]], probe_res: Mapping[str, Any] | None,
             teacher_settings: Mapping[str, Any]) -> dict[str, Any]:
    level = cfg.level
    s_train = teacher_summary(train_rows, level=level)
    s_test = teacher_summary(test_rows, level=level)
    students = {name: _student_row(name, evals[name], root, level) for name in STUDENTS}
    teacher_acc = {"majority_vote": {"key": "teacher_majority_vote",
                                     "label": f"teacher, majority vote of its {cfg.k} rationales",
                                     **_from_summary(s_test["majority_vote_accuracy"], level)},
                   "per_rationale": {"key": "teacher_per_rationale", "label": "teacher, per rationale",
                                     **_from_summary(s_test["rationale_accuracy"], level)}}
    se = evals["multi_self_eval"]["self_eval"]
    student_self_eval = {**_share(se["correct"], se["n"], level),
                         **{k: se[k] for k in ("decided_accuracy", "n_decided", "label_counts", "answers_right")}}
    comparisons = []
    for a, b in (("single", "base"), ("multi", "base"), ("multi_self_eval", "base"), ("multi", "single"),
                 ("multi_self_eval", "multi"), ("multi_self_eval", "single")):
        for task in ("predict", "explain"):
            ca = students[a] if task == "predict" else students[a]["explain"]
            cb = students[b] if task == "predict" else students[b]["explain"]
            comparisons.append({"a": a, "b": b, "task": task, "verdict": _verdict(ca, cb)})
    # the teacher's self-evaluation: text (majority of its m labels) and probe, on the same test rationales
    text = text_agreement(test_rows, level=level)
    control = majority_control(train_rows, test_rows, level=level)
    all_evals = _from_summary(s_test["self_eval_agreement_all"], level)
    probe_cell = None
    if probe_res is not None and probe_res.get("agreement"):
        a = probe_res["agreement"]
        probe_cell = {**_share(a["correct"], a["n"], level), "auc": a.get("auc"), "per_class": a.get("per_class"),
                      "n_seen_questions": a.get("n_seen_questions")}
    if probe_cell is None:
        better = "probe not fitted" if cfg.probe else "probe off"
    else:
        v = _verdict(probe_cell, text)
        better = {"above": "probe", "below": "text"}.get(v, v)
    costs = load_costs(root / "teacher")
    measured = costs.rows or 0

    def per_q(d: Mapping[str, Any]) -> dict[str, float | None]:
        return {f"{k}_per_question": (float(d[k]) / measured if measured else None)
                for k in ("prompt_tokens", "generated_tokens", "forward_passes", "wall_seconds")}

    n_train = len(train_rows)
    data = {"questions": n_train, "rationale_rows": len(rat_rows), "self_eval_rows": len(sev_rows),
            "rationale_rows_per_question": len(rat_rows) / n_train if n_train else None,
            "self_eval_rows_per_question": len(sev_rows) / n_train if n_train else None,
            "correct_rationale_rows": sum(1 for r in rat_rows if r.get("correct")),
            "self_eval_labels": dict(Counter(str(r.get("label")) for r in sev_rows)),
            "correct_only": cfg.correct_only, "teacher_yield": s_train["yield"]}
    table = [teacher_acc["majority_vote"], teacher_acc["per_rationale"], *students.values()]
    return {
        "config": dataclasses.asdict(cfg), "seed": seed, "level": level,
        "teacher": {"source": _source(teacher), "model_id": teacher_settings.get("model")},
        "student_source": _source(student),
        "split": {"problems": cfg.problems, "n_train": len(train_p), "n_test": len(test_p)},
        "table": table, "students": students, "teacher_accuracy": teacher_acc,
        "student_self_eval": student_self_eval, "comparisons": comparisons,
        "self_evaluation": {"text": text, "text_all_evaluations": all_evals, "probe": probe_cell, "better": better,
                            "control": control,
                            "probe_fit": None if probe_res is None else {
                                k: probe_res.get(k) for k in ("fitted", "reason", "n_train_rationales",
                                                              "n_test_rationales", "probe")}},
        "teacher_summary": {"train": s_train, "test": s_test},
        "data": data,
        "costs": {"teacher": costs.to_dict(), "questions_measured": measured, **per_q(costs.to_dict()),
                  "phases": {p: per_q(v) for p, v in costs.phases.items()}},
    }


# ------------------------------------------------------------------------------------------------ the report


def _pct(cell: Mapping[str, Any] | None) -> str:
    if not cell or cell.get("accuracy") is None:
        return "-"
    return f"{cell['accuracy']:.3f} [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}] ({cell['correct']}/{cell['n']})"


def _num(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def distill_markdown(metrics: Mapping[str, Any]) -> str:
    """``report.md`` of a distill run (from ``metrics.json``'s content)."""
    pct = round(metrics["level"] * 100)
    cfg, split = metrics["config"], metrics["split"]
    lines = ["# Mind's Mirror: distilling rationales and self-evaluation", "",
             f"Teacher `{metrics['teacher']['model_id']}` ({metrics['teacher']['source']}), students from "
             f"`{metrics['student_source']}`; {split['n_train']} train and {split['n_test']} test questions "
             f"({split['problems']}), k = {cfg['k']} rationales and m = {cfg['m']} self-evaluations each, seed "
             f"{metrics['seed']}. Every figure has a {pct}% Wilson interval; where two intervals overlap the two "
             "are *not distinguishable at this size*.", "",
             f"## Accuracy on the {split['n_test']} test questions", "",
             "| model | predict: (greedy) | explain: (greedy) |", "|---|---|---|"]
    for cell in metrics["teacher_accuracy"].values():
        lines.append(f"| {cell['label']} | {_pct(cell)} | - |")
    for s in metrics["students"].values():
        lines.append(f"| {s['label']} | {_pct(s)} | {_pct(s['explain'])} |")
    lines += ["", "The teacher answers with its sampled rationales (the data it gave); the students answer greedily "
              "as `predict: <question>` (the answer alone) and `explain: <question>` (a rationale ending \"The answer "
              "is X.\"), the answer read by the teacher's extraction rules. Above / below: the intervals do not "
              "overlap.", ""]
    pairs: dict[tuple[str, str], list[str]] = {}
    for c in metrics["comparisons"]:
        pairs.setdefault((c["a"], c["b"]), []).append(f"{c['task']}: {c['verdict']}")
    for (a, b), verdicts in pairs.items():
        lines.append(f"- {metrics['students'][a]['label']} vs {metrics['students'][b]['label']}: "
                     f"{'; '.join(verdicts)}.")
    se = metrics["student_self_eval"]
    lines += ["", "## The full student's self-evaluation of its own answers", "",
              f"Asked `predict: <question>\\nProposed solution: <its explain: answer>`, its label agrees with gold "
              f"(\"correct\" on a right answer, \"wrong\" on a wrong one) in {_pct(se)}; of the decided labels "
              f"(correct or wrong) {_num(se['decided_accuracy'], '.3f')} ({se['n_decided']} decided). Labels: "
              + ", ".join(f"{k} {v}" for k, v in se["label_counts"].items())
              + f"; {se['answers_right']} of its {se['n']} answers were right.", ""]
    sev = metrics["self_evaluation"]
    lines += ["## The teacher's self-evaluation: text and probe", "",
              "On the test questions' rationales with a readable answer (the same rationales for both):", "",
              "| self-evaluation | agreement with gold |", "|---|---|",
              f"| text, majority of its {cfg['m']} labels per rationale | {_pct(sev['text'])} |",
              f"| text, every evaluation (unparsed = disagrees) | {_pct(sev['text_all_evaluations'])} |"]
    if sev["probe"] is not None:
        auc = sev["probe"].get("auc")
        lines.append(f"| answer probe (residual stream at the answer, fitted on the train questions) | "
                     f"{_pct(sev['probe'])}" + (f", AUC {auc:.3f}" if auc is not None else "") + " |")
    control = sev.get("control")
    if control is not None:
        lines.append(f"| control: always \"{control['label']}\" (the train rationales' more common class) | "
                     f"{_pct(control)} |")
    if control is not None:
        beat = [name for name, cell in (("text", sev["text"]), ("probe", sev["probe"]))
                if cell is not None and _verdict(cell, control) == "above"]
        lines += ["", "Above the constant control (intervals do not overlap): " + (", ".join(beat) if beat else
                  "neither; an agreement figure at or below the control says nothing about correctness beyond "
                  "the base rate") + "."]
    better = sev["better"]
    if better in ("probe", "text"):
        lines += ["", f"The {better} self-evaluation agrees better with gold (the intervals do not overlap)."]
    elif better == "not distinguishable at this size":
        lines += ["", "Probe and text self-evaluation are not distinguishable at this size (the intervals overlap)."]
    else:
        fit = sev.get("probe_fit") or {}
        lines += ["", f"No probe comparison: {better}" + (f" ({fit['reason']})" if fit.get("reason") else "") + "."]
    ts = metrics["teacher_summary"]["train"]
    data, costs = metrics["data"], metrics["costs"]
    lines += ["", "## Teacher data (train questions)", "",
              f"- rationale accuracy {_pct(_cell(ts['rationale_accuracy']))}, answer read in "
              f"{_pct(_cell(ts['answer_extraction_rate']))}, finished in {_pct(_cell(ts['finished_rate']))};",
              f"- self-evaluation labels read in {_pct(_cell(ts['label_parse_rate']))}, agreeing with gold in "
              f"{_pct(_cell(ts['self_eval_agreement']))} of the read ones;",
              f"- yield: {data['rationale_rows']} rationale rows ({_num(data['rationale_rows_per_question'], '.2f')} "
              f"per question, {data['correct_rationale_rows']} right) and {data['self_eval_rows']} self-evaluation "
              f"rows ({_num(data['self_eval_rows_per_question'], '.2f')} per question)"
              + (", right rationales only" if data["correct_only"] else "") + ".", "",
              "## Teacher cost per question (train and test)", "",
              "| phase | prompt tokens | generated tokens | forward passes | wall s |", "|---|---|---|---|---|"]
    rows = [("all", costs), *[(p, v) for p, v in costs["phases"].items()]]
    for name, c in rows:
        label = {"generation": "generation (rationales)", "labelling": "labelling (self-evaluations)"}.get(name, name)
        lines.append(f"| {label} | {_num(c['prompt_tokens_per_question'], '.0f')} | "
                     f"{_num(c['generated_tokens_per_question'], '.0f')} | {_num(c['forward_passes_per_question'])} | "
                     f"{_num(c['wall_seconds_per_question'], '.2f')} |")
    lines += ["", f"Measured over the {costs['questions_measured']} questions made in the teacher's last run "
              "(a resumed run counts only what it made).", ""]
    return "\n".join(lines) + "\n"


def _cell(share: Mapping[str, Any]) -> dict[str, Any]:
    return {"accuracy": share["rate"], "n": share["n"], "correct": share["successes"], "ci_low": share["ci_low"],
            "ci_high": share["ci_high"]}
