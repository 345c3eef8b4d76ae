"""The ``icon2-lens`` command line: one subcommand per stage.

    icon2-lens extract --out runs/directions --stability   # embedded model, default criteria, built-in feature set
    icon2-lens layers --directions runs/directions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _add_selection_args(p: argparse.ArgumentParser, *, note: str = "") -> None:
    """The selection rule of `select_instructions` (one of three) and ``--balance-criteria``."""
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--top-fraction", type=float, default=None, help=f"{note}keep this share (default 0.1)")
    rule.add_argument("--top-k", type=int, default=None, help=f"{note}keep the best K")
    rule.add_argument("--threshold", type=float, default=None, help=f"{note}keep consistency >= this")
    p.add_argument("--balance-criteria", action="store_true", help=f"{note}apply the rule within each assigned criterion")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model source: omit for the embedded SmolLM2-135M-Instruct; an HF folder, a .gguf file or an HF id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--allow-download", action="store_true", help="let transformers download an HF id (offline otherwise)")
    p.add_argument("--chat-template", default=None, type=Path,
                   help="file with a Jinja chat template, for models whose tokenizer has none")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from .models import load_model

    template = None
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise FileNotFoundError(f"--chat-template {args.chat_template} does not exist; pass a file with a Jinja template.")
        template = args.chat_template.read_text(encoding="utf-8")
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                      local_files_only=not args.allow_download, chat_template=template)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``icon2-lens`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="icon2-lens",
        description="Preference data from a model's own residual stream (Icon2) on TransformerLens hook points.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract criterion direction vectors into a DirectionSet folder")
    _add_model_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (directions.safetensors + directions.json)")
    p.add_argument("--criteria", default=None,
                   help="comma-separated default criteria (general,helpful,honest,harmless) or a YAML file; default: all four")
    p.add_argument("--instructions", default="default",
                   help="feature set: 'default' (built-in, 256), a .txt file (one per line) or a .jsonl file")
    p.add_argument("--n-instructions", type=int, default=None,
                   help="use only the first N instructions (default: all of --instructions; 'default' is 256)")
    p.add_argument("--method", default="pca", choices=["pca", "mean_diff", "pca_centered"])
    p.add_argument("--hook", default="resid_post", help="residual hook: resid_pre, resid_mid or resid_post")
    p.add_argument("--stability", action="store_true",
                   help="also measure split-half stability in the same pass (stored with the directions)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("layers", help="per-layer separation report and suggested steering range")
    _add_model_args(p)
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--heldout", default=None, help="held-out instructions (.txt/.jsonl); default: unused built-in ones")
    p.add_argument("--n-heldout", type=int, default=64)
    p.add_argument("--n-paraphrase-instructions", type=int, default=16)
    p.add_argument("--width", type=int, default=None, help="size of the suggested layer window (default: a third)")
    p.add_argument("--stability", action="store_true",
                   help="also compute split-half stability (a second extraction pass); not needed when the "
                        "directions were extracted with --stability, whose values the report shows anyway")
    p.add_argument("--instructions", default="default", help="feature set for --stability (default: built-in)")
    p.add_argument("--n-instructions", type=int, default=None, help="first N feature instructions for --stability")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for layer_report.{md,json,png} (default: the directions folder)")
    p.set_defaults(func=_cmd_layers)
    p = sub.add_parser("synthesize", help="let the model write instructions (Magpie-style) and clean them up")
    _add_model_args(p)
    p.add_argument("--n", required=True, type=int, help="number of generations (kept ones are fewer; see report.json)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: instructions.jsonl, dropped.jsonl, report.json, raw.jsonl; a rerun continues it")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.99)
    p.add_argument("--max-new-tokens", type=int, default=96, help="budget per user turn (longer ones are dropped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", default=None,
                   help="system prompt before the user turn (default: whatever the template inserts by itself)")
    p.add_argument("--min-words", type=int, default=3)
    p.add_argument("--max-words", type=int, default=200)
    p.add_argument("--near-duplicate-threshold", type=float, default=0.8,
                   help="character 5-gram Jaccard similarity counted as a near duplicate (1.0: exact only)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of continuing it")
    _add_shard_arg(p)
    p.set_defaults(func=_cmd_synthesize, batch_size=16)

    p = sub.add_parser("score", help="score instructions' inherent consistency with each criterion and select the best")
    _add_model_args(p)
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--instructions", required=True,
                   help="a `synthesize` output folder, a .txt/.jsonl file, or a saved datasets folder")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: scores.jsonl, selected.jsonl, consistency_hist.png, score_report.json")
    p.add_argument("--layers", default="all", help="'all' (default), 'suggested', a range '10-19' or a list '3,5,7'")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                   help="z-score each layer's projection with the feature-set statistics before averaging "
                        "(default); --no-standardize: the paper's raw Eq. 2")
    p.add_argument("--render", default="chat", choices=["chat", "raw"],
                   help="'chat' (user turn, no system message of our own) or 'raw' text")
    _add_selection_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_shard_arg(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("generate", help="bidirectional steered generation into DPO preference pairs")
    _add_model_args(p)
    _add_steering_args(p)
    p.add_argument("--gamma-pos", type=float, default=None, help="chosen-side strength (default: --gammas or built-in)")
    p.add_argument("--gamma-neg", type=float, default=None, help="rejected-side strength (default: --gammas or built-in)")
    p.add_argument("--gammas", type=Path, default=None, help="gammas.yaml (or its folder) written by `calibrate`")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", default="hf", choices=["hf", "bridge"], help="fast HF path (default) or the bridge")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of continuing it")
    _add_shard_arg(p)
    p.set_defaults(func=_cmd_generate, batch_size=8)

    p = sub.add_parser("calibrate", help="sweep gamma+ / gamma- and pick them by the paper's rule")
    _add_model_args(p)
    _add_steering_args(p)
    p.add_argument("--n", type=int, default=32, help="instructions in the sweep (the first N of the table)")
    p.add_argument("--gammas-pos", default="0.02,0.05,0.1,0.2", help="comma-separated grid of gamma+")
    p.add_argument("--gammas-neg", default="-0.02,-0.05,-0.1,-0.2", help="comma-separated grid of gamma-")
    p.add_argument("--scorer", default="probe",
                   help="'probe' (default: the model's own reading along the direction), 'judge' (the model as a "
                        "pairwise judge, both orders), or a local HF reward-model folder")
    p.add_argument("--win-threshold", type=float, default=0.9)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_calibrate, batch_size=16)

    p = sub.add_parser("train", help="DPO on preference pairs with TRL; saves a model folder load_model opens")
    _add_model_args(p)
    p.add_argument("--pairs", required=True, type=Path, help="a `generate` output folder or its pairs.jsonl")
    p.add_argument("--out", required=True, type=Path, help="output folder (the trained model, log and curve)")
    p.add_argument("--preset", default="demo", choices=["demo", "paper"])
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--gradient-accumulation", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (needs peft), merged on save")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_train, batch_size=None)

    p = sub.add_parser("evaluate", help="base vs trained model on held-out instructions (probe shift, judge, degeneration)")
    _add_model_args(p)
    p.add_argument("--trained", required=True, help="the trained model folder (from `train`)")
    p.add_argument("--directions", required=True, type=Path, help="the base model's DirectionSet folder")
    p.add_argument("--instructions", default="heldout",
                   help="held-out instructions: a built-in set (default 'heldout'), a .txt/.jsonl file or folder")
    p.add_argument("--n", type=int, default=None, help="use only the first N instructions")
    p.add_argument("--judge", default=None, help="judge model source (default: the base model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", required=True, type=Path, help="output folder: report.md, metrics.json, PNG, AlpacaEval JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_evaluate, batch_size=8)

    p = sub.add_parser("run", help="the whole method, resumable: extract, layers, synthesize, score, generate, "
                                   "train, evaluate (default: the demo size on the embedded model)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (unknown keys and wrong types are errors); default: the run directory's "
                        "config.yaml, else the built-in demo config")
    p.add_argument("--out", type=Path, default=Path("runs/icon2"), help="run directory (default runs/icon2)")
    p.add_argument("--update", action="store_true",
                   help="apply a --config that differs from the run directory's: re-runs the changed stages and "
                        "those downstream of them")
    p.add_argument("--stop-after", default=None, help="stop after this stage (e.g. generate)")
    p.add_argument("--print-config", action="store_true", help="print the full default config as YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("merge", help="merge the shard folders of a sharded synthesize/score/generate run (--shard i/n)")
    p.add_argument("stage", choices=["synthesize", "score", "generate"], help="the stage the shards ran")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR",
                   help="the shard output folders, every shard i/n exactly once")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: the files the unsharded command writes (generate: report.json without "
                        "the model's win share)")
    _add_selection_args(p, note="score: ")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_merge)
    return parser


def _cmd_run(args: argparse.Namespace) -> list[Path]:
    import yaml

    from .pipeline import RunConfig, run_pipeline

    if args.print_config:
        print(yaml.safe_dump(RunConfig().to_dict(), sort_keys=False), end="")
        return []
    res = run_pipeline(args.config, out=args.out, update=args.update, stop_after=args.stop_after,
                       progress=not args.no_progress)
    print(f"\nreport: {res.report}")
    return [res.report, args.out / "config.yaml", args.out / "manifest.json"]


def _cmd_evaluate(args: argparse.Namespace) -> list[Path]:
    import json

    import torch

    from .directions import DirectionSet
    from .evaluation import PairwiseJudge, evaluate
    from .runs.io import check_output_folder
    from .instructions import load_instructions
    from .models import load_model

    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    instructions = load_instructions(args.instructions, limit=args.n)
    base = _load(args)
    trained = load_model(args.trained, device=args.device, dtype=getattr(torch, args.dtype))
    judge = PairwiseJudge(load_model(args.judge, device=args.device)) if args.judge else None
    metrics = evaluate(base, trained, dirs, instructions, judge=judge, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print((args.out / "report.md").read_text())
    print(json.dumps(metrics["judge"]))
    return [args.out / n for n in ("report.md", "metrics.json", "probe_shift.png", "alpaca_eval_base.json",
                                   "alpaca_eval_trained.json")]


def _cmd_train(args: argparse.Namespace) -> list[Path]:
    from .training import train_dpo

    res = train_dpo(args.pairs, model_source=args.model, output_dir=args.out, preset=args.preset, beta=args.beta,
                    learning_rate=args.learning_rate, epochs=args.epochs, max_length=args.max_length,
                    batch_size=args.batch_size, gradient_accumulation=args.gradient_accumulation,
                    max_steps=args.max_steps, lora=args.lora, seed=args.seed, device=args.device,
                    overwrite=args.overwrite, progress=not args.no_progress)
    if res.history:
        first, last = res.history[0], res.history[-1]
        print(f"{res.steps} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
              f"reward accuracy {last.get('reward_accuracy', float('nan')):.2f}, "
              f"margin {last.get('reward_margin', float('nan')):.3f}")
    return [res.output_dir, res.log_path, res.curve_path]


def _add_steering_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--instructions", required=True,
                   help="a `score` output folder (its selected.jsonl) or a JSONL file with instruction and criterion")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--layers", default=None, help="'suggested' (default), 'all', '15-24' or '3,5,7'")
    p.add_argument("--scale", default=None, choices=["relative", "unit"], help="default: relative")
    p.add_argument("--positions", default=None, choices=["all", "generated"], help="default: all")
    p.add_argument("--criterion", default=None, help="steer every instruction along this criterion")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: 1.1")


_STEERING_DEFAULTS = {"layers": "suggested", "scale": "relative", "positions": "all", "max_new_tokens": 128,
                      "repetition_penalty": 1.1}


def _resolve_steering(args: argparse.Namespace, cfg: dict) -> None:
    """Fill unset steering options: the command line first, then a gammas.yaml, then the defaults."""
    for key, default in _STEERING_DEFAULTS.items():
        if getattr(args, key) is None:
            value = cfg.get(key, default)
            if key == "layers" and isinstance(value, list):
                value = ",".join(str(x) for x in value)
            setattr(args, key, value)


def _steering_layers(args: argparse.Namespace, dirs):  # noqa: ANN001, ANN202
    from .scoring import scoring_layers

    spec = _parse_layers(args.layers)
    return scoring_layers(dirs, spec)  # type: ignore[arg-type]


def _cmd_generate(args: argparse.Namespace) -> list[Path]:
    import json
    import shutil

    from .calibration import load_gammas
    from .directions import DirectionSet
    from .pairs import DEFAULT_GAMMA_NEG, DEFAULT_GAMMA_POS, _table_rows, generate_pairs

    shard = _shard_from_args(args)
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"{args.out} exists and is a file; choose another output folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "generation.json").is_file():
        raise FileExistsError(f"Output folder {args.out} exists and holds no generation run; choose another folder.")
    dirs = DirectionSet.load(args.directions)
    cfg = load_gammas(args.gammas) if args.gammas is not None else {}
    _resolve_steering(args, cfg)
    layers = _steering_layers(args, dirs)
    gamma_pos = args.gamma_pos if args.gamma_pos is not None else cfg.get("gamma_pos", DEFAULT_GAMMA_POS)
    gamma_neg = args.gamma_neg if args.gamma_neg is not None else cfg.get("gamma_neg", DEFAULT_GAMMA_NEG)
    table = _table_rows(args.instructions, args.criterion, dirs)  # fail early on a bad table
    if args.out.is_dir() and args.overwrite:
        shutil.rmtree(args.out)
    model = _load(args)
    pairs = generate_pairs(
        model, dirs, table, gamma_pos=gamma_pos, gamma_neg=gamma_neg, layers=layers, scale=args.scale,
        positions=args.positions, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        batch_size=args.batch_size, seed=args.seed, path=args.path, out=args.out, progress=not args.no_progress,
        shard=shard)
    if shard is not None:  # the pair report needs all pairs: `icon2-lens merge generate` writes it
        print(f"shard {shard[0]}/{shard[1]}: {len(pairs)} pairs")
        return [args.out / "pairs.jsonl", args.out / "generation.json", args.out / "shard.json"]
    from .evaluation import ProbeScorer, pair_report
    from .runs.io import atomic_write_text

    report = pair_report(pairs, scorer=ProbeScorer(model, dirs, layers=layers))
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    return [args.out / "pairs.jsonl", args.out / "generation.json", args.out / "report.json"]


def _cmd_calibrate(args: argparse.Namespace) -> list[Path]:
    from .calibration import calibrate_gamma
    from .directions import DirectionSet
    from .runs.io import check_output_folder
    from .pairs import _table_rows

    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    _resolve_steering(args, {})
    layers = _steering_layers(args, dirs)
    try:
        gp = [float(x) for x in args.gammas_pos.split(",") if x.strip()]
        gn = [float(x) for x in args.gammas_neg.split(",") if x.strip()]
    except ValueError:
        raise ValueError("--gammas-pos/--gammas-neg must be comma-separated numbers, e.g. 0.05,0.1") from None
    table = _table_rows(args.instructions, args.criterion, dirs)
    model = _load(args)
    if args.scorer == "probe":
        scorer = None
    elif args.scorer == "judge":
        from .evaluation import PairwiseJudge

        scorer = PairwiseJudge(model)
    else:
        from .evaluation import RewardModelScorer

        scorer = RewardModelScorer(args.scorer, device=args.device, local_files_only=not args.allow_download)
    result = calibrate_gamma(
        model, dirs, table, n=args.n, gammas_pos=gp, gammas_neg=gn, scorer=scorer, win_threshold=args.win_threshold,
        layers=layers, scale=args.scale, positions=args.positions, criterion=args.criterion,
        max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty, batch_size=args.batch_size,
        progress=not args.no_progress)
    print(result.table())
    return list(result.save(args.out).values())


def _parse_layers(text: str) -> str | list[int]:
    if text in ("all", "suggested"):
        return text
    try:
        if "-" in text.strip("-") and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: use 'all', 'suggested', a range like '10-19' or a list like '3,5,7'.") from None


def _cmd_synthesize(args: argparse.Namespace) -> list[Path]:
    import json
    import shutil

    from .synthesis import synthesize_instructions, synthesis_report

    shard = _shard_from_args(args)
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"{args.out} exists and is a file; choose another output folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "synthesis.json").is_file():
        raise FileExistsError(f"Output folder {args.out} exists and holds no synthesis run; choose another folder "
                              "(--overwrite only replaces an earlier synthesis run).")
    if args.out.is_dir() and args.overwrite:
        shutil.rmtree(args.out)
    model = _load(args)
    ds = synthesize_instructions(
        model, args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, system_prompt=args.system_prompt, min_words=args.min_words,
        max_words=args.max_words, near_duplicate_threshold=args.near_duplicate_threshold, out=args.out,
        progress=not args.no_progress, shard=shard)
    if shard is not None:  # clean-up and de-duplication need all shards: `icon2-lens merge synthesize`
        print(f"shard {shard[0]}/{shard[1]}: {synthesis_report(ds)['generated']} generations (cleaned by the merge)")
        return [args.out / n for n in ("raw.jsonl", "synthesis.json", "shard.json")]
    print(json.dumps(synthesis_report(ds), indent=2))
    return [args.out / n for n in ("instructions.jsonl", "dropped.jsonl", "report.json", "raw.jsonl")]


def _cmd_score(args: argparse.Namespace) -> list[Path]:
    import json

    from .directions import DirectionSet
    from .runs.io import check_output_folder
    from .instructions import load_instructions
    from .scoring import save_scores, score_instructions

    shard = _shard_from_args(args)
    selection = {"top_fraction": args.top_fraction, "top_k": args.top_k, "threshold": args.threshold,
                 "balance_criteria": args.balance_criteria}
    if shard is not None and (any(selection[k] is not None for k in ("top_fraction", "top_k", "threshold"))
                              or args.balance_criteria):
        raise ValueError("A shard is not selected on its own (the selection needs all rows); give --top-fraction, "
                         "--top-k, --threshold or --balance-criteria to `icon2-lens merge score` instead.")
    check_output_folder(args.out, overwrite=args.overwrite)
    layers = _parse_layers(args.layers)
    dirs = DirectionSet.load(args.directions)
    instructions = load_instructions(args.instructions)  # fail early on a bad file
    model = _load(args)
    table = score_instructions(model, dirs, instructions, layers=layers, standardize=args.standardize,
                               render=args.render, batch_size=args.batch_size, progress=not args.no_progress,
                               shard=shard)
    written = save_scores(table, args.out, overwrite=args.overwrite, **(selection if shard is None else {}))
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {len(table)} instructions scored")
        return written
    report = json.loads((args.out / "score_report.json").read_text())
    print(json.dumps({k: report[k] for k in ("scored", "selected", "criterion_all", "criterion_selected")}, indent=2))
    return written


def _cmd_merge(args: argparse.Namespace) -> list[Path]:
    import json

    from .pipeline.merge import merge_shards

    ds = merge_shards(args.stage, args.shards, out=args.out, overwrite=args.overwrite, top_fraction=args.top_fraction,
                      top_k=args.top_k, threshold=args.threshold, balance_criteria=args.balance_criteria)
    names = {"synthesize": ["instructions.jsonl", "dropped.jsonl", "report.json", "raw.jsonl", "synthesis.json"],
             "score": ["scores.jsonl", "selected.jsonl", "consistency_hist.png", "score_report.json"],
             "generate": ["pairs.jsonl", "generation.json", "report.json"]}[args.stage]
    summary = json.loads((args.out / names[2 if args.stage != "score" else 3]).read_text())
    if args.stage == "score":
        summary = {k: summary[k] for k in ("scored", "selected", "criterion_all", "criterion_selected")}
    elif args.stage == "generate":
        summary.pop("examples", None)
    print(f"merged {len(args.shards)} {args.stage} shards: {len(ds)} rows")
    print(json.dumps(summary, indent=2))
    return [args.out / n for n in names]


def _add_shard_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", default=None, metavar="i/n|auto",
                   help="run only shard i of n (from 0) of the batches, for data-parallel runs; 'auto': RANK/WORLD_SIZE "
                        "as set by accelerate launch or torchrun. '{shard}' in --out becomes i. Merge the shard "
                        "folders with `icon2-lens merge`")


def _shard_from_args(args: argparse.Namespace) -> tuple[int, int] | None:
    """Resolve --shard; put the shard index into --out's '{shard}' and pick cuda:LOCAL_RANK under a launcher."""
    from .runs.shards import parse_shard, shard_device

    if args.shard is None:
        if "{shard}" in str(args.out):
            raise ValueError(f"--out {args.out} contains '{{shard}}' but no --shard was given.")
        return None
    shard = parse_shard(args.shard)
    args.out = Path(str(args.out).replace("{shard}", str(shard[0])))
    if args.device is None:
        args.device = shard_device()
    return shard


