"""The stage registry: each stage declares its name, inputs, config dataclass, run and (if sharded) merge.

The run engine (`icon2_lens.pipeline.run`), the run config (`icon2_lens.pipeline.config`), the shard
merge and the CLI are built from `STAGES`. A stage's config dataclass lives beside its library function
(e.g. `icon2_lens.pairs.PairsConfig`) and is the one source of its defaults; ``extra`` holds what only the
pipeline needs (which instructions to read, demo sizes), and ``pipeline_defaults`` the few library
defaults the demo run changes (sizes, and trimming cut answers in training; a test lists them).

Adding a stage (a new pair-making method, say) is one `StageSpec` and one entry here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..controls import ControlsConfig, make_controls
from ..directions import DirectionSet, ExtractConfig, extract_directions
from ..evaluation import EvaluateConfig, PairwiseJudge, ProbeScorer, evaluate, pair_report
from ..gen.base import check_count
from ..instructions import load_instructions
from ..judges import check_judge, make_judge
from ..layers import LayersConfig, layer_report
from ..models import LoadedModel, load_model
from ..pairs import PairsConfig, generate_pairs
from ..preference import first_per_criterion, load_preference_set
from ..reward_probe import RewardProbeScorer
from ..runs import names
from ..runs.costs import CostMeter
from ..runs.io import atomic_write_text, read_jsonl
from ..scoring import ScoreConfig, save_scores, score_instructions, scoring_layers
from ..synthesis import SynthesisConfig, synthesize_instructions
from ..training import TrainConfig, train
from .compare import COMPARE_JSON, CompareConfig, compare_methods
from .distill_run import DISTILL_METRICS, DistillConfig, run_distill

__all__ = ["StageSpec", "StageContext", "STAGES"]

#: ``(context, stage folder, cost meter, stage config, section) -> (rows, written paths)``.
RunStage = Callable[["StageContext", Path, CostMeter, Any, Any], tuple[int, list[Path]]]


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name (its folder in a run directory, its CLI subcommand, its config section).
        inputs: the stages whose outputs it reads (a change upstream re-runs it).
        config: its config dataclass (the one source of defaults).
        run: runs the stage into its folder.
        extra: a dataclass of pipeline-only fields (what to read, demo sizes), or ``None``.
        pipeline_defaults: library defaults the demo run changes (sizes; trim_unfinished), listed in a test.
        prepare: rewrites a section dict before validation (e.g. one selection rule replacing another).
        uses_model: whether the stage, with this section, runs the base model (loaded once, watched for costs).
        help: one line for ``--help`` and the docs.
    """

    name: str
    inputs: tuple[str, ...]
    config: type
    run: RunStage
    extra: type | None = None
    pipeline_defaults: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any], Any] | None = None
    uses_model: Callable[[Any], bool] = lambda section: True
    help: str = ""


class StageContext:
    """What stages share in one run: the config, the run directory, the base model (loaded once, if needed)."""

    def __init__(self, cfg: Any, out: Path, progress: bool) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self._model: LoadedModel | None = None

    @property
    def model(self) -> LoadedModel:
        """The base model, loaded on first use."""
        if self._model is None:
            import torch

            self._model = load_model(self.cfg.model, device=self.cfg.device, dtype=getattr(torch, self.cfg.dtype))
        return self._model

    def directions(self) -> DirectionSet:
        """The directions with the suggested layers (the ``layers`` stage's output)."""
        return DirectionSet.load(self.out / "layers" / names.DIRECTIONS)

    def close(self) -> None:
        """Drop the model."""
        self._model = None


# ---- pipeline-only fields ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ExtractInputs:
    """What `extract` reads: criteria (``null``: the four defaults), a feature set and how many of it."""

    criteria: str | list[str] | None = None
    instructions: str = "default"
    n_instructions: int | None = 64

    def __post_init__(self) -> None:
        check_count(self.n_instructions, "n_instructions")


@dataclass(frozen=True, kw_only=True)
class SynthesizeInputs:
    """``n`` generations; or ``source``: your own instructions (a built-in set, a file or a folder) instead."""

    source: str | None = None
    n: int = 64

    def __post_init__(self) -> None:
        check_count(self.n, "n")


