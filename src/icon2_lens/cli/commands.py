"""What each ``icon2-lens`` subcommand reads, runs and writes.

Each stage command gets its settings as the stage's config dataclass, built by `icon2_lens.cli.options`
from the command line over the dataclass's defaults; this module adds the command's inputs and outputs.
A command returns the paths it wrote (printed by `icon2_lens.cli.main`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ..calibration import DEFAULT_GAMMAS_NEG, DEFAULT_GAMMAS_POS, calibrate_gamma, load_gammas
from ..directions import DirectionSet, ExtractConfig, extract_directions
from ..evaluation import EvaluateConfig, evaluate, pair_report
from ..instructions import load_instructions
from ..judges import PairwiseJudge, ProbeScorer, RewardModelScorer
from ..layers import LayersConfig, layer_report, split_half_stability
from ..models import LoadedModel, load_model
from ..pairs import PairsConfig, generate_pairs, table_rows
from ..pipeline import merge_shards, run_pipeline
from ..pipeline.config import RunConfig
from ..runs import names
from ..runs.io import atomic_write_text, check_output_folder
from ..runs.shards import parse_shard, shard_device
from ..scoring import ScoreConfig, save_scores, score_instructions, scoring_layers
from ..synthesis import SynthesisConfig, synthesis_report, synthesize_instructions
from ..training import TrainConfig, train
from .options import config_from_args, given_options

__all__ = ["COMMANDS", "Command", "add_model_args", "load"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options every model-running command shares."""
    p.add_argument("--model", default=None,
                   help="model source: omit for the embedded SmolLM2-135M-Instruct; an HF folder, a .gguf file or an HF id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--allow-download", action="store_true", help="let transformers download an HF id (offline otherwise)")
    p.add_argument("--chat-template", default=None, type=Path,
                   help="file with a Jinja chat template, for models whose tokenizer has none")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load(args: argparse.Namespace) -> LoadedModel:
    """The model the command line names."""
    import torch

    template = None
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise FileNotFoundError(f"--chat-template {args.chat_template} does not exist; pass a file with a Jinja template.")
        template = args.chat_template.read_text(encoding="utf-8")
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                      local_files_only=not args.allow_download, chat_template=template)


def _add_shard_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", default=None, metavar="i/n|auto",
                   help="run only shard i of n (from 0) of the batches, for data-parallel runs; 'auto': RANK/WORLD_SIZE "
                        "as set by accelerate launch or torchrun. '{shard}' in --out becomes i. Merge the shard "
                        "folders with `icon2-lens merge`")


def _shard_from_args(args: argparse.Namespace) -> tuple[int, int] | None:
    """Resolve --shard; put the shard index into --out's '{shard}' and pick cuda:LOCAL_RANK under a launcher."""
    if args.shard is None:
        if "{shard}" in str(args.out):
            raise ValueError(f"--out {args.out} contains '{{shard}}' but no --shard was given.")
        return None
    shard = parse_shard(args.shard)
    args.out = Path(str(args.out).replace("{shard}", str(shard[0])))
    if args.device is None:
        args.device = shard_device()
    return shard


def _resumable_out(args: argparse.Namespace, settings_file: str, what: str) -> None:
    """Refuse a foreign folder; with --overwrite discard an earlier run of this command."""
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"{args.out} exists and is a file; choose another output folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / settings_file).is_file():
        raise FileExistsError(f"Output folder {args.out} exists and holds no {what} run; choose another folder "
                              "(--overwrite only replaces an earlier run of this command).")


