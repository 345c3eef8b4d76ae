"""``icon2-lens distill data|train|run``: Mind's Mirror from the command line.

- ``distill data --out DIR``: problems, the split, the teacher's rationales and self-evaluations, the two
  datasets and the teacher's summary (`icon2_lens.pipeline.distill_run.run_distill` up to its data step);
- ``distill train --data DIR --out DIR``: one student from those datasets (`icon2_lens.distill.student`);
- ``distill run --out DIR``: everything at the demo size, resumable: data, the answer probe, three students, their
  test accuracy, ``metrics.json`` and ``report.md``.

``run``'s options are generated from `icon2_lens.pipeline.distill_run.DistillConfig` (``data`` takes its problem
and teacher options), ``train``'s from `icon2_lens.distill.student.StudentConfig`, as every stage command's are.

    icon2-lens distill run --out runs/distill
    icon2-lens distill data --teacher path/to/teacher --problems svamp.jsonl --n-problems 200 --k 5 --m 5 --out runs/mm
    icon2-lens distill train --data runs/mm --out runs/mm-student --mode single --no-self-eval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..distill.student import StudentConfig, train_student
from ..hardware import resolve_device
from ..pipeline.distill_run import DISTILL_METRICS, DistillConfig, run_distill
from ..runs.io import check_output_folder, read_jsonl
from .options import add_config_options, config_from_args

__all__ = ["distill_args", "distill_command", "distill_config", "DATA_FIELDS"]

#: The `DistillConfig` fields ``distill data`` takes (the problems and the teacher; the rest is training and
#: evaluation).
DATA_FIELDS = ("problems", "n_problems", "test_fraction", "k", "m", "temperature", "top_p", "max_new_tokens",
               "eval_tokens", "eval_temperature", "eval_prefix", "teacher_batch_size", "correct_only", "level")
_MODES = ("multi", "single")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _model_arg(p: argparse.ArgumentParser, which: str) -> None:
    what = ("the teacher that writes the rationales and self-evaluations" if which == "teacher" else
            "the student's starting weights (each student is a fresh copy)")
    p.add_argument(f"--{which}", default=None, metavar="MODEL",
                   help=f"{what}: omit for the embedded SmolLM2-135M-Instruct; an HF folder, a .gguf file or an HF "
                        "id in the local cache")


def distill_args(p: argparse.ArgumentParser) -> None:
    """``icon2-lens distill data|train|run``: one sub-command each, with their config's options."""
    sub = p.add_subparsers(dest="distill_command", required=True, metavar="{data,train,run}")
    dp = sub.add_parser("data", help="problems, split, the teacher's k rationales and m self-evaluations of each, the "
                                     "rationale and self-evaluation datasets and the teacher's summary")
    dp.add_argument("--out", required=True, type=Path,
                    help="output folder: problems/, teacher/ (teacher.jsonl, costs.json), data/ (rationales.jsonl, "
                         "self_eval.jsonl, teacher_summary.json, provenance.json); a rerun resumes, and "
                         "`distill run --out` on it reuses them")
    _model_arg(dp, "teacher")
    dp.add_argument("--seed", type=int, default=0, help="seed of the problems, the split and the sampling")
    _common(dp)
    add_config_options(dp, DistillConfig, skip=tuple(f.name for f in dataclasses.fields(DistillConfig)
                                                     if f.name not in DATA_FIELDS))
    tp = sub.add_parser("train", help="one student from the datasets of `distill data`: the two-task loss, "
                                      "self-evaluation first (the full method), or the single-rationale baseline")
    tp.add_argument("--data", required=True, type=Path,
                    help="a `distill data` (or `distill run`) folder, or its data/ folder (rationales.jsonl and "
                         "self_eval.jsonl)")
    tp.add_argument("--out", required=True, type=Path,
                    help="the student's folder (an HF folder load_model opens, with train_log.jsonl and "
                         "student_config.json)")
    tp.add_argument("--mode", default="multi", metavar="{multi,single}",
                    help="'multi': every rationale (Mind's Mirror); 'single': one per question, the first right one "
                         "(the ablation baseline) (default: multi)")
    tp.add_argument("--self-eval", dest="self_eval", action=argparse.BooleanOptionalAction, default=True,
                    help="train on the teacher's self-evaluations first, then on the rationales (the full method; "
                         "default: on)")
    tp.add_argument("--correct-only", action="store_true",
                    help="only the rationales whose answer matches the gold one (not the paper's default)")
    _model_arg(tp, "student")
    tp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _common(tp)
    add_config_options(tp, StudentConfig)
    rp = sub.add_parser("run", help="everything at the demo size, resumable: data, the answer probe, single-, "
                                    "multi-rationale and full students, their test accuracy, metrics.json, "
                                    "report.md")
    rp.add_argument("--out", required=True, type=Path,
                    help="run folder: problems/, teacher/, data/, probe/, students/{single,multi}/, student/ (the "
                         "full method: an HF folder load_model opens), eval/, metrics.json, report.md, steps.json; "
                         "a rerun resumes and re-runs only what a changed setting touches")
    _model_arg(rp, "teacher")
    _model_arg(rp, "student")
    rp.add_argument("--seed", type=int, default=0,
                    help="seed of the problems, the split, the teacher's sampling and the students' training")
    _common(rp)
    add_config_options(rp, DistillConfig)


