"""The ``icon2-lens`` commands that are not one stage: calibrate (the gamma sweep), run (the whole
pipeline, resumable), merge (the shard folders of a sharded stage), serve (an OpenAI-compatible
chat endpoint, e.g. for a judge) and export (a criterion's steering vectors as a llama.cpp control
vector). The stage commands and the helpers every command shares are in `icon2_lens.cli.stage_commands`.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..calibration import DEFAULT_GRIDS, DEFAULT_N_BOOT, calibrate_gamma, calibration_sample
from ..directions import DirectionSet
from ..errors import BadInputError, check_finite
from ..gen.base import check_count
from ..hardware import resolve_device
from ..instructions import load_instructions
from ..judges import PairwiseJudge, RewardModelScorer, check_reward_model
from ..llama_cpp import llama_cpp_command
from ..pairs import PairsConfig
from ..pipeline import merge_shards, run_pipeline
from ..pipeline.config import RunConfig
from ..runs import names
from ..runs.io import check_output_folder
from ..scoring import ScoreConfig, scoring_layers
from ..serve import serve
from .options import given_options, parse_layers
from .stage_commands import SELECTION, load, steering_io_args

__all__ = ["calibrate_args", "calibrate_command", "run_args", "run_command", "merge_args", "merge_command",
           "serve_args", "serve_command", "export_args", "export_command"]


# ---- calibrate -----------------------------------------------------------------------------------------


def calibrate_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens calibrate``."""
    steering_io_args(p)
    p.add_argument("--n", type=int, default=32,
                   help="instructions in the sweep: a seeded random sample of the table's rows that are not training "
                        "rows (a score folder's scores.jsonl without its selected.jsonl rows, or --exclude)")
    p.add_argument("--gammas-pos", default=None,
                   help="comma-separated grid of gamma+ (default: the scale's grid, "
                        + "; ".join(f"{k}: {','.join(map(str, v[0]))}" for k, v in DEFAULT_GRIDS.items()) + ")")
    p.add_argument("--gammas-neg", default=None,
                   help="comma-separated grid of gamma- (default: the scale's grid, "
                        + "; ".join(f"{k}: {','.join(map(str, v[1]))}" for k, v in DEFAULT_GRIDS.items()) + ")")
    p.add_argument("--scorer", choices=("reward-probe", "self-probe", "judge"), default="reward-probe",
                   help="'reward-probe' (default: a linear probe fitted on human-written better/worse answers, its "
                        "held-out preference accuracy reported), 'self-probe' (the model's reading along the steering "
                        "directions themselves: circular, labelled), 'judge' (the model as a pairwise judge, both "
                        "orders)")
    p.add_argument("--reward-model", default=None, metavar="PATH",
                   help="a local HF sequence-classification reward model: score with it instead of --scorer")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="instructions never drawn (TXT, or JSONL with an 'instruction' field, e.g. a generate "
                        "folder's pairs.jsonl); default: a score folder's selected.jsonl")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT,
                   help=f"resamples of the instructions for the stability of the choice (default {DEFAULT_N_BOOT})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the generation and the bootstrap")
    p.add_argument("--win-threshold", type=float, default=0.9)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _grid(text: str | None, default: Sequence[float], flag: str) -> list[float]:
    """A comma-separated grid of finite numbers (``None``: ``default``)."""
    if text is None:
        return list(default)
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"--gammas-pos/--gammas-neg must be comma-separated numbers, e.g. 0.05,0.1; {flag} is "
                            f"{text!r}.",
                            option=flag.lstrip("-").replace("-", "_")) from None
    if not grid:
        raise BadInputError(f"{flag} is empty; give comma-separated numbers, e.g. 0.05,0.1.",
                            option=flag.lstrip("-").replace("-", "_"))
    for x in grid:
        check_finite(x, flag)
    return grid


def calibrate_command(args: argparse.Namespace, cfg: PairsConfig) -> list[Path]:
    """Run ``icon2-lens calibrate``; return the paths it wrote. Every option is checked before the model loads."""
    resolve_device(args.device)
    check_count(args.n, "--n")
    check_count(args.n_boot, "--n-boot")
    check_count(args.batch_size, "--batch-size")
    check_finite(args.win_threshold, "--win-threshold")
    if not 0 <= args.win_threshold < 1:
        raise BadInputError(f"--win-threshold must be in [0, 1), got {args.win_threshold}.", option="win_threshold")
    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    layers = scoring_layers(dirs, cfg.layers)
    gp = _grid(args.gammas_pos, DEFAULT_GRIDS[cfg.scale][0], "--gammas-pos")
    gn = _grid(args.gammas_neg, DEFAULT_GRIDS[cfg.scale][1], "--gammas-neg")
    if args.reward_model is not None:
        check_reward_model(args.reward_model, local_files_only=not args.allow_download)
    exclude = load_instructions(args.exclude) if args.exclude is not None else None
    with warnings.catch_warnings():  # fail early on a bad table, before loading the model; warnings come later
        warnings.simplefilter("ignore")
        calibration_sample(args.instructions, args.n, dirs, exclude=exclude, criterion=cfg.criterion, seed=args.seed)
    model = load(args)
    scorer: Any = args.scorer
    if args.reward_model is not None:
        scorer = RewardModelScorer(args.reward_model, device=args.device, local_files_only=not args.allow_download)
    elif args.scorer == "judge":
        scorer = PairwiseJudge(model)
    result = calibrate_gamma(
        model, dirs, args.instructions, n=args.n, gammas_pos=gp, gammas_neg=gn, scorer=scorer,
        win_threshold=args.win_threshold, layers=layers, scale=cfg.scale, positions=cfg.positions,
        criterion=cfg.criterion, max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
        batch_size=args.batch_size, seed=args.seed, exclude=exclude, n_boot=args.n_boot,
        progress=not args.no_progress)
    print(result.table())
    return list(result.save(args.out).values())


