"""The whole method as one resumable run: extract -> layers -> synthesize -> score -> generate -> train -> controls
-> evaluate.

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

A stage that fails is marked ``failed`` in the manifest with the error's message (``interrupted`` on
Ctrl-C), never left ``running``; its folder is removed when the stage wrote nothing into it, and kept
(to resume) when it holds rows. The config, with every stage's settings and the device, is checked
before the first stage runs.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import public_path, read_json
from ..reports import run_report
from ..runs import names
from ..runs.costs import StageCost, load_costs, measure_costs
from ..runs.io import atomic_write_text
from ..training import TrainConfig
from .compare import CompareConfig, CompareResult, compare_methods
from .config import RunConfig, load_config, stage_config
from .stages import STAGES as STAGE_SPECS
from .stages import StageContext, StageSpec

__all__ = ["RunConfig", "load_config", "run_pipeline", "PipelineResult", "STAGES", "stage_keys"]

#: The stages in order, with the stages each one reads (from the registry).
STAGES: dict[str, tuple[str, ...]] = {name: spec.inputs for name, spec in STAGE_SPECS.items()}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_keys(config: Any, stages: Mapping[str, StageSpec] | None = None) -> dict[str, str]:
    """Each stage's key: a hash of its settings, the model settings and its input stages' keys.

    Examples:
        >>> a = stage_keys(RunConfig()); b = stage_keys(RunConfig.model_validate({"train": {"beta": 0.2}}))
        >>> [s for s in a if a[s] != b[s]]
        ['train', 'controls', 'evaluate']
    """
    cfg = config.to_dict()
    model = {"model": cfg["model"], "dtype": cfg["dtype"], "seed": cfg["seed"]}
    keys: dict[str, str] = {}
    for stage, inputs in ({n: s.inputs for n, s in stages.items()} if stages else STAGES).items():
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
            data = read_json(path, what="a run manifest (JSON)",
                             todo="Delete it to re-run every stage, or choose another run directory.")
            self.stages = data.get("stages", {}) if isinstance(data, dict) else {}

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


def _prepare_run_dir(out: Path, config: Any, update: bool, stages: Mapping[str, StageSpec]) -> Any:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; choose another run directory.")
    cfg_path = out / names.CONFIG
    if out.is_dir() and any(out.iterdir()) and not cfg_path.is_file():
        raise FileExistsError(f"{out} exists, is not empty and holds no run (no config.yaml); "
                              "choose another directory.")
    if cfg_path.is_file():
        old = load_config(cfg_path, stages=stages)
        if config is None:
            return old
        diff = _config_diff(old.to_dict(), config.to_dict())
        if diff and not update:
            raise ValueError(
                f"{out} was written by a different config ({'; '.join(diff)}). Pass update=True "
                "(CLI: --update) to apply the new config, which re-runs the changed stages and those "
                "downstream of them, or choose another run directory.")
    config = config or load_config(None, stages=stages)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config


def run_pipeline(
    config: str | os.PathLike[str] | dict[str, Any] | RunConfig | None = None,
    *,
    out: str | os.PathLike[str] = "runs/icon2",
    update: bool = False,
    stop_after: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    stages: Mapping[str, StageSpec] | None = None,
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
        stages: a stage registry other than `icon2_lens.pipeline.stages.STAGES`, e.g. with a new
            pair-making method inserted (docs/extending.md); its config sections are validated the same way.

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
    specs = dict(stages) if stages is not None else dict(STAGE_SPECS)
    graph = {name: spec.inputs for name, spec in specs.items()}
    if stop_after is not None and stop_after not in graph:
        raise ValueError(f"stop_after={stop_after!r} is not a stage; use one of {list(graph)}.")
    cfg = _prepare_run_dir(out, load_config(config, stages=specs) if config is not None else None, update, specs)
    keys = stage_keys(cfg, specs)
    manifest = _Manifest(out / names.MANIFEST)
    ctx = StageContext(cfg, out, progress)
    result = PipelineResult(out=out, report=out / names.RUN_REPORT)
    order = list(graph)
    if stop_after is not None:
        order = order[:order.index(stop_after) + 1]
    t0 = time.perf_counter()
    try:
        for i, stage in enumerate(order, 1):
            folder = out / stage
            tag = f"[{i}/{len(order)}] {stage}"
            rerun_inputs = [s for s in graph[stage] if s in result.ran]  # their outputs were rewritten just now
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
            manifest.stages[stage] = {"key": keys[stage], "status": "running",
                                      "inputs": {s: keys[s] for s in graph[stage]},
                                      "settings": cfg.to_dict()[stage], "started": _now()}
            manifest.save()
            made = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            spec, section = specs[stage], getattr(cfg, stage)
            try:
                with measure_costs(stage, *([ctx.model] if spec.uses_model(section) else [])) as meter:
                    rows, outputs = spec.run(ctx, folder, meter, stage_config(spec, section), section)
                    meter.costs.rows = rows
                meter.costs.save(folder)
            except BaseException as exc:
                _mark_failed(manifest, stage, exc)
                if made and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()  # no empty stage folder is left behind
                raise
            manifest.stages[stage].update(status="finished", finished=_now(), rows=rows,
                                          wall_seconds=meter.costs.wall_seconds,
                                          outputs=[str(p.relative_to(out)) for p in outputs])
            manifest.save()
            result.ran.append(stage)
            say(f"{tag}: done in {meter.costs.wall_seconds:.0f} s -> {folder}")
    finally:
        ctx.close()
    result.costs = [load_costs(out / s) for s in order if (out / s / names.COSTS).is_file()]
    if (out / "evaluate" / names.METRICS).is_file():
        result.metrics = json.loads((out / "evaluate" / names.METRICS).read_text())
    atomic_write_text(result.report, _report(cfg, out, result, order))
    say(f"run finished in {time.perf_counter() - t0:.0f} s; report: {result.report}")
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _mark_failed(manifest: _Manifest, stage: str, exc: BaseException) -> None:
    """Record a stage's failure (``failed`` with the error, or ``interrupted``) in the manifest."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    text = public_path(" ".join(str(exc).split())) or type(exc).__name__
    manifest.stages[stage].update(status="interrupted" if interrupted else "failed", ended=_now(),
                                  error=None if interrupted else f"{type(exc).__name__}: {text}")
    manifest.save()