@dataclass(frozen=True, kw_only=True)
class EvaluateInputs:
    """Held-out instructions (a built-in set, a file or a folder) and how many (0: no answers, no judge); an
    optional judge (a model source, or an OpenAI-compatible endpoint URL with ``judge_model`` its model name);
    ``n_preference``: only the first n preference pairs of each criterion (``null``: all)."""

    instructions: str = "heldout"
    n: int | None = 16
    judge: str | None = None
    judge_model: str | None = None
    n_preference: int | None = None

    def __post_init__(self) -> None:
        check_count(self.n, "n", low=0)
        check_count(self.n_preference, "n_preference")
        if self.judge is not None:
            check_judge(self.judge)  # an unknown judge: an error when the config is loaded


@dataclass(frozen=True, kw_only=True)
class DistillInputs:
    """``enabled``: run Mind's Mirror in this run (off by default); ``teacher`` and ``student``: model sources
    (``null``: the run's model: it distils into a fresh copy of itself)."""

    enabled: bool = False
    teacher: str | None = None
    student: str | None = None


def _config_of(cls: type, section: Any) -> Any:
    """A stage's config dataclass from another stage's validated section (its fields only)."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if hasattr(section, f.name)})


# ---- runners -------------------------------------------------------------------------------------------


def _extract(ctx: StageContext, folder: Path, meter: CostMeter, cfg: ExtractConfig, sec: Any) -> tuple[int, list[Path]]:
    dirs = extract_directions(ctx.model, sec.criteria, load_instructions(sec.instructions, limit=sec.n_instructions),
                              method=cfg.method, hook=cfg.hook, batch_size=cfg.batch_size, stability=cfg.stability,
                              seed=ctx.cfg.seed, progress=ctx.progress)
    dirs.save(folder / names.DIRECTIONS, overwrite=True)  # a resumed stage may find it written already
    return len(dirs.criteria), [folder / names.DIRECTIONS]


def _layers(ctx: StageContext, folder: Path, meter: CostMeter, cfg: LayersConfig, sec: Any) -> tuple[int, list[Path]]:
    dirs = DirectionSet.load(ctx.out / "extract" / names.DIRECTIONS, model=ctx.model)
    report = layer_report(ctx.model, dirs, n_heldout=cfg.n_heldout,
                          n_paraphrase_instructions=cfg.n_paraphrase_instructions, width=cfg.width,
                          batch_size=cfg.batch_size, progress=ctx.progress)
    written = report.save(folder)
    target = report.apply(dirs).save(folder / names.DIRECTIONS, overwrite=True)
    return len(report.suggested_layers), [*written.values(), target]


def _synthesize(ctx: StageContext, folder: Path, meter: CostMeter, cfg: SynthesisConfig,
                sec: Any) -> tuple[int, list[Path]]:
    if sec.source is not None:
        rows = load_instructions(sec.source)
        atomic_write_text(folder / names.INSTRUCTIONS, "".join(json.dumps({"instruction": q}) + "\n" for q in rows))
        return len(rows), [folder / names.INSTRUCTIONS]
    ds = synthesize_instructions(ctx.model, sec.n, seed=ctx.cfg.seed, out=folder, progress=ctx.progress,
                                 **dataclasses.asdict(cfg))
    return len(ds), [folder / names.INSTRUCTIONS, folder / names.SYNTHESIS_REPORT]


def _score(ctx: StageContext, folder: Path, meter: CostMeter, cfg: ScoreConfig, sec: Any) -> tuple[int, list[Path]]:
    table = score_instructions(ctx.model, ctx.directions(), ctx.out / "synthesize", layers=cfg.layers,
                               standardize=cfg.standardize, render=cfg.render, batch_size=cfg.batch_size,
                               min_separation=cfg.min_separation, allow_invalid=cfg.allow_invalid,
                               progress=ctx.progress)
    paths = save_scores(table, folder, top_fraction=cfg.top_fraction, top_k=cfg.top_k, threshold=cfg.threshold,
                        balance_criteria=cfg.balance_criteria, overwrite=True)
    return len(read_jsonl(folder / names.SELECTED)), paths


def _generate(ctx: StageContext, folder: Path, meter: CostMeter, cfg: PairsConfig, sec: Any) -> tuple[int, list[Path]]:
    dirs = ctx.directions()
    with meter.phase("generation"):  # the pairs' cost; the report below is evaluation, counted apart
        pairs = generate_pairs(ctx.model, dirs, ctx.out / "score" / names.SELECTED, cfg, seed=ctx.cfg.seed,
                               out=folder, progress=ctx.progress)
    steer_layers = scoring_layers(dirs, cfg.layers)
    with meter.phase("report"):
        report = pair_report(pairs, scorer=ProbeScorer(ctx.model, dirs, layers=steer_layers))  # self-probe
        # an independent reading: a reward probe fitted on human-written better/worse answers, not the directions
        probe = RewardProbeScorer.fit(ctx.model, layers=steer_layers)
        report["reward_probe"] = {"win_share": pair_report(pairs, scorer=probe)["win_share"],
                                  "heldout_accuracy": probe.accuracy(load_preference_set())}
    atomic_write_text(folder / names.PAIR_REPORT, json.dumps(report, indent=2))
    return len(pairs), [folder / names.PAIRS, folder / names.PAIR_REPORT]


def _train(ctx: StageContext, folder: Path, meter: CostMeter, cfg: TrainConfig, sec: Any) -> tuple[int, list[Path]]:
    res = train(ctx.out / "generate", config=dataclasses.replace(cfg, seed=ctx.cfg.seed), model_source=ctx.cfg.model,
                output_dir=folder / names.TRAINED_MODEL, device=ctx.cfg.device, overwrite=True, progress=ctx.progress,
                costs=meter)
    return res.steps, [res.output_dir, res.log_path, res.curve_path]


def _controls(ctx: StageContext, folder: Path, meter: CostMeter, cfg: ControlsConfig,
              sec: Any) -> tuple[int, list[Path]]:
    if not cfg.kinds:
        return 0, []
    paths = make_controls(ctx.model, ctx.directions(), ctx.out / "generate", cfg,
                          pairs_config=_config_of(PairsConfig, ctx.cfg.generate),
                          train_config=dataclasses.replace(_config_of(TrainConfig, ctx.cfg.train), seed=ctx.cfg.seed),
                          model_source=ctx.cfg.model, seed=ctx.cfg.seed, out=folder, progress=ctx.progress)
    return len(paths), list(paths.values())


def _evaluate(ctx: StageContext, folder: Path, meter: CostMeter, cfg: EvaluateConfig,
              sec: Any) -> tuple[int, list[Path]]:
    import torch

    dirs = ctx.directions()

    def load(path: Path) -> LoadedModel:
        m = load_model(path, device=ctx.cfg.device, dtype=getattr(torch, ctx.cfg.dtype))
        meter.watch_model(m)
        return m

    trained = load(ctx.out / "train" / names.TRAINED_MODEL)
    controls = {kind: load(ctx.out / "controls" / kind / "model") for kind in ctx.cfg.controls.kinds}
    judge = make_judge(sec.judge, endpoint_model=sec.judge_model, device=ctx.cfg.device) if sec.judge else None
    if isinstance(judge, PairwiseJudge):
        meter.watch_model(judge.model)
    trained_on = [r["instruction"] for r in read_jsonl(ctx.out / "generate" / names.PAIRS)]
    instructions = load_instructions(sec.instructions, limit=sec.n) if sec.n != 0 else []
    pref = first_per_criterion(load_preference_set(cfg.preference_set), sec.n_preference)
    steer_layers = scoring_layers(dirs, ctx.cfg.generate.layers)
    evaluate(ctx.model, trained, dirs, instructions, preference_set=pref, controls=controls, judge=judge,
             layers=steer_layers, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
             training_instructions=trained_on, n_boot=cfg.n_boot, level=cfg.level, seed=ctx.cfg.seed, out=folder,
             overwrite=True, progress=ctx.progress)
    return len(pref), [folder / names.EVAL_REPORT, folder / names.METRICS]


def _compare(ctx: StageContext, folder: Path, meter: CostMeter, cfg: CompareConfig,
             sec: Any) -> tuple[int, list[Path]]:
    if not [m for m in cfg.methods if m != "icon2"]:
        return 0, []
    gen = ctx.cfg.generate  # in a run, the instructions and the budget are the run's own (score, generate)
    cfg = dataclasses.replace(cfg, max_new_tokens=gen.max_new_tokens, repetition_penalty=gen.repetition_penalty,
                              batch_size=gen.batch_size)
    res = compare_methods(ctx.out, out=folder, config=cfg,
                          train_config=_config_of(TrainConfig, ctx.cfg.train), model=ctx.cfg.model,
                          device=ctx.cfg.device, seed=ctx.cfg.seed, progress=ctx.progress)
    return len(res.summary["methods"]), [folder / COMPARE_JSON, res.report]


def _distill(ctx: StageContext, folder: Path, meter: CostMeter, cfg: DistillConfig,
             sec: Any) -> tuple[int, list[Path]]:
    if not sec.enabled:
        return 0, []
    res = run_distill(cfg, teacher=sec.teacher if sec.teacher is not None else ctx.cfg.model,
                      student=sec.student if sec.student is not None else ctx.cfg.model, out=folder,
                      seed=ctx.cfg.seed, device=ctx.cfg.device, progress=ctx.progress)
    paths = [folder / DISTILL_METRICS, *([res.report] if res.report is not None else [])]
    return res.metrics["split"]["n_test"], [*paths, *([res.student] if res.student is not None else [])]


def _one_selection_rule(data: Any) -> Any:
    """Giving ``top_fraction`` or ``threshold`` replaces the demo's default ``top_k`` rule."""
    if isinstance(data, dict) and "top_k" not in data and (
            data.get("top_fraction") is not None or data.get("threshold") is not None):
        data = {**data, "top_k": None}
    return data