# ---- run / merge ---------------------------------------------------------------------------------------


def run_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens run``."""
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


def run_command(args: argparse.Namespace, cfg: None) -> list[Path]:
    """Run ``icon2-lens run``; return the paths it wrote."""
    import yaml

    if args.print_config:
        print(yaml.safe_dump(RunConfig().to_dict(), sort_keys=False), end="")
        return []
    res = run_pipeline(args.config, out=args.out, update=args.update, stop_after=args.stop_after,
                       progress=not args.no_progress)
    print(f"\nreport: {res.report}")
    return [res.report, args.out / names.CONFIG, args.out / names.MANIFEST]


def merge_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens merge``."""
    p.add_argument("stage", choices=list(names.SHARDABLE), help="the stage the shards ran")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR",
                   help="the shard output folders, every shard i/n exactly once")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: the files the unsharded command writes (generate: report.json without "
                        "the model's win share)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def merge_command(args: argparse.Namespace, cfg: ScoreConfig) -> list[Path]:
    """Run ``icon2-lens merge``; return the paths it wrote."""
    selection = {k: v for k, v in given_options(args, ScoreConfig).items() if k in SELECTION}
    ds = merge_shards(args.stage, args.shards, out=args.out, overwrite=args.overwrite, **selection)
    files = names.STAGE_FILES[args.stage].outputs
    summary_file = {"synthesize": names.SYNTHESIS_REPORT, "score": names.SCORE_REPORT,
                    "generate": names.PAIR_REPORT}[args.stage]
    summary = json.loads((args.out / summary_file).read_text())
    if args.stage == "score":
        summary = {k: summary[k] for k in ("scored", "selected", "criterion_all", "criterion_selected")}
    elif args.stage == "generate":
        summary.pop("examples", None)
    print(f"merged {len(args.shards)} {args.stage} shards: {len(ds)} rows")
    print(json.dumps(summary, indent=2))
    return [args.out / n for n in files]


# ---- serve ---------------------------------------------------------------------------------------------


def serve_args(p: argparse.ArgumentParser) -> None:
    """The options of ``icon2-lens serve``."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")


def serve_command(args: argparse.Namespace, cfg: None) -> list[Path]:
    """Run ``icon2-lens serve`` until Ctrl-C; it writes nothing."""
    serve(load(args), host=args.host, port=args.port)
    return []


# ---- export --------------------------------------------------------------------------------------------


def export_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens export``."""
    from ..directions import SCALES

    p.add_argument("--directions", required=True, type=Path, help="DirectionSet folder (from `icon2-lens extract`)")
    p.add_argument("--criterion", required=True, help="the criterion to export (one file per criterion)")
    p.add_argument("--out", required=True, type=Path, help="the control-vector file to write (e.g. helpful.gguf)")
    p.add_argument("--layers", default=None,
                   help="'suggested' (default when the directions have a suggested range), 'all' (every layer >= 1), "
                        "a range like '10-19' or a list like '3,5,7'; layer 0 cannot be exported")
    p.add_argument("--gamma", type=float, default=None,
                   help="bake this gamma into the file (apply with --control-vector); default: gamma 1, to be "
                        "scaled in llama.cpp with --control-vector-scaled FILE:GAMMA")
    p.add_argument("--scale", choices=SCALES, default="relative",
                   help="what gamma is measured in, as for `generate` (default relative)")


def export_command(args: argparse.Namespace, cfg: None) -> list[Path]:
    """Run ``icon2-lens export``: write the GGUF, print the llama.cpp command line; return the path."""

    dirs = DirectionSet.load(args.directions)
    check_finite(args.gamma, "--gamma")
    layers: list[int] | None
    if args.layers is None or args.layers == "suggested":
        if args.layers == "suggested" and not dirs.suggested_layers:
            raise BadInputError(f"{args.directions} has no suggested layers; run `icon2-lens layers --directions "
                                f"{args.directions}` first or pass --layers 10-19 / all.", option="layers")
        layers = None
    else:
        parsed = parse_layers(args.layers)
        layers = [x for x in dirs.layers if x >= 1] if isinstance(parsed, str) else parsed
    chosen = dirs.export_layers(layers)
    path = dirs.export_gguf(args.out, args.criterion, layers=chosen, gamma=args.gamma, scale=args.scale)
    print(f"wrote {path}: criterion {args.criterion!r}, blocks {chosen[0]}..{chosen[-1]} ({len(chosen)} layers), "
          f"scale {args.scale}, " + ("gamma 1 (scale it in llama.cpp)" if args.gamma is None
                                     else f"gamma {args.gamma!r} baked in"))
    print(llama_cpp_command(path, layers=chosen, baked=args.gamma is not None))
    return [path]
