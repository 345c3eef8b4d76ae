"""The stage commands of ``icon2-lens`` (one per registered stage) and the helpers every command shares.

Each stage command gets its settings as the stage's config dataclass, built by `icon2_lens.cli.options`
from the command line over the dataclass's defaults; this module adds the command's inputs and outputs.
A command returns the paths it wrote (printed by `icon2_lens.cli.main`). The registry is
`icon2_lens.cli.commands.COMMANDS`; calibrate, run and merge are in `icon2_lens.cli.run_commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..calibration import load_gammas
from ..controls import CONTROL_KINDS, ControlsConfig, make_controls
from ..criteria import resolve_criteria
from ..directions import DirectionSet, ExtractConfig, extract_directions
from ..evaluation import EvaluateConfig, evaluate, pair_report
from ..hardware import resolve_device
from ..instructions import load_instructions
from ..judges import ProbeScorer, check_judge, make_judge
from ..layers import LayersConfig, layer_report, split_half_stability
from ..models import LoadedModel, load_model, read_chat_template
from ..pairs import PairsConfig, generate_pairs, table_rows
from ..preference import load_preference_set
from ..runs import names
from ..runs.io import atomic_write_text, check_output_folder, has_rows
from ..runs.shards import parse_shard, shard_device
from ..scoring import ScoreConfig, save_scores, score_instructions, scoring_layers
from ..synthesis import SynthesisConfig, synthesis_report, synthesize_instructions
from ..training import TrainConfig, train
from .options import config_from_args, given_options

__all__ = [
    "add_model_args", "load", "add_shard_arg", "shard_from_args", "resumable_out", "overwriting", "steering_io_args",
    "SELECTION",
    "extract_args", "extract_command", "layers_args", "layers_command", "synthesize_args", "synthesize_command",
    "score_args", "score_command", "generate_args", "generate_command", "train_args", "train_command", "train_config",
    "controls_args", "controls_command", "evaluate_args", "evaluate_command",
]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options every model-running command shares."""
    p.add_argument("--model", default=None,
                   help="model source: omit for the embedded SmolLM2-135M-Instruct; an HF folder, a .gguf file "
                        "or an HF id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--allow-download", action="store_true",
                   help="let transformers download an HF id (offline otherwise)")
    p.add_argument("--chat-template", default=None, type=Path,
                   help="file with a Jinja chat template, for models whose tokenizer has none")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load(args: argparse.Namespace) -> LoadedModel:
    """The model the command line names."""
    import torch

    template = None
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise FileNotFoundError(f"--chat-template {args.chat_template} does not exist; "
                                    "pass a file with a Jinja template.")
        template = read_chat_template(args.chat_template)  # a template that does not compile names the file
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                      local_files_only=not args.allow_download, chat_template=template)


def add_shard_arg(p: argparse.ArgumentParser) -> None:
    """The ``--shard i/n|auto`` option of the row-parallel stages."""
    p.add_argument("--shard", default=None, metavar="i/n|auto",
                   help="run only shard i of n (from 0) of the batches, for data-parallel runs; "
                        "'auto': RANK/WORLD_SIZE as set by accelerate launch or torchrun. '{shard}' in --out "
                        "becomes i. Merge the shard folders with `icon2-lens merge`")


def shard_from_args(args: argparse.Namespace) -> tuple[int, int] | None:
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


def resumable_out(args: argparse.Namespace, settings_file: str, what: str) -> None:
    """Refuse a foreign folder; with --overwrite discard an earlier run of this command."""
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"{args.out} exists and is a file; choose another output folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / settings_file).is_file():
        raise FileExistsError(f"Output folder {args.out} exists and holds no {what} run; choose another folder "
                              "(--overwrite only replaces an earlier run of this command).")