#: The stages in run order.
STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("extract", (), ExtractConfig, _extract, extra=ExtractInputs,
              help="criterion directions from contrasting system prompts"),
    StageSpec("layers", ("extract",), LayersConfig, _layers,
              pipeline_defaults={"n_heldout": 16, "n_paraphrase_instructions": 4},
              help="per-layer separations and the suggested steering range"),
    StageSpec("synthesize", (), SynthesisConfig, _synthesize, extra=SynthesizeInputs,
              uses_model=lambda section: section.source is None,
              help="Magpie-style instructions written by the model"),
    StageSpec("score", ("layers", "synthesize"), ScoreConfig, _score, pipeline_defaults={"top_k": 24},
              prepare=_one_selection_rule, help="consistency scores (Eq. 2/3) and the selection"),
    StageSpec("generate", ("layers", "score"), PairsConfig, _generate,
              help="bidirectional steered generation into preference pairs"),
    StageSpec("train", ("generate",), TrainConfig, _train, uses_model=lambda section: False,  # loads its own
              # SmolLM2 finishes almost no answer within the demo's token budget (0 of 24 chosen at 128 tokens, 0 of
              # 8 at 256): the demo trims cut responses to their last sentence instead of dropping every pair
              pipeline_defaults={"trim_unfinished": True},
              help="DPO or SimPO on the pairs (TRL)"),
    StageSpec("controls", ("layers", "generate", "train"), ControlsConfig, _controls,
              uses_model=lambda section: "random" in section.kinds,
              help="control models: swapped pairs and pairs steered along a random direction, trained alike"),
    StageSpec("evaluate", ("layers", "score", "train", "controls"), EvaluateConfig, _evaluate,
              extra=EvaluateInputs,
              help="base vs trained vs controls on held-out preference pairs (judge-free), answers and judge"),
    StageSpec("compare", ("layers", "score", "generate"), CompareConfig, _compare, uses_model=lambda section: False,
              pipeline_defaults={"methods": []},  # a run compares only when methods are listed
              help="the competing methods on the run's instructions and budget, one model each, compared"),
    StageSpec("distill", (), DistillConfig, _distill, extra=DistillInputs, uses_model=lambda section: False,
              help="Mind's Mirror (off unless distill.enabled): teacher rationales and self-evaluations, three "
                   "students, their test accuracy"),
)}
