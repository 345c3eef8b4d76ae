"""``icon2-lens baseline NAME`` (one competing method's pairs) and ``icon2-lens compare`` (all methods side by side).

Each baseline's options are generated from its config dataclass (`icon2_lens.baselines.METHODS`), as the stage
commands' are; ``compare``'s from `icon2_lens.pipeline.compare.CompareConfig`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..baselines import METHODS, make_pairs
from ..hardware import resolve_device
from ..pipeline.compare import COMPARE_JSON, CompareConfig
from ..pipeline.run import compare
from ..runs import names
from .options import add_config_options, config_from_args
from .stage_commands import add_model_args, add_shard_arg, load, overwriting, resumable_out, shard_from_args

__all__ = ["baseline_args", "baseline_command", "baseline_config", "compare_args", "compare_command"]


def baseline_args(p: argparse.ArgumentParser) -> None:
    """``icon2-lens baseline NAME``: one sub-command per registered method, with its config's options."""
    sub = p.add_subparsers(dest="method", required=True, metavar="NAME")
    for name, spec in METHODS.items():
        mp = sub.add_parser(name, help=spec.help)
        add_model_args(mp)
        mp.add_argument("--instructions", required=True,
                        help="a `score` output folder (its selection, with criteria), a .jsonl of rows with "
                             "'instruction' (and 'criterion'), a .txt file or a built-in set ('heldout', ...)")
        mp.add_argument("--n-instructions", type=int, default=None, help="use only the first N instructions")
        mp.add_argument("--out", required=True, type=Path,
                        help="output folder (pairs.jsonl, generation.json, costs.json); a rerun continues it")
        mp.add_argument("--seed", type=int, default=0)
        mp.add_argument("--overwrite", action="store_true",
                        help="discard an earlier run in --out instead of continuing it")
        add_shard_arg(mp)
        add_config_options(mp, spec.config)


def baseline_config(args: argparse.Namespace) -> object:
    """The chosen method's config from the command line."""
    return config_from_args(args, METHODS[args.method].config)


def baseline_command(args: argparse.Namespace, cfg: object) -> list[Path]:
    """Run ``icon2-lens baseline NAME``; return the paths it wrote."""
    from ..baselines import instruction_rows

    resolve_device(args.device)  # before anything is written or loaded
    shard = shard_from_args(args)
    resumable_out(args, names.GENERATION_SETTINGS, f"{args.method} pairs")
    if args.n_instructions is not None and args.n_instructions < 1:
        raise ValueError(f"--n-instructions must be at least 1, got {args.n_instructions}.")
    rows = instruction_rows(args.instructions, limit=args.n_instructions)  # fail early, before the model loads
    table = [{"instruction": r.instruction, "criterion": r.criterion} for r in rows]
    with overwriting(args, names.PAIRS):
        ds = make_pairs(args.method, load(args), table, cfg, seed=args.seed, out=args.out, shard=shard,
                        progress=not args.no_progress)
    kept = sum(1 for k in ds["kept"] if k)
    print(f"{args.method}: {kept} pairs kept of {len(ds)} instructions")
    files = [names.PAIRS, names.GENERATION_SETTINGS]
    return [args.out / n for n in (files if shard is not None else [*files, names.COSTS])]


def compare_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens compare``."""
    p.add_argument("--out", required=True, type=Path,
                   help="comparison folder: <method>/pairs.jsonl, <method>/costs.json, <method>/model/, "
                        "compare.json, report.md; a rerun resumes")
    p.add_argument("--seed", type=int, default=0)


def compare_command(args: argparse.Namespace, cfg: CompareConfig) -> list[Path]:
    """Run ``icon2-lens compare``; return the paths it wrote."""
    resolve_device(args.device)
    if args.chat_template is not None or args.dtype != "float32":
        raise ValueError("compare loads every model in float32 with the model's own chat template; drop "
                         "--chat-template / --dtype (run the stages one by one for other settings).")
    res = compare(cfg, out=args.out, model=args.model, device=args.device, seed=args.seed,
                  progress=not args.no_progress)
    print(json.dumps({m: {"kept_pairs": v["kept_pairs"],
                          "generated_tokens_per_pair": v["costs"]["generated_tokens_per_pair"]}
                      for m, v in res.summary["methods"].items()}, indent=2))
    return [res.report, args.out / COMPARE_JSON]