@contextmanager
def overwriting(args: argparse.Namespace, data_name: str) -> Iterator[None]:
    """``--overwrite`` of a resumable command: the earlier run is moved aside, put back if this run fails or is
    interrupted before its first row (a bad input found late leaves it byte-identical), else deleted."""
    out = args.out
    if not (args.overwrite and out.is_dir()):
        yield
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, aside / "x")
    try:
        yield
    except BaseException:
        if not has_rows(out / data_name):
            shutil.rmtree(out, ignore_errors=True)
            os.replace(aside / "x", out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


#: The selection options of `score` (and of `merge score`).
SELECTION = ("top_fraction", "top_k", "threshold", "balance_criteria")


# ---- extract / layers ----------------------------------------------------------------------------------


def extract_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens extract``."""
    p.add_argument("--out", required=True, type=Path, help="output folder (directions.safetensors + directions.json)")
    p.add_argument("--criteria", default=None,
                   help="comma-separated default criteria (general,helpful,honest,harmless) or a YAML file; "
                        "default: all four")
    p.add_argument("--instructions", default="default",
                   help="feature set: 'default' (built-in, 256), a .txt file (one per line) or a .jsonl file")
    p.add_argument("--n-instructions", type=int, default=None,
                   help="use only the first N instructions (default: all of --instructions; 'default' is 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def extract_command(args: argparse.Namespace, cfg: ExtractConfig) -> list[Path]:
    """Run ``icon2-lens extract``; return the paths it wrote."""
    check_output_folder(args.out, overwrite=args.overwrite)  # fail before the slow part
    criteria = resolve_criteria(args.criteria)  # a bad criteria list or YAML: an error before the model loads
    instructions = load_instructions(args.instructions, limit=args.n_instructions)
    model = load(args)
    dirs = extract_directions(model, criteria, instructions, method=cfg.method, hook=cfg.hook,
                              batch_size=cfg.batch_size, stability=cfg.stability, progress=not args.no_progress)
    dirs.save(args.out, overwrite=args.overwrite)
    print(dirs)
    return [args.out / names.DIRECTIONS_TENSORS, args.out / names.DIRECTIONS_META]


def layers_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens layers``."""
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--heldout", default=None, help="held-out instructions (.txt/.jsonl); default: unused built-in ones")
    p.add_argument("--stability", action="store_true",
                   help="also compute split-half stability (a second extraction pass); not needed when the "
                        "directions were extracted with --stability, whose values the report shows anyway")
    p.add_argument("--instructions", default="default", help="feature set for --stability (default: built-in)")
    p.add_argument("--n-instructions", type=int, default=None, help="first N feature instructions for --stability")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for layer_report.{md,json,png} (default: the directions folder)")


def layers_command(args: argparse.Namespace, cfg: LayersConfig) -> list[Path]:
    """Run ``icon2-lens layers``; return the paths it wrote."""
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


def synthesize_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens synthesize``."""
    p.add_argument("--n", required=True, type=int, help="number of generations (kept ones are fewer; see report.json)")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: instructions.jsonl, dropped.jsonl, report.json, raw.jsonl; "
                        "a rerun continues it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of continuing it")
    add_shard_arg(p)


def synthesize_command(args: argparse.Namespace, cfg: SynthesisConfig) -> list[Path]:
    """Run ``icon2-lens synthesize``; return the paths it wrote."""
    import dataclasses

    shard = shard_from_args(args)
    resumable_out(args, names.SYNTHESIS_SETTINGS, "synthesis")
    with overwriting(args, names.RAW):
        model = load(args)
        ds = synthesize_instructions(model, args.n, seed=args.seed, out=args.out, progress=not args.no_progress,
                                     shard=shard, **dataclasses.asdict(cfg))
    if shard is not None:  # clean-up and de-duplication need all shards: `icon2-lens merge synthesize`
        print(f"shard {shard[0]}/{shard[1]}: {synthesis_report(ds)['generated']} generations (cleaned by the merge)")
        return [args.out / n for n in names.STAGE_FILES["synthesize"].shard_outputs]
    print(json.dumps(synthesis_report(ds), indent=2))
    return [args.out / n for n in (names.INSTRUCTIONS, names.DROPPED, names.SYNTHESIS_REPORT, names.RAW)]


def score_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens score``."""
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--instructions", required=True,
                   help="a `synthesize` output folder, a .txt/.jsonl file, or a saved datasets folder")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: scores.jsonl, selected.jsonl, consistency_hist.png, score_report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_shard_arg(p)