def _cmd_extract(args: argparse.Namespace) -> list[Path]:
    from .directions import extract_directions
    from .runs.io import check_output_folder
    from .instructions import load_instructions

    check_output_folder(args.out, overwrite=args.overwrite)  # fail before the slow part
    instructions = load_instructions(args.instructions, limit=args.n_instructions)
    model = _load(args)
    dirs = extract_directions(model, args.criteria, instructions, method=args.method, hook=args.hook,
                              batch_size=args.batch_size, stability=args.stability, progress=not args.no_progress)
    dirs.save(args.out, overwrite=args.overwrite)
    print(dirs)
    return [args.out / "directions.safetensors", args.out / "directions.json"]


def _cmd_layers(args: argparse.Namespace) -> list[Path]:
    from .directions import DirectionSet
    from .instructions import load_instructions
    from .layers import layer_report, split_half_stability

    dirs = DirectionSet.load(args.directions)  # fail early on a bad folder
    model = _load(args)
    dirs.check_compatible(model)
    stability = None
    if args.stability and "stability" not in dirs.stats:
        stability = split_half_stability(model, dirs, load_instructions(args.instructions, limit=args.n_instructions),
                                         batch_size=args.batch_size, progress=not args.no_progress)
    report = layer_report(model, dirs, heldout=args.heldout, n_heldout=args.n_heldout,
                          n_paraphrase_instructions=args.n_paraphrase_instructions, width=args.width,
                          batch_size=args.batch_size, stability=stability, progress=not args.no_progress)
    print(report.table())
    meta_path = report.apply(dirs).update_meta_on_disk(args.directions)  # records suggested_layers
    written = report.save(args.out or args.directions)
    return [*written.values(), meta_path]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icon2-lens``. Returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        written = args.func(args)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # OSError: missing files, bad model folders
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"icon2-lens {args.command}: error: {msg}", file=sys.stderr)
        return 2
    if written:
        print("\nwrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