# ---- extract / layers ----------------------------------------------------------------------------------


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (directions.safetensors + directions.json)")
    p.add_argument("--criteria", default=None,
                   help="comma-separated default criteria (general,helpful,honest,harmless) or a YAML file; default: all four")
    p.add_argument("--instructions", default="default",
                   help="feature set: 'default' (built-in, 256), a .txt file (one per line) or a .jsonl file")
    p.add_argument("--n-instructions", type=int, default=None,
                   help="use only the first N instructions (default: all of --instructions; 'default' is 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _extract(args: argparse.Namespace, cfg: ExtractConfig) -> list[Path]:
    check_output_folder(args.out, overwrite=args.overwrite)  # fail before the slow part
    instructions = load_instructions(args.instructions, limit=args.n_instructions)
    model = load(args)
    dirs = extract_directions(model, args.criteria, instructions, method=cfg.method, hook=cfg.hook,
                              batch_size=cfg.batch_size, stability=cfg.stability, progress=not args.no_progress)
    dirs.save(args.out, overwrite=args.overwrite)
    print(dirs)
    return [args.out / names.DIRECTIONS_TENSORS, args.out / names.DIRECTIONS_META]


def _layers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--heldout", default=None, help="held-out instructions (.txt/.jsonl); default: unused built-in ones")
    p.add_argument("--stability", action="store_true",
                   help="also compute split-half stability (a second extraction pass); not needed when the "
                        "directions were extracted with --stability, whose values the report shows anyway")
    p.add_argument("--instructions", default="default", help="feature set for --stability (default: built-in)")
    p.add_argument("--n-instructions", type=int, default=None, help="first N feature instructions for --stability")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for layer_report.{md,json,png} (default: the directions folder)")


def _layers(args: argparse.Namespace, cfg: LayersConfig) -> list[Path]:
    dirs = DirectionSet.load(args.directions)  # fail early on a bad folder
    model = load(args)
    dirs.check_compatible(model)
    stability = None
    if args.stability and "stability" not in dirs.stats:
        stability = split_half_stability(model, dirs, load_instructions(args.instructions, limit=args.n_instructions),
                                         batch_size=cfg.batch_size, progress=not args.no_progress)
    report = layer_report(model, dirs, heldout=args.heldout, n_heldout=cfg.n_heldout,
                          n_paraphrase_instructions=cfg.n_paraphrase_instructions, width=cfg.width,
                          batch_size=cfg.batch_size, stability=stability, progress=not args.no_progress)
    print(report.table())
    meta_path = report.apply(dirs).update_meta_on_disk(args.directions)  # records suggested_layers
    written = report.save(args.out or args.directions)
    return [*written.values(), meta_path]


# ---- synthesize / score --------------------------------------------------------------------------------


def _synthesize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", required=True, type=int, help="number of generations (kept ones are fewer; see report.json)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: instructions.jsonl, dropped.jsonl, report.json, raw.jsonl; a rerun continues it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of continuing it")
    _add_shard_arg(p)


def _synthesize(args: argparse.Namespace, cfg: SynthesisConfig) -> list[Path]:
    import dataclasses

    shard = _shard_from_args(args)
    _resumable_out(args, names.SYNTHESIS_SETTINGS, "synthesis")
    if args.out.is_dir() and args.overwrite:
        shutil.rmtree(args.out)
    model = load(args)
    ds = synthesize_instructions(model, args.n, seed=args.seed, out=args.out, progress=not args.no_progress,
                                 shard=shard, **dataclasses.asdict(cfg))
    if shard is not None:  # clean-up and de-duplication need all shards: `icon2-lens merge synthesize`
        print(f"shard {shard[0]}/{shard[1]}: {synthesis_report(ds)['generated']} generations (cleaned by the merge)")
        return [args.out / n for n in names.STAGE_FILES["synthesize"].shard_outputs]
    print(json.dumps(synthesis_report(ds), indent=2))
    return [args.out / n for n in (names.INSTRUCTIONS, names.DROPPED, names.SYNTHESIS_REPORT, names.RAW)]


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--instructions", required=True,
                   help="a `synthesize` output folder, a .txt/.jsonl file, or a saved datasets folder")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: scores.jsonl, selected.jsonl, consistency_hist.png, score_report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_shard_arg(p)


_SELECTION = ("top_fraction", "top_k", "threshold", "balance_criteria")


def _score(args: argparse.Namespace, cfg: ScoreConfig) -> list[Path]:
    shard = _shard_from_args(args)
    given = given_options(args, ScoreConfig)
    if shard is not None and any(k in given for k in _SELECTION):
        raise ValueError("A shard is not selected on its own (the selection needs all rows); give --top-fraction, "
                         "--top-k, --threshold or --balance-criteria to `icon2-lens merge score` instead.")
    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    instructions = load_instructions(args.instructions)  # fail early on a bad file
    model = load(args)
    table = score_instructions(model, dirs, instructions, layers=cfg.layers, standardize=cfg.standardize,
                               render=cfg.render, batch_size=cfg.batch_size, progress=not args.no_progress,
                               shard=shard)
    selection = {k: getattr(cfg, k) for k in _SELECTION}
    written = save_scores(table, args.out, overwrite=args.overwrite, **(selection if shard is None else {}))
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {len(table)} instructions scored")
        return written
    report = json.loads((args.out / names.SCORE_REPORT).read_text())
    print(json.dumps({k: report[k] for k in ("scored", "selected", "criterion_all", "criterion_selected")}, indent=2))
    return written