def score_command(args: argparse.Namespace, cfg: ScoreConfig) -> list[Path]:
    """Run ``icon2-lens score``; return the paths it wrote."""
    shard = shard_from_args(args)
    given = given_options(args, ScoreConfig)
    if shard is not None and any(k in given for k in SELECTION):
        raise ValueError("A shard is not selected on its own (the selection needs all rows); give --top-fraction, "
                         "--top-k, --threshold or --balance-criteria to `icon2-lens merge score` instead.")
    check_output_folder(args.out, overwrite=args.overwrite)
    dirs = DirectionSet.load(args.directions)
    instructions = load_instructions(args.instructions)  # fail early on a bad file
    model = load(args)
    table = score_instructions(model, dirs, instructions, layers=cfg.layers, standardize=cfg.standardize,
                               render=cfg.render, batch_size=cfg.batch_size, min_separation=cfg.min_separation,
                               allow_invalid=cfg.allow_invalid, progress=not args.no_progress, shard=shard)
    selection = {k: getattr(cfg, k) for k in SELECTION}
    written = save_scores(table, args.out, overwrite=args.overwrite, **(selection if shard is None else {}))
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {len(table)} instructions scored")
        return written
    report = json.loads((args.out / names.SCORE_REPORT).read_text())
    print(json.dumps({k: report[k] for k in ("scored", "selected", "criterion_all", "criterion_selected")}, indent=2))
    return written


# ---- generate ----------------------------------------------------------------------------------------


def steering_io_args(p: argparse.ArgumentParser) -> None:
    """The inputs and output of the steering commands (generate, calibrate)."""
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--instructions", required=True,
                   help="a `score` output folder (its selected.jsonl) or a JSONL file with instruction and criterion")
    p.add_argument("--out", required=True, type=Path, help="output folder")