def distill_config(args: argparse.Namespace) -> Any:
    """The sub-command's config from the command line: `StudentConfig` for ``train``, else `DistillConfig`."""
    if args.distill_command == "train":
        return config_from_args(args, StudentConfig)
    return config_from_args(args, DistillConfig)


def _data_files(folder: Path) -> tuple[Path, Path]:
    for base in (folder / "data", folder):
        if (base / "rationales.jsonl").is_file():
            return base / "rationales.jsonl", base / "self_eval.jsonl"
    if not folder.exists():
        raise FileNotFoundError(f"--data {folder} does not exist; make the teacher's data first: "
                                f"icon2-lens distill data --out {folder}")
    raise FileNotFoundError(f"--data {folder} holds no rationales.jsonl (nor data/rationales.jsonl); pass the folder "
                            "of `icon2-lens distill data --out DIR`.")


def _train(args: argparse.Namespace, cfg: StudentConfig) -> list[Path]:
    if args.mode not in _MODES:
        raise ValueError(f"Unknown --mode {args.mode!r}; use 'multi' (every rationale: Mind's Mirror) or 'single' (one "
                         "rationale per question: the baseline).")
    rat_path, sev_path = _data_files(args.data)
    if args.self_eval and not sev_path.is_file():
        raise FileNotFoundError(f"{sev_path} does not exist; pass --no-self-eval to train on the rationales alone.")
    check_output_folder(args.out, overwrite=args.overwrite)  # before anything is loaded
    rat = read_jsonl(rat_path)
    if args.correct_only:
        rat = [r for r in rat if r.get("correct")]
    sev = read_jsonl(sev_path) if args.self_eval else None
    res = train_student(rat, sev, config=cfg, mode=args.mode, model_source=args.student, output_dir=args.out,
                        device=args.device, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"student ({args.mode}{' + self-evaluation' if args.self_eval else ''}): steps {res.steps}, examples "
          f"{res.n_examples}")
    return [res.output_dir, res.log_path, res.config_path]


def distill_command(args: argparse.Namespace, cfg: Any) -> list[Path]:
    """Run ``icon2-lens distill data|train|run``; return the paths it wrote."""
    resolve_device(args.device)  # an unknown device, or CUDA where there is none: an error before any work
    if args.distill_command == "train":
        return _train(args, cfg)
    if args.distill_command == "data":
        res = run_distill(cfg, teacher=args.teacher, out=args.out, seed=args.seed, device=args.device,
                          progress=not args.no_progress, stop_after="data")
        data = args.out / "data"
        summary = json.loads((data / "teacher_summary.json").read_text())["train"]
        print(json.dumps({k: summary[k]["rate"] for k in ("rationale_accuracy", "answer_extraction_rate",
                                                           "label_parse_rate", "self_eval_agreement")}
                         | {"yield": summary["yield"]}, indent=2))
        return [res.out / "problems", res.out / "teacher", data / "rationales.jsonl", data / "self_eval.jsonl",
                data / "teacher_summary.json", data / "provenance.json"]
    res = run_distill(cfg, teacher=args.teacher, student=args.student, out=args.out, seed=args.seed,
                      device=args.device, progress=not args.no_progress)
    for row in res.metrics["table"]:
        acc = row["accuracy"]
        print(f"{row['label']:52s} " + ("-" if acc is None else
                                         f"{acc:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']})"))
    return [p for p in (res.report, res.out / DISTILL_METRICS, res.student) if p is not None]
