"""The whole method as one resumable run: extract -> layers -> synthesize -> score -> generate -> train -> evaluate.

A run directory holds ``config.yaml`` (the validated config), one folder per stage, ``manifest.json``
and, at the end, ``report.md``. Each stage has a key: a hash of its own settings, the model
settings and the keys of the stages it reads. The manifest records each stage's key and whether
it finished. On a rerun:

- a finished stage whose key is unchanged is skipped;
- an unfinished stage with an unchanged key is resumed (synthesis and pair generation continue
  their append-only JSONL files, cutting a torn last batch; the other stages are short and are
  redone, their outputs written atomically);
- a stage whose key changed is cleared and re-run, and so, through their keys, are exactly the
  stages downstream of it (e.g. new gammas re-run generate, train and evaluate; never extract);
- a stage one of whose inputs ran in this invocation is re-run too (e.g. after you delete a stage
  folder by hand), so no stage is ever kept on top of rewritten inputs.

Every stage runs inside `icon2_lens.measure_costs` and writes ``costs.json``; ``report.md`` has the
per-stage cost table, the cost per kept pair and the evaluation's headline tables.

Examples:
    >>> result = il.run_pipeline(out="runs/demo")  # doctest: +SKIP
    >>> print(result.report.read_text())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..runs.costs import StageCost, cost_table, load_costs, measure_costs
from ..runs.io import atomic_write_text, read_jsonl

__all__ = ["RunConfig", "load_config", "run_pipeline", "PipelineResult", "STAGES", "stage_keys"]

#: The stages in order, with the stages each one reads.
STAGES: dict[str, tuple[str, ...]] = {
    "extract": (),
    "layers": ("extract",),
    "synthesize": (),
    "score": ("layers", "synthesize"),
    "generate": ("layers", "score"),
    "train": ("generate",),
    "evaluate": ("layers", "score", "train"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ExtractConfig(_Section):
    """Direction extraction (`icon2_lens.extract_directions`)."""

    criteria: str | list[str] | None = None
    instructions: str = "default"
    n_instructions: int | None = 64
    method: Literal["pca", "mean_diff", "pca_centered"] = "pca"
    hook: str = "resid_post"
    stability: bool = False
    batch_size: int = 32


class LayersConfig(_Section):
    """The layer report that suggests the steering range (`icon2_lens.layer_report`)."""

    n_heldout: int = 16
    n_paraphrase_instructions: int = 4
    width: int | None = None
    batch_size: int = 32


class SynthesizeConfig(_Section):
    """Magpie-style synthesis (`icon2_lens.synthesize_instructions`); ``n`` counts generations.

    ``source``: bring your own instructions instead (a built-in set name, a ``.txt``/``.jsonl`` file
    or a folder `icon2_lens.load_instructions` reads); the other settings are then unused.
    """

    source: str | None = None
    n: int = 64
    temperature: float = 1.0
    top_p: float = 0.99
    max_new_tokens: int = 96
    batch_size: int = 16
    system_prompt: str | None = None
    min_words: int = 3
    max_words: int = 200
    near_duplicate_threshold: float = 0.8


class ScoreConfig(_Section):
    """Consistency scoring and selection (`icon2_lens.score_instructions`, `icon2_lens.select_instructions`).

    One selection rule: the default is ``top_k: 24``; giving ``top_fraction`` or ``threshold``
    replaces it (giving two rules is an error).
    """

    layers: Literal["all", "suggested"] | list[int] = "all"
    standardize: bool = True
    render: Literal["chat", "raw"] = "chat"
    top_fraction: float | None = None
    top_k: int | None = 24
    threshold: float | None = None
    balance_criteria: bool = False
    batch_size: int = 32

    @model_validator(mode="before")
    @classmethod
    def _rule_replaces_default(cls, data: Any) -> Any:
        """Giving ``top_fraction`` or ``threshold`` replaces the default ``top_k`` rule."""
        if isinstance(data, dict) and "top_k" not in data and (
                data.get("top_fraction") is not None or data.get("threshold") is not None):
            data = {**data, "top_k": None}
        return data

    @model_validator(mode="after")
    def _one_rule(self) -> "ScoreConfig":
        rules = [k for k in ("top_fraction", "top_k", "threshold") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise ValueError(f"set only one of top_fraction, top_k, threshold (got {', '.join(rules)}); "
                             "set the others to null")
        return self


class GenerateConfig(_Section):
    """Bidirectional steered generation (`icon2_lens.generate_pairs`)."""

    gamma_pos: float = 0.07
    gamma_neg: float = -0.02
    layers: Literal["suggested", "all"] | list[int] = "suggested"
    scale: Literal["relative", "unit"] = "relative"
    positions: Literal["all", "generated"] = "all"
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    batch_size: int = 8


class TrainConfig(_Section):
    """DPO training (`icon2_lens.train_dpo`); ``null`` takes the preset's value."""

    preset: Literal["demo", "paper"] = "demo"
    beta: float | None = None
    learning_rate: float | None = None
    epochs: float | None = None
    max_length: int | None = None
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    max_steps: int = -1
    lora: bool = False