# ---- generate / calibrate ------------------------------------------------------------------------------


def _steering_io_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--instructions", required=True,
                   help="a `score` output folder (its selected.jsonl) or a JSONL file with instruction and criterion")
    p.add_argument("--out", required=True, type=Path, help="output folder")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _steering_io_args(p)
    p.add_argument("--gammas", type=Path, default=None,
                   help="gammas.yaml (or its folder) written by `calibrate`: its settings apply unless given here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of continuing it")
    _add_shard_arg(p)


def _generate(args: argparse.Namespace, cfg: PairsConfig) -> list[Path]:
    shard = _shard_from_args(args)
    _resumable_out(args, names.GENERATION_SETTINGS, "generation")
    dirs = DirectionSet.load(args.directions)
    if args.gammas is not None:  # the command line first, then gammas.yaml, then the defaults
        from_file = {k: v for k, v in load_gammas(args.gammas).items() if k in PairsConfig.__dataclass_fields__}
        cfg = config_from_args(args, PairsConfig, base=from_file)
    table = table_rows(args.instructions, cfg.criterion, dirs)  # fail early on a bad table
    if args.out.is_dir() and args.overwrite:
        shutil.rmtree(args.out)
    model = load(args)
    pairs = generate_pairs(model, dirs, table, cfg, seed=args.seed, out=args.out, progress=not args.no_progress,
                           shard=shard)
    if shard is not None:  # the pair report needs all pairs: `icon2-lens merge generate` writes it
        print(f"shard {shard[0]}/{shard[1]}: {len(pairs)} pairs")
        return [args.out / n for n in names.STAGE_FILES["generate"].shard_outputs]
    report = pair_report(pairs, scorer=ProbeScorer(model, dirs, layers=scoring_layers(dirs, cfg.layers)))
    atomic_write_text(args.out / names.PAIR_REPORT, json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    return [args.out / n for n in names.STAGE_FILES["generate"].outputs]


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    _steering_io_args(p)
    p.add_argument("--n", type=int, default=32, help="instructions in the sweep (the first N of the table)")
    p.add_argument("--gammas-pos", default=",".join(map(str, DEFAULT_GAMMAS_POS)), help="comma-separated grid of gamma+")
    p.add_argument("--gammas-neg", default=",".join(map(str, DEFAULT_GAMMAS_NEG)), help="comma-separated grid of gamma-")
    p.add_argument("--scorer", default="probe",
                   help="'probe' (default: the model's own reading along the direction), 'judge' (the model as a "
                        "pairwise judge, both orders), or a local HF reward-model folder")
    p.add_argument("--win-threshold", type=float, default=0.9)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _calibrate(args: argparse.Namespace, cfg: PairsConfig) -> list[Path]:
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


# ---- train / evaluate ----------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, type=Path, help="a `generate` output folder or its pairs.jsonl")
    p.add_argument("--out", required=True, type=Path, help="output folder (the trained model, log and curve)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _train(args: argparse.Namespace, cfg: TrainConfig) -> list[Path]:
    res = train(args.pairs, config=cfg, model_source=args.model, output_dir=args.out, device=args.device,
                overwrite=args.overwrite, progress=not args.no_progress)
    if res.history:
        first, last = res.history[0], res.history[-1]
        print(f"{res.steps} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
              f"reward accuracy {last.get('reward_accuracy', float('nan')):.2f}, "
              f"margin {last.get('reward_margin', float('nan')):.3f}")
    return [res.output_dir, res.log_path, res.curve_path]


def _train_config(args: argparse.Namespace) -> TrainConfig:
    given = given_options(args, TrainConfig)
    if "objective" not in given and given.get("preset") == "sao":
        given["objective"] = "simpo"  # SAO's preset is SimPO
    return TrainConfig(**given)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trained", required=True, help="the trained model folder (from `train`)")
    p.add_argument("--directions", required=True, type=Path, help="the base model's DirectionSet folder")
    p.add_argument("--instructions", default="heldout",
                   help="held-out instructions: a built-in set (default 'heldout'), a .txt/.jsonl file or folder")
    p.add_argument("--n", type=int, default=None, help="use only the first N instructions")
    p.add_argument("--judge", default=None, help="judge model source (default: the base model)")
    p.add_argument("--out", required=True, type=Path, help="output folder: report.md, metrics.json, PNG, AlpacaEval JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _evaluate(args: argparse.Namespace, cfg: EvaluateConfig) -> list[Path]:
    import torch

    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    instructions = load_instructions(args.instructions, limit=args.n)
    base = load(args)
    trained = load_model(args.trained, device=args.device, dtype=getattr(torch, args.dtype))
    judge = PairwiseJudge(load_model(args.judge, device=args.device)) if args.judge else None
    metrics = evaluate(base, trained, dirs, instructions, judge=judge, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, out=args.out, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print((args.out / names.EVAL_REPORT).read_text())
    print(json.dumps(metrics["judge"]))
    return [args.out / n for n in (names.EVAL_REPORT, names.METRICS, names.PROBE_SHIFT, "alpaca_eval_base.json",
                                   "alpaca_eval_trained.json")]


# ---- run / merge ---------------------------------------------------------------------------------------


def _run_args(p: argparse.ArgumentParser) -> None:
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


def _run(args: argparse.Namespace, cfg: None) -> list[Path]:
    import yaml

    if args.print_config:
        print(yaml.safe_dump(RunConfig().to_dict(), sort_keys=False), end="")
        return []
    res = run_pipeline(args.config, out=args.out, update=args.update, stop_after=args.stop_after,
                       progress=not args.no_progress)
    print(f"\nreport: {res.report}")
    return [res.report, args.out / names.CONFIG, args.out / names.MANIFEST]


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=list(names.SHARDABLE), help="the stage the shards ran")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR",
                   help="the shard output folders, every shard i/n exactly once")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: the files the unsharded command writes (generate: report.json without "
                        "the model's win share)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _merge(args: argparse.Namespace, cfg: ScoreConfig) -> list[Path]:
    selection = {k: v for k, v in given_options(args, ScoreConfig).items() if k in _SELECTION}
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


class Command:
    """A subcommand: its inputs and outputs, the config dataclass its settings come from, and what it runs."""

    def __init__(self, add_args: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace, Any], list[Path]], *, config: type | None = None,
                 uses_model: bool = True, make_config: Callable[[argparse.Namespace], Any] | None = None,
                 skip: tuple[str, ...] = (), exclusive: tuple[tuple[str, ...], ...] = (), help: str = "") -> None:
        self.add_args, self.run, self.config, self.uses_model = add_args, run, config, uses_model
        self.make_config, self.skip, self.exclusive, self.help = make_config, skip, exclusive, help

    def build_config(self, args: argparse.Namespace) -> Any:
        """The command's config from the command line (over the dataclass's defaults)."""
        if self.make_config is not None:
            return self.make_config(args)
        return config_from_args(args, self.config) if self.config is not None else None


_RULES = (("top_fraction", "top_k", "threshold"),)

#: Every stage of the registry has a command here (a test checks it); plus calibrate, run and merge.
COMMANDS: dict[str, Command] = {
    "extract": Command(_extract_args, _extract, config=ExtractConfig,
                       help="extract criterion direction vectors into a DirectionSet folder"),
    "layers": Command(_layers_args, _layers, config=LayersConfig,
                      help="per-layer separation report and suggested steering range"),
    "synthesize": Command(_synthesize_args, _synthesize, config=SynthesisConfig,
                          help="let the model write instructions (Magpie-style) and clean them up"),
    "score": Command(_score_args, _score, config=ScoreConfig, exclusive=_RULES,
                     help="score instructions' inherent consistency with each criterion and select the best"),
    "generate": Command(_generate_args, _generate, config=PairsConfig,
                        help="bidirectional steered generation into DPO preference pairs"),
    "calibrate": Command(_calibrate_args, _calibrate, config=PairsConfig,
                         skip=("gamma_pos", "gamma_neg", "do_sample", "temperature", "top_p", "engine", "batch_size"),
                         help="sweep gamma+ / gamma- and pick them by the paper's rule"),
    "train": Command(_train_args, _train, config=TrainConfig, make_config=_train_config,
                     help="DPO or SimPO on preference pairs with TRL; saves a model folder load_model opens"),
    "evaluate": Command(_evaluate_args, _evaluate, config=EvaluateConfig,
                        help="base vs trained model on held-out instructions (probe shift, judge, degeneration)"),
    "run": Command(_run_args, _run, uses_model=False,
                   help="the whole method, resumable: extract, layers, synthesize, score, generate, train, evaluate "
                        "(default: the demo size on the embedded model)"),
    "merge": Command(_merge_args, _merge, config=ScoreConfig, uses_model=False, exclusive=_RULES,
                     skip=("layers", "standardize", "render", "batch_size"),
                     help="merge the shard folders of a sharded synthesize/score/generate run (--shard i/n)"),
}
