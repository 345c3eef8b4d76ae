"""The ``icon2-lens`` commands that are not one stage: calibrate (the gamma sweep), run (the whole
pipeline, resumable), merge (the shard folders of a sharded stage) and serve (an OpenAI-compatible
chat endpoint, e.g. for a judge). The stage commands and the
helpers every command shares are in `icon2_lens.cli.stage_commands`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..calibration import DEFAULT_GAMMAS_NEG, DEFAULT_GAMMAS_POS, calibrate_gamma
from ..directions import DirectionSet
from ..judges import PairwiseJudge, RewardModelScorer
from ..pairs import PairsConfig, table_rows
from ..pipeline import merge_shards, run_pipeline
from ..pipeline.config import RunConfig
from ..runs import names
from ..runs.io import check_output_folder
from ..scoring import ScoreConfig, scoring_layers
from ..serve import serve
from .options import given_options
from .stage_commands import SELECTION, load, steering_io_args

__all__ = ["calibrate_args", "calibrate_command", "run_args", "run_command", "merge_args", "merge_command",
           "serve_args", "serve_command"]


# ---- calibrate -----------------------------------------------------------------------------------------


def calibrate_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens calibrate``."""
    steering_io_args(p)
    p.add_argument("--n", type=int, default=32, help="instructions in the sweep (the first N of the table)")
    p.add_argument("--gammas-pos", default=",".join(map(str, DEFAULT_GAMMAS_POS)),
                   help="comma-separated grid of gamma+")
    p.add_argument("--gammas-neg", default=",".join(map(str, DEFAULT_GAMMAS_NEG)),
                   help="comma-separated grid of gamma-")
    p.add_argument("--scorer", default="probe",
                   help="'probe' (default: the model's own reading along the direction), 'judge' (the model as a "
                        "pairwise judge, both orders), or a local HF reward-model folder")
    p.add_argument("--win-threshold", type=float, default=0.9)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def calibrate_command(args: argparse.Namespace, cfg: PairsConfig) -> list[Path]:
    """Run ``icon2-lens calibrate``; return the paths it wrote."""
    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    layers = scoring_layers(dirs, cfg.layers)
    try:
        gp = [float(x) for x in args.gammas_pos.split(",") if x.strip()]
        gn = [float(x) for x in args.gammas_neg.split(",") if x.strip()]
    except ValueError:
        raise ValueError("--gammas-pos/--gammas-neg must be comma-separated numbers, e.g. 0.05,0.1") from None
    table = table_rows(args.instructions, cfg.criterion, dirs)
    model = load(args)
    scorer: Any = None
    if args.scorer == "judge":
        scorer = PairwiseJudge(model)
    elif args.scorer != "probe":
        scorer = RewardModelScorer(args.scorer, device=args.device, local_files_only=not args.allow_download)
    result = calibrate_gamma(
        model, dirs, table, n=args.n, gammas_pos=gp, gammas_neg=gn, scorer=scorer, win_threshold=args.win_threshold,
        layers=layers, scale=cfg.scale, positions=cfg.positions, criterion=cfg.criterion,
        max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
        batch_size=args.batch_size, progress=not args.no_progress)
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