class EvaluateConfig(_Section):
    """Base vs trained evaluation (`icon2_lens.evaluate`) on held-out instructions."""

    instructions: str = "heldout"
    n: int | None = 16
    max_new_tokens: int = 96
    judge: str | None = None
    batch_size: int = 8


class RunConfig(_Section):
    """A whole run. Unknown keys and wrong types are errors naming the key.

    Every field has a default: the demo size, which runs on the embedded model in minutes on a
    2-core CPU. ``model``: what `icon2_lens.load_model` accepts (``null``: the embedded model).

    Examples:
        >>> RunConfig.model_validate({"synthesize": {"n": 32}}).synthesize.n
        32
    """

    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    seed: int = 0
    extract: ExtractConfig = ExtractConfig()
    layers: LayersConfig = LayersConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    score: ScoreConfig = ScoreConfig()
    generate: GenerateConfig = GenerateConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def to_dict(self) -> dict[str, Any]:
        """The full config with every default filled in (what ``config.yaml`` holds)."""
        return self.model_dump(mode="json")


def _validation_message(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        else:
            got = err.get("input")
            lines.append(f"{key}: {err['msg'].rstrip('.')} (got {got!r})")
    return f"Invalid config {where}: " + "; ".join(lines) + ". See `icon2-lens run --help` and docs/pipeline.md."


def load_config(source: "str | os.PathLike[str] | dict[str, Any] | RunConfig | None" = None) -> RunConfig:
    """Read and validate a run config: a YAML file, a dict, a `RunConfig`, or ``None`` for the defaults.

    Raises:
        ValueError: an unknown key or a value of the wrong type, naming the key.

    Examples:
        >>> load_config({"generate": {"gamma_pos": 0.05}}).generate.gamma_pos
        0.05
    """
    if source is None:
        return RunConfig()
    if isinstance(source, RunConfig):
        return source
    where = "(dict)"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        where = str(path)
        try:
            source = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(source, dict):
        raise ValueError(f"Invalid config {where}: expected a mapping of sections, got {type(source).__name__}.")
    try:
        return RunConfig.model_validate(source)
    except ValidationError as exc:
        raise ValueError(_validation_message(exc, where)) from None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_keys(config: RunConfig) -> dict[str, str]:
    """Each stage's key: a hash of its settings, the model settings and its input stages' keys.

    Examples:
        >>> a = stage_keys(RunConfig()); b = stage_keys(RunConfig.model_validate({"train": {"beta": 0.2}}))
        >>> [s for s in a if a[s] != b[s]]
        ['train', 'evaluate']
    """
    cfg = config.to_dict()
    model = {"model": cfg["model"], "dtype": cfg["dtype"], "seed": cfg["seed"]}
    keys: dict[str, str] = {}
    for stage, inputs in STAGES.items():
        keys[stage] = _hash({"stage": stage, "settings": cfg[stage], "model": model,
                             "inputs": {i: keys[i] for i in inputs}})
    return keys


@dataclass
class PipelineResult:
    """What a run did.

    Attributes:
        out: the run directory.
        report: its ``report.md``.
        ran: stages run (or resumed) this time.
        skipped: stages skipped as finished.
        costs: each stage's `icon2_lens.costs.StageCost`, in order.
        metrics: the evaluation metrics (``evaluate/metrics.json``).
    """

    out: Path
    report: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    costs: list[StageCost] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class _Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self.stages = json.loads(path.read_text()).get("stages", {})

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"version": 1, "stages": self.stages}, indent=2))

    def finished(self, stage: str, key: str, folder: Path) -> bool:
        e = self.stages.get(stage, {})
        return e.get("key") == key and e.get("status") == "finished" and folder.is_dir()


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _prepare_run_dir(out: Path, config: RunConfig | None, update: bool) -> RunConfig:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; choose another run directory.")
    cfg_path = out / "config.yaml"
    if out.is_dir() and any(out.iterdir()) and not cfg_path.is_file():
        raise FileExistsError(f"{out} exists, is not empty and holds no run (no config.yaml); choose another directory.")
    if cfg_path.is_file():
        old = load_config(cfg_path)
        if config is None:
            return old
        diff = _config_diff(old.to_dict(), config.to_dict())
        if diff and not update:
            raise ValueError(
                f"{out} was written by a different config ({'; '.join(diff)}). Pass update=True "
                "(CLI: --update) to apply the new config, which re-runs the changed stages and those "
                "downstream of them, or choose another run directory.")
    config = config or RunConfig()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config