def generate_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens generate``."""
    steering_io_args(p)
    p.add_argument("--gammas", type=Path, default=None,
                   help="gammas.yaml (or its folder) written by `calibrate`: its settings apply unless given here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of continuing it")
    add_shard_arg(p)


def generate_command(args: argparse.Namespace, cfg: PairsConfig) -> list[Path]:
    """Run ``icon2-lens generate``; return the paths it wrote."""
    shard = shard_from_args(args)
    resumable_out(args, names.GENERATION_SETTINGS, "generation")
    dirs = DirectionSet.load(args.directions)
    if args.gammas is not None:  # the command line first, then gammas.yaml, then the defaults
        from_file = {k: v for k, v in load_gammas(args.gammas).items() if k in PairsConfig.__dataclass_fields__}
        cfg = config_from_args(args, PairsConfig, base=from_file)
    table = table_rows(args.instructions, cfg.criterion, dirs)  # fail early on a bad table
    with overwriting(args, names.PAIRS):
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


# ---- train / evaluate ----------------------------------------------------------------------------------


def train_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens train``."""
    p.add_argument("--pairs", required=True, type=Path, help="a `generate` output folder or its pairs.jsonl")
    p.add_argument("--out", required=True, type=Path, help="output folder (the trained model, log and curve)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def train_command(args: argparse.Namespace, cfg: TrainConfig) -> list[Path]:
    """Run ``icon2-lens train``; return the paths it wrote."""
    res = train(args.pairs, config=cfg, model_source=args.model, output_dir=args.out, device=args.device,
                overwrite=args.overwrite, progress=not args.no_progress)
    if res.history:
        first, last = res.history[0], res.history[-1]
        print(f"{res.steps} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
              f"reward accuracy {last.get('reward_accuracy', float('nan')):.2f}, "
              f"margin {last.get('reward_margin', float('nan')):.3f}")
    return [res.output_dir, res.log_path, res.curve_path]


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The train command's config: the SAO preset implies SimPO unless --objective is given."""
    given = given_options(args, TrainConfig)
    if "objective" not in given and given.get("preset") == "sao":
        given["objective"] = "simpo"  # SAO's preset is SimPO
    return TrainConfig(**given)


def controls_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens controls``."""
    p.add_argument("--pairs", required=True, type=Path,
                   help="the real pairs: a `generate` output folder or pairs.jsonl")
    p.add_argument("--directions", required=True, type=Path,
                   help="the DirectionSet folder the pairs were steered with")
    p.add_argument("--trained", default=None, type=Path,
                   help="the model trained on the real pairs (its train_config.json gives the controls' training "
                        "settings; default: TrainConfig's defaults)")
    p.add_argument("--out", required=True, type=Path, help="output folder: <kind>/pairs.jsonl and <kind>/model")
    p.add_argument("--seed", type=int, default=0, help="the generation seed the real pairs were made with")


def controls_command(args: argparse.Namespace, cfg: ControlsConfig) -> list[Path]:
    """Run ``icon2-lens controls``; return the trained control model folders."""
    tcfg = TrainConfig()
    if args.trained is not None:
        path = args.trained / "train_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass the folder `icon2-lens train` wrote, or leave "
                                    "--trained out to train the controls with the default settings.")
        saved = json.loads(path.read_text())
        saved["precision"] = saved.get("precision_asked", saved.get("precision", "auto"))  # not the resolved one
        tcfg = TrainConfig(**{f.name: saved[f.name] for f in dataclasses.fields(TrainConfig) if f.name in saved})
    dirs = DirectionSet.load(args.directions)
    model = load(args)
    paths = make_controls(model, dirs, args.pairs, cfg, train_config=tcfg, model_source=args.model, seed=args.seed,
                          out=args.out, progress=not args.no_progress)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return list(paths.values())


def evaluate_args(p: argparse.ArgumentParser) -> None:
    """The inputs and outputs of ``icon2-lens evaluate``."""
    p.add_argument("--trained", required=True, help="the trained model folder (from `train`)")
    p.add_argument("--directions", required=True, type=Path, help="the base model's DirectionSet folder")
    p.add_argument("--instructions", default="heldout",
                   help="held-out instructions: a built-in set (default 'heldout'), a .txt/.jsonl file or folder")
    p.add_argument("--n", type=int, default=None, help="use only the first N instructions")
    p.add_argument("--judge", default=None,
                   help="judge: a model source (HF folder or id, .gguf) or the URL of an OpenAI-compatible chat "
                        "endpoint, e.g. http://127.0.0.1:8080/v1 (default: the base model judging)")
    p.add_argument("--judge-model", default=None, help="the model name sent to a judge endpoint (default 'local')")
    p.add_argument("--controls", default=None, type=Path,
                   help="a `controls` output folder: its models are evaluated beside the trained one")
    p.add_argument("--pairs", default=None, type=Path,
                   help="the pairs the model was trained on (a `generate` folder or pairs.jsonl): a warning names "
                        "held-out instructions or preference prompts among them")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: report.md, metrics.json, PNG, AlpacaEval JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def evaluate_command(args: argparse.Namespace, cfg: EvaluateConfig) -> list[Path]:
    """Run ``icon2-lens evaluate``; return the paths it wrote."""
    import torch

    check_output_folder(args.out, overwrite=args.overwrite)
    resolve_device(args.device)
    if args.judge:
        check_judge(args.judge)  # before any model loads
    dirs = DirectionSet.load(args.directions)
    instructions = load_instructions(args.instructions, limit=args.n) if args.n != 0 else []
    pref = load_preference_set(cfg.preference_set)  # fail early on a bad file
    controls = {}
    if args.controls is not None:
        found = [k for k in CONTROL_KINDS if (args.controls / k / "model" / "config.json").is_file()]
        if not found:
            raise FileNotFoundError(f"{args.controls} holds no trained control (<kind>/model); run `icon2-lens "
                                    "controls` first.")
        controls = {k: load_model(args.controls / k / "model", device=args.device, dtype=getattr(torch, args.dtype))
                    for k in found}
    base = load(args)
    trained = load_model(args.trained, device=args.device, dtype=getattr(torch, args.dtype))
    judge = make_judge(args.judge, endpoint_model=args.judge_model, device=args.device) if args.judge else None
    trained_on = None
    if args.pairs is not None:
        trained_on = [r["instruction"] for r in table_rows(args.pairs if args.pairs.suffix == ".jsonl"
                                                           else args.pairs / names.PAIRS, None, dirs)]
    evaluate(base, trained, dirs, instructions, preference_set=pref, controls=controls, judge=judge,
             max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, training_instructions=trained_on,
             n_boot=cfg.n_boot, level=cfg.level, seed=args.seed, out=args.out, overwrite=args.overwrite,
             progress=not args.no_progress)
    print((args.out / names.EVAL_REPORT).read_text())
    written = [args.out / n for n in (names.EVAL_REPORT, names.METRICS, "preference.png")]
    if instructions:
        written += [args.out / n for n in (names.PROBE_SHIFT, "alpaca_eval_base.json", "alpaca_eval_trained.json")]
    return written