def _report(cfg: Any, out: Path, result: PipelineResult, order: list[str]) -> str:
    """Gather the stage folders' figures for `icon2_lens.reports.run_report`."""
    def read(path: Path) -> str | None:
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def count(path: Path) -> int | None:
        text = read(path)
        return None if text is None else sum(1 for x in text.splitlines() if x.strip())

    log = read(out / "train" / names.TRAINED_MODEL / names.TRAIN_LOG)
    pair_summary = read(out / "generate" / names.PAIR_REPORT)
    return run_report(
        out=str(out), model=cfg.model or "embedded SmolLM2-135M-Instruct", seed=cfg.seed, order=order,
        ran=result.ran, skipped=result.skipped, costs=result.costs,
        counts={"kept": count(out / "synthesize" / names.INSTRUCTIONS),
                "selected": count(out / "score" / names.SELECTED),
                "pairs": next((c.rows for c in result.costs if c.stage == "generate"), None)},
        pair_summary=json.loads(pair_summary) if pair_summary else None,
        train_history=[json.loads(x) for x in log.splitlines() if x.strip()] if log else None,
        objective=getattr(getattr(cfg, "train", None), "objective", "dpo"),
        evaluation_md=read(out / "evaluate" / names.EVAL_REPORT))


def compare(
    config: CompareConfig | None = None,
    *,
    out: str | os.PathLike[str] = "runs/compare",
    model: str | os.PathLike[str] | None = None,
    train_config: TrainConfig | None = None,
    icon2: Mapping[str, Any] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> CompareResult:
    """Icon2 and the competing methods on one instruction pool, one model each, compared (`compare_methods`).

    Runs Icon2's stages up to ``generate`` into ``out/icon2_run`` (resumable; its pool is ``config.n_pool``
    instructions written by the model, or ``config.pool``; it keeps ``config.n``), then `compare_methods`.

    Args:
        config: a `CompareConfig` (methods, sizes, budget, controls).
        out: the comparison folder; a rerun resumes, a changed setting re-runs what depends on it.
        model: the base model (``None``: the embedded SmolLM2-135M-Instruct).
        train_config: the trainer settings every method gets (default: DPO, demo preset, cut answers trimmed).
        icon2: more Icon2 run-config sections (e.g. ``{"generate": {"gamma_pos": 2.0}}``).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA if available).
        seed: the seed of everything.
        progress: progress bars.
        log: where step lines go.

    Examples:
        >>> res = il.compare(CompareConfig(methods=["icon2", "system_prompts"], n=16), out="runs/cmp")  # doctest: +SKIP
        >>> print(res.report.read_text())  # doctest: +SKIP
    """
    cfg = config or CompareConfig()
    run_cfg: dict[str, Any] = {
        "model": None if model is None else str(model), "device": device, "seed": seed,
        "synthesize": {"source": cfg.pool} if cfg.pool is not None else {"n": cfg.n_pool},
        "score": {"top_k": cfg.n},
        "generate": {"max_new_tokens": cfg.max_new_tokens, "repetition_penalty": cfg.repetition_penalty,
                     "batch_size": cfg.batch_size}}
    for section, values in (icon2 or {}).items():
        if isinstance(values, Mapping) and isinstance(run_cfg.get(section), dict):
            run_cfg[section] = {**run_cfg[section], **values}
        else:
            run_cfg[section] = values
    run_pipeline(run_cfg, out=Path(out) / "icon2_run", update=True, stop_after="generate", progress=progress,
                 log=log)
    return compare_methods(Path(out) / "icon2_run", out=out, config=cfg, train_config=train_config, model=model,
                           device=device, seed=seed, progress=progress, log=log)