def run_pipeline(
    config: "str | os.PathLike[str] | dict[str, Any] | RunConfig | None" = None,
    *,
    out: str | os.PathLike[str] = "runs/icon2",
    update: bool = False,
    stop_after: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PipelineResult:
    """Run (or resume) the whole method into a run directory and write ``report.md``.

    Args:
        config: a YAML file, a dict, a `RunConfig`, or ``None``: the run directory's own
            ``config.yaml`` if it has one, else the defaults (the demo size).
        out: the run directory.
        update: accept a config that differs from the one the run directory was written with;
            the stages whose settings changed, and those downstream of them, are re-run.
        stop_after: stop after this stage (e.g. ``"generate"`` to make pairs only).
        progress: progress bars inside the stages.
        log: where stage lines go (``None``: silent).

    Returns:
        A `PipelineResult` (the report path, stages run and skipped, costs, metrics).

    Raises:
        ValueError: an invalid config (naming the key), or a run directory written by another
            config without ``update``.

    Examples:
        >>> res = il.run_pipeline({"synthesize": {"n": 32}}, out="runs/small")  # doctest: +SKIP
        >>> res.report  # doctest: +SKIP
        PosixPath('runs/small/report.md')
    """
    say = log or (lambda _msg: None)
    out = Path(out)
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r} is not a stage; use one of {list(STAGES)}.")
    cfg = _prepare_run_dir(out, load_config(config) if config is not None else None, update)
    keys = stage_keys(cfg)
    manifest = _Manifest(out / "manifest.json")
    ctx = _Context(cfg, out, progress)
    result = PipelineResult(out=out, report=out / "report.md")
    order = list(STAGES)
    if stop_after is not None:
        order = order[:order.index(stop_after) + 1]
    t0 = time.perf_counter()
    try:
        for i, stage in enumerate(order, 1):
            folder = out / stage
            tag = f"[{i}/{len(order)}] {stage}"
            rerun_inputs = [s for s in STAGES[stage] if s in result.ran]  # their outputs were rewritten just now
            if not rerun_inputs and manifest.finished(stage, keys[stage], folder):
                say(f"{tag}: finished earlier with the same settings, skipped")
                result.skipped.append(stage)
                continue
            entry = manifest.stages.get(stage, {})
            if not rerun_inputs and entry.get("key") == keys[stage] and folder.is_dir():
                say(f"{tag}: resuming an interrupted run")
            else:
                if folder.exists():
                    why = f"{', '.join(rerun_inputs)} ran again" if rerun_inputs else "settings or inputs changed"
                    say(f"{tag}: {why}, re-running")
                    shutil.rmtree(folder)
                else:
                    say(f"{tag}: running")
            manifest.stages[stage] = {"key": keys[stage], "status": "running", "inputs": {s: keys[s] for s in STAGES[stage]},
                                      "settings": cfg.to_dict()[stage], "started": _now()}
            manifest.save()
            folder.mkdir(parents=True, exist_ok=True)
            with measure_costs(stage, *ctx.models_for(stage)) as meter:
                rows, outputs = _RUNNERS[stage](ctx, folder, meter)
                meter.costs.rows = rows
            meter.costs.save(folder)
            manifest.stages[stage].update(status="finished", finished=_now(), rows=rows,
                                          wall_seconds=meter.costs.wall_seconds,
                                          outputs=[str(p.relative_to(out)) for p in outputs])
            manifest.save()
            result.ran.append(stage)
            say(f"{tag}: done in {meter.costs.wall_seconds:.0f} s -> {folder}")
    finally:
        ctx.close()
    result.costs = [load_costs(out / s) for s in order if (out / s / "costs.json").is_file()]
    if (out / "evaluate" / "metrics.json").is_file():
        result.metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    atomic_write_text(result.report, _report(cfg, out, result, order))
    say(f"run finished in {time.perf_counter() - t0:.0f} s; report: {result.report}")
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class _Context:
    """Loads the base model once, only if a stage needs it."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            import torch

            from ..models import load_model

            self._model = load_model(self.cfg.model, device=self.cfg.device, dtype=getattr(torch, self.cfg.dtype))
        return self._model

    def models_for(self, stage: str) -> list[Any]:
        if stage == "train" or (stage == "synthesize" and self.cfg.synthesize.source is not None):
            return []  # train_dpo loads fresh HF models and watches them itself
        return [self.model]

    def directions(self) -> Any:
        from ..directions import DirectionSet

        return DirectionSet.load(self.out / "layers" / "directions")

    def close(self) -> None:
        self._model = None


def _extract(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    from ..directions import extract_directions
    from ..instructions import load_instructions

    c = ctx.cfg.extract
    dirs = extract_directions(ctx.model, c.criteria, load_instructions(c.instructions, limit=c.n_instructions),
                              method=c.method, hook=c.hook, batch_size=c.batch_size, stability=c.stability,
                              seed=ctx.cfg.seed, progress=ctx.progress)
    dirs.save(folder / "directions", overwrite=True)  # a resumed stage may find it written already
    return len(dirs.criteria), [folder / "directions"]


def _layers(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    from ..directions import DirectionSet
    from ..layers import layer_report

    c = ctx.cfg.layers
    dirs = DirectionSet.load(ctx.out / "extract" / "directions", model=ctx.model)
    report = layer_report(ctx.model, dirs, n_heldout=c.n_heldout, n_paraphrase_instructions=c.n_paraphrase_instructions,
                          width=c.width, batch_size=c.batch_size, progress=ctx.progress)
    written = report.save(folder)
    target = report.apply(dirs).save(folder / "directions", overwrite=True)
    return len(report.suggested_layers), [*written.values(), target]


def _synthesize(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    from ..synthesis import synthesize_instructions

    c = ctx.cfg.synthesize
    if c.source is not None:
        from ..instructions import load_instructions

        rows = load_instructions(c.source)
        atomic_write_text(folder / "instructions.jsonl", "".join(json.dumps({"instruction": q}) + "\n" for q in rows))
        return len(rows), [folder / "instructions.jsonl"]
    ds = synthesize_instructions(ctx.model, c.n, temperature=c.temperature, top_p=c.top_p,
                                 max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, seed=ctx.cfg.seed,
                                 system_prompt=c.system_prompt, min_words=c.min_words, max_words=c.max_words,
                                 near_duplicate_threshold=c.near_duplicate_threshold, out=folder,
                                 progress=ctx.progress)
    return len(ds), [folder / "instructions.jsonl", folder / "report.json"]


def _score(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    from ..scoring import save_scores, score_instructions

    c = ctx.cfg.score
    table = score_instructions(ctx.model, ctx.directions(), ctx.out / "synthesize", layers=c.layers,  # type: ignore[arg-type]
                               standardize=c.standardize, render=c.render, batch_size=c.batch_size,
                               progress=ctx.progress)
    paths = save_scores(table, folder, top_fraction=c.top_fraction, top_k=c.top_k, threshold=c.threshold,
                        balance_criteria=c.balance_criteria, overwrite=True)
    return _count_lines(folder / "selected.jsonl"), paths


def _steering_layers(ctx: _Context, dirs: Any) -> list[int]:
    from ..scoring import scoring_layers

    return scoring_layers(dirs, ctx.cfg.generate.layers)


def _generate(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    from ..evaluation import ProbeScorer, pair_report
    from ..pairs import generate_pairs

    c = ctx.cfg.generate
    dirs = ctx.directions()
    layers = _steering_layers(ctx, dirs)
    pairs = generate_pairs(ctx.model, dirs, ctx.out / "score" / "selected.jsonl", gamma_pos=c.gamma_pos,
                           gamma_neg=c.gamma_neg, layers=layers, scale=c.scale, positions=c.positions,
                           max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, temperature=c.temperature,
                           top_p=c.top_p, repetition_penalty=c.repetition_penalty, batch_size=c.batch_size,
                           seed=ctx.cfg.seed, out=folder, progress=ctx.progress)
    report = pair_report(pairs, scorer=ProbeScorer(ctx.model, dirs, layers=layers))
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))
    return len(pairs), [folder / "pairs.jsonl", folder / "report.json"]


def _train(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    from ..training import train_dpo

    c = ctx.cfg.train
    res = train_dpo(ctx.out / "generate", model_source=ctx.cfg.model, output_dir=folder / "trained_model", preset=c.preset,
                    beta=c.beta, learning_rate=c.learning_rate, epochs=c.epochs, max_length=c.max_length,
                    batch_size=c.batch_size, gradient_accumulation=c.gradient_accumulation, max_steps=c.max_steps,
                    lora=c.lora, seed=ctx.cfg.seed, device=ctx.cfg.device, overwrite=True, progress=ctx.progress,
                    costs=meter)
    return res.steps, [res.output_dir, res.log_path, res.curve_path]


def _evaluate(ctx: _Context, folder: Path, meter: Any) -> tuple[int, list[Path]]:
    import torch

    from ..evaluation import PairwiseJudge, evaluate
    from ..instructions import load_instructions
    from ..models import load_model

    c = ctx.cfg.evaluate
    dirs = ctx.directions()
    trained = load_model(ctx.out / "train" / "trained_model", device=ctx.cfg.device, dtype=getattr(torch, ctx.cfg.dtype))
    meter.watch_model(trained)
    judge = None
    if c.judge is not None:
        jm = load_model(c.judge, device=ctx.cfg.device)
        meter.watch_model(jm)
        judge = PairwiseJudge(jm)
    trained_on = [r["instruction"] for r in read_jsonl(ctx.out / "generate" / "pairs.jsonl")]
    instructions = load_instructions(c.instructions, limit=c.n)
    evaluate(ctx.model, trained, dirs, instructions, judge=judge, layers=_steering_layers(ctx, dirs),
             max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, training_instructions=trained_on,
             out=folder, overwrite=True, progress=ctx.progress)
    return len(instructions), [folder / "report.md", folder / "metrics.json"]


_RUNNERS: dict[str, Callable[[_Context, Path, Any], tuple[int, list[Path]]]] = {
    "extract": _extract, "layers": _layers, "synthesize": _synthesize, "score": _score,
    "generate": _generate, "train": _train, "evaluate": _evaluate,
}


def _report(cfg: RunConfig, out: Path, result: PipelineResult, order: list[str]) -> str:
    costs = result.costs
    n_pairs = next((c.rows for c in costs if c.stage == "generate"), None)
    total = sum(c.wall_seconds for c in costs)
    lines = [f"# icon2_lens run: {out}", "",
             f"Model: {cfg.model or 'embedded SmolLM2-135M-Instruct'}; seed {cfg.seed}. "
             f"Stages: {', '.join(order)}. Stage wall time summed: {total:.0f} s "
             f"({total / 60:.1f} min; this invocation ran {', '.join(result.ran) or 'nothing'}, "
             f"skipped {', '.join(result.skipped) or 'nothing'}).", "",
             "## Cost per stage", "",
             "Counted by `icon2_lens.measure_costs` (forward pre-hooks on the watched models; see docs/pipeline.md). "
             "A resumed stage counts the run that finished it.", "",
             cost_table(costs, per=("kept pair", n_pairs) if n_pairs else None)]
    sel = out / "score" / "selected.jsonl"
    if sel.is_file():
        lines += ["## Data", "",
                  f"- synthesized instructions kept: {_count_lines(out / 'synthesize' / 'instructions.jsonl')}",
                  f"- selected by consistency: {_count_lines(sel)}",
                  f"- preference pairs: {n_pairs if n_pairs is not None else '-'}", ""]
    gen_report = out / "generate" / "report.json"
    if gen_report.is_file():
        g = json.loads(gen_report.read_text())
        if "win_share" in g:
            lines += [f"Chosen beats rejected ({g['scorer']}, neither degenerate) in {g['win_share']:.3f} of the "
                      f"pairs; degenerate: chosen {g['chosen']['degenerate_share']:.2f}, rejected "
                      f"{g['rejected']['degenerate_share']:.2f}.", ""]
    curve = out / "train" / "trained_model" / "train_curve.png"
    if curve.is_file():
        from ..training import load_train_log

        hist = load_train_log(out / "train" / "trained_model")
        if hist:
            a, b = hist[0], hist[-1]
            lines += ["## DPO training", "",
                      f"{len(hist)} logged steps: loss {a['loss']:.4f} -> {b['loss']:.4f}, reward accuracy "
                      f"{b.get('reward_accuracy', float('nan')):.2f}, margin {b.get('reward_margin', float('nan')):.3f}.",
                      "", "![DPO curve](train/trained_model/train_curve.png)", ""]
    ev = out / "evaluate" / "report.md"
    if ev.is_file():
        body = ev.read_text().split("\n", 1)[1]
        lines += [ev.read_text().split("\n", 1)[0].replace("# ", "## "), body.replace("## ", "### "),
                  "![probe shift](evaluate/probe_shift.png)", ""]
    return "\n".join(lines)


def _count_lines(path: Path) -> int:
    return sum(1 for x in path.read_text(encoding="utf-8").splitlines() if x.strip()) if path.is_file() else 0
