"""Offline preference training on pairs with TRL: DPO (METHOD.md section 5) or SimPO (SAO, BASELINES.md 1).

`train` runs either objective from one `TrainConfig`; `train_dpo` is its DPO form with keyword options.
DPO uses TRL's ``DPOTrainer`` with a frozen reference model. SimPO uses TRL's ``CPOTrainer`` with
``loss_type="simpo"`` and ``cpo_alpha=0`` (no behaviour-cloning term): length-averaged log-probabilities,
a target margin ``gamma`` and no reference model.

For DPO the policy and the reference are two fresh plain HF models loaded from the same source
(never the bridge's rewritten model), and the reference is passed to TRL explicitly: TRL's default
reloads it from ``config._name_or_path``, which fails for the GGUF-derived embedded model (PITFALLS.md).
Every logging step appends loss, reward accuracy and reward margin to ``train_log.jsonl``; the
curve is drawn to ``train_curve.png``; the trained model is saved as a normal HF folder (with the
tokenizer and its chat template) that `icon2_lens.load_model` opens.

Precision comes from the hardware (`choose_precision`), never from TRL's defaults: TRL 1.x turns
on bf16 autocast and gradient checkpointing by default, and on a CPU without native bf16 (AVX2
only) autocast emulates bf16 and a step is about ten times slower. The choice is printed and
recorded in ``train_config.json``; gradient checkpointing is off unless asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .hardware import choose_precision
from .models import resolve_source
from .reports import train_curve_figure
from .runs.io import atomic_folder, atomic_write_text

if TYPE_CHECKING:
    import datasets
    import matplotlib.figure

    from .runs.costs import CostMeter

__all__ = ["train", "train_dpo", "TrainConfig", "TrainResult", "PRESETS", "choose_precision", "load_train_log",
           "train_curve"]

#: Named hyperparameter sets. ``"demo"``: CPU-friendly for the embedded model; ``"paper"``: the
#: paper's DPO settings (1 epoch, beta 0.1, lr 5e-7, cosine, 10% warm-up, global batch 128);
#: ``"sao"``: SAO's SimPO settings (beta 10, gamma 3, lr 1e-6, cosine, 10% warm-up, 1 epoch, global
#: batch 128; arXiv 2510.06652 Sec 5.1), SimPO only. ``beta`` is DPO's; with ``objective="simpo"`` the
#: demo and paper presets use ``simpo_beta`` 2.0 (the SimPO paper's usual value: SimPO's beta scales a
#: length-averaged log-probability, not DPO's summed log-ratio) and ``simpo_gamma`` 0.5 (TRL's default).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"beta": 0.1, "learning_rate": 5e-6, "epochs": 1, "batch_size": 2, "gradient_accumulation": 1,
             "max_length": 384, "warmup_ratio": 0.1, "scheduler": "cosine", "simpo_beta": 2.0, "simpo_gamma": 0.5},
    "paper": {"beta": 0.1, "learning_rate": 5e-7, "epochs": 1, "batch_size": 8, "gradient_accumulation": 16,
              "max_length": 1024, "warmup_ratio": 0.1, "scheduler": "cosine", "simpo_beta": 2.0, "simpo_gamma": 0.5},
    "sao": {"beta": 10.0, "learning_rate": 1e-6, "epochs": 1, "batch_size": 8, "gradient_accumulation": 16,
            "max_length": 1024, "warmup_ratio": 0.1, "scheduler": "cosine", "simpo_beta": 10.0, "simpo_gamma": 3.0},
}
#: Presets that belong to one objective (an explicit other objective is an error).
_PRESET_OBJECTIVE: dict[str, str] = {"sao": "simpo"}
_LOG_KEYS = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
             "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected", "learning_rate": "learning_rate"}
# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every training setting in one typed, validated, immutable record (the one source of defaults).

    ``None`` takes the preset's value (`PRESETS`). Wrong types and values raise ``ValueError``
    naming the field, what was wrong and what to do.

    Objective and preset: ``"demo"`` and ``"paper"`` work with either objective. ``"sao"`` is SAO's
    SimPO recipe and needs ``objective="simpo"``: ``TrainConfig(preset="sao")`` (objective left at
    ``"dpo"``) is an error that says so; nothing is switched silently. ``simpo_gamma`` is SimPO's
    and is an error with ``objective="dpo"``.

    Attributes:
        objective: ``"dpo"`` (TRL's DPOTrainer, with a frozen reference model) or ``"simpo"`` (TRL's
            CPOTrainer with the SimPO loss, no reference model).
        preset: ``"demo"`` (CPU-friendly), ``"paper"`` (the paper's DPO settings) or ``"sao"``
            (SAO's SimPO settings; objective ``"simpo"`` only).
        beta: DPO beta, or SimPO beta with ``objective="simpo"`` (``None``: the preset's: 0.1 for DPO;
            2.0 for SimPO, 10 with ``"sao"``).
        learning_rate: peak learning rate (cosine schedule, warm-up 10%).
        epochs: passes over the pairs.
        max_length: tokens per prompt + response.
        batch_size: pairs per device step.
        gradient_accumulation: steps per optimizer update.
        max_steps: stop after this many optimizer steps (``-1``: all epochs).
        lora: train a LoRA adapter (needs ``peft``) and merge it into the saved weights.
        lora_r: the LoRA rank.
        precision: ``"auto"`` (`choose_precision`), ``"fp32"`` or ``"bf16"`` (bf16 autocast over
            fp32 weights).
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
        seed: seed of TRL's trainer.
        simpo_gamma: SimPO's target reward margin (``None``: the preset's, 0.5; 3 with ``"sao"``).

    Examples:
        >>> TrainConfig(learning_rate=1e-5).hyperparameters()["learning_rate"]
        1e-05
        >>> TrainConfig(objective="simpo", preset="sao").hyperparameters()["simpo_gamma"]
        3.0
        >>> TrainConfig(batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be at least 1, got 0; pass a positive integer (or None for the preset's value).
    """

    objective: Literal["dpo", "simpo"] = "dpo"
    preset: Literal["demo", "paper", "sao"] = "demo"
    beta: float | None = None
    learning_rate: float | None = None
    epochs: float | None = None
    max_length: int | None = None
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    max_steps: int = -1
    lora: bool = False
    lora_r: int = 8
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    simpo_gamma: float | None = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.preset not in PRESETS:  # pragma: no cover - the Literal check above covers it
            raise ValueError(f"Unknown preset {self.preset!r}; use one of {sorted(PRESETS)}.")
        need = _PRESET_OBJECTIVE.get(self.preset)
        if need is not None and self.objective != need:
            raise ValueError(f"preset {self.preset!r} is SAO's SimPO recipe (beta 10, gamma 3, lr 1e-6) and needs "
                             f"objective={need!r}, got objective={self.objective!r}; pass objective={need!r}, or "
                             "preset 'demo'/'paper' for DPO.")
        if self.simpo_gamma is not None:
            if self.objective != "simpo":
                raise ValueError(f"simpo_gamma is SimPO's target margin and does nothing with objective="
                                 f"{self.objective!r}; drop it, or pass objective='simpo'.")
            if not self.simpo_gamma >= 0:
                raise ValueError(f"simpo_gamma must be >= 0, got {self.simpo_gamma!r}; SimPO's margin is a "
                                 "non-negative number (SAO uses 3).")
        for name in ("beta", "learning_rate", "epochs"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive, got {v!r}; pass a number > 0 (or None for the preset's "
                                 "value).")
        for name in ("max_length", "batch_size", "gradient_accumulation", "lora_r"):
            v = getattr(self, name)
            if v is not None and v < 1:
                hint = "" if name == "lora_r" else " (or None for the preset's value)"
                raise ValueError(f"{name} must be at least 1, got {v}; pass a positive integer{hint}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (train all epochs) or a positive number of optimizer steps, "
                             f"got {self.max_steps}.")

    def hyperparameters(self) -> dict[str, Any]:
        """The preset's values for this objective, with this config's overrides (what the trainer gets).

        Keys: ``beta``, ``learning_rate``, ``epochs``, ``batch_size``, ``gradient_accumulation``,
        ``max_length``, ``warmup_ratio``, ``scheduler``, and ``simpo_gamma`` for SimPO.

        Examples:
            >>> TrainConfig(preset="paper").hyperparameters()["batch_size"]
            8
            >>> TrainConfig(objective="simpo").hyperparameters()["beta"]
            2.0
        """
        preset = PRESETS[self.preset]
        out = {k: v for k, v in preset.items() if k not in ("simpo_beta", "simpo_gamma")}
        if self.objective == "simpo":
            out["beta"] = preset["simpo_beta"]
            out["simpo_gamma"] = preset["simpo_gamma"] if self.simpo_gamma is None else self.simpo_gamma
        for k in ("beta", "learning_rate", "epochs", "max_length", "batch_size", "gradient_accumulation"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise ValueError unless ``value`` fits ``hint`` (Literal, bool, int, float, ``X | None``)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"Unknown {name} {value!r}; use one of {list(args)}.")
        return
    if args and type(None) in args:  # X | None
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:  # pragma: no cover - every field has one of the types above
        ok = isinstance(value, hint)
    if not ok:
        kind = {bool: "True or False", int: "an integer", float: "a number"}.get(hint, str(hint))
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")


@dataclass
class TrainResult:
    """Where training wrote what, and its last logged figures.

    Attributes:
        output_dir: the saved model folder (opens with `icon2_lens.load_model`).
        log_path: ``train_log.jsonl`` (one JSON object per logging step).
        curve_path: ``train_curve.png``.
        steps: optimizer steps taken.
        history: the logged rows.
    """

    output_dir: Path
    log_path: Path
    curve_path: Path
    steps: int
    history: list[dict[str, Any]]


def load_train_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``train_log.jsonl`` (or of the one inside a training output folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "train_log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def train_curve(history: list[dict[str, Any]], *,
                objective: Literal["dpo", "simpo"] = "dpo") -> matplotlib.figure.Figure:
    """Loss, reward accuracy and reward margin per step (`icon2_lens.reports.train_curve_figure`)."""
    return train_curve_figure(history, objective=objective)


def _pairs_dataset(pairs: Any) -> datasets.Dataset:
    from datasets import Dataset

    if isinstance(pairs, (str, os.PathLike)):
        p = Path(pairs)
        p = p / "pairs.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; generate pairs first (`icon2-lens generate`).")
        rows = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    else:
        rows = [dict(r) for r in pairs]
    if not rows:
        raise ValueError("No pairs to train on; generate pairs first (`icon2-lens generate`).")
    missing = {"prompt", "chosen", "rejected"} - set(rows[0])
    if missing:
        raise ValueError(f"The pairs lack {sorted(missing)}; pass the output of generate_pairs.")
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def train(
    pairs: Any,
    *,
    config: TrainConfig = TrainConfig(),
    model_source: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str],
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    costs: CostMeter | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a fresh copy of the model on ``pairs`` with DPO or SimPO and save it as an HF folder.

    ``config.objective="dpo"``: TRL's DPOTrainer, policy against a frozen reference copy of the same
    model. ``"simpo"``: TRL's CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0`` (pure SimPO, no
    behaviour-cloning term), ``beta`` and ``simpo_gamma`` from the config; no reference model is loaded.
    The precision comes from the hardware unless ``config.precision`` says otherwise (`choose_precision`);
    the choice goes to ``log`` as one line and into ``train_config.json``.

    Args:
        pairs: `icon2_lens.generate_pairs` output, a list of such rows, or a ``generate`` folder /
            ``pairs.jsonl`` (conversational ``prompt``/``chosen``/``rejected``).
        config: every training setting (`TrainConfig`; default: DPO, demo preset, automatic precision).
        model_source: what `icon2_lens.load_model` accepts (default: the embedded model).
        output_dir: the folder to write (refused if it exists and is not empty, unless ``overwrite``).
        device: ``"cpu"``/``"cuda"`` (default: CUDA if available).
        overwrite: replace an existing output folder.
        progress: show the trainer's progress bar.
        costs: a `icon2_lens.runs.costs.CostMeter` (from `icon2_lens.measure_costs`) that should count the
            forward passes and tokens of the models trained (and, for DPO, of the reference) here.
        log: where the one-line precision choice goes (default: ``print``).

    Returns:
        A `TrainResult`. The folder is written atomically: an interrupted run leaves no partial folder.

    Examples:
        >>> cfg = il.training.TrainConfig(objective="simpo", preset="sao", max_steps=10)  # doctest: +SKIP
        >>> res = il.training.train("runs/pairs", config=cfg, output_dir="runs/sao")  # doctest: +SKIP
        training precision: fp32 (CPU without native bf16 (AMD EPYC 7B13: no avx512_bf16/amx_bf16, ...))
        >>> res.history[-1]["reward_margin"]  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .runs.io import check_output_folder

    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}; build one with "
                         "TrainConfig(objective=..., preset=..., ...).")
    cfg = config.hyperparameters()
    out = check_output_folder(output_dir, overwrite=overwrite)
    dataset = _pairs_dataset(pairs)
    _, hf_path, model_id, _ = resolve_source(model_source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto, reason = choose_precision(device)
    if config.precision == "auto":
        precision = auto
    else:
        precision = config.precision
        reason = f"asked for; auto would choose {auto}: {reason}"
    log(f"training precision: {precision} ({reason})"
        + ("; gradient checkpointing on" if config.gradient_checkpointing else ""))
    tokenizer = AutoTokenizer.from_pretrained(hf_path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    ref = None
    peft_config = None
    if config.lora:
        try:
            from peft import LoraConfig
        except ImportError as exc:
            raise ImportError("lora=True needs peft: pip install peft") from exc
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
    elif config.objective == "dpo":  # SimPO has no reference model
        ref = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    if costs is not None:
        for m in (policy, ref):
            if m is not None:
                costs.watch(m, stop_ids=[tokenizer.pad_token_id, tokenizer.eos_token_id])
    rank = int(os.environ.get("RANK", "0"))  # under accelerate/torchrun: only process 0 writes the folder
    work = out.parent / f".{out.name}.trainer{rank}"
    target = atomic_folder(out, overwrite=overwrite) if rank == 0 else _scratch_folder(out, rank)
    with target as tmp:
        steps, history = _train(policy, ref, peft_config, tokenizer, dataset, cfg, config=config, precision=precision,
                                work=work, out=tmp, device=device, progress=progress)
        atomic_write_text(tmp / "train_config.json", json.dumps(
            {**dataclasses.asdict(config), **cfg, "precision": precision, "precision_asked": config.precision,
             "precision_reason": reason, "base_model": model_id, "n_pairs": len(dataset), "steps": steps},
            indent=2))
    return TrainResult(output_dir=out, log_path=out / "train_log.jsonl", curve_path=out / "train_curve.png",
                       steps=steps, history=history)


def train_dpo(
    pairs: Any,
    *,
    model_source: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str],
    preset: Literal["demo", "paper"] = "demo",
    beta: float | None = None,
    learning_rate: float | None = None,
    epochs: float | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    gradient_accumulation: int | None = None,
    max_steps: int = -1,
    lora: bool = False,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    costs: CostMeter | None = None,
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    gradient_checkpointing: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a fresh copy of the model with DPO on ``pairs`` and save it as an HF folder.

    `train` with ``TrainConfig(objective="dpo", ...)`` built from the keyword options.

    Args:
        pairs: `icon2_lens.generate_pairs` output, a list of such rows, or a ``generate`` folder /
            ``pairs.jsonl`` (conversational ``prompt``/``chosen``/``rejected``).
        model_source: what `icon2_lens.load_model` accepts (default: the embedded model).
        output_dir: the folder to write (refused if it exists and is not empty, unless ``overwrite``).
        preset: ``"demo"`` (CPU-friendly) or ``"paper"``; the keyword options below override it.
        beta: DPO beta.
        learning_rate: peak learning rate (cosine schedule, warm-up 10%).
        epochs: passes over the pairs.
        max_length: tokens per prompt + response.
        batch_size: pairs per device step.
        gradient_accumulation: steps per optimizer update.
        max_steps: stop after this many optimizer steps (``-1``: all epochs).
        lora: train a LoRA adapter (needs ``peft``) and merge it into the saved weights.
        seed: seed of TRL's trainer.
        device: ``"cpu"``/``"cuda"`` (default: CUDA if available).
        overwrite: replace an existing output folder.
        progress: show the trainer's progress bar.
        costs: a `icon2_lens.runs.costs.CostMeter` (from `icon2_lens.measure_costs`) that should count the
            forward passes and tokens of the policy and reference models made here.
        precision: ``"auto"`` (from the hardware, `choose_precision`), ``"fp32"`` or ``"bf16"``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower; off
            by default, unlike TRL's own default).
        log: where the one-line precision choice goes (default: ``print``).

    Returns:
        A `TrainResult`. The folder is written atomically: an interrupted run leaves no partial folder.

    Examples:
        >>> res = il.train_dpo("runs/pairs", output_dir="runs/trained", max_steps=10)  # doctest: +SKIP
        training precision: fp32 (CPU without native bf16 (AMD EPYC 7B13: no avx512_bf16/amx_bf16, ...))
        >>> trained = il.load_model(res.output_dir)  # doctest: +SKIP
    """
    config = TrainConfig(objective="dpo", preset=preset, beta=beta, learning_rate=learning_rate, epochs=epochs,
                         max_length=max_length, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
                         max_steps=max_steps, lora=lora, precision=precision,
                         gradient_checkpointing=gradient_checkpointing, seed=seed)
    return train(pairs, config=config, model_source=model_source, output_dir=output_dir, device=device,
                 overwrite=overwrite, progress=progress, costs=costs, log=log)


def _checkpointing_kwargs(config_class: type, on: bool) -> dict[str, Any]:
    """Gradient checkpointing on or off for a TRL config class, under the name this transformers reads.

    transformers 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing`` and copies the old
    name (whose TRL default is True) into the new one, with a FutureWarning, whenever the new one is
    unset: so the new name is set where it exists, and the old one too, so both agree.
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    out = {"gradient_checkpointing": on}
    if "activation_checkpointing" in names:
        out["activation_checkpointing"] = on
    return out


@contextmanager
def _scratch_folder(out: Path, rank: int) -> Iterator[Path]:
    """A throw-away folder for a non-main training process (its copy of the outputs is discarded)."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.rank{rank}.", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpo_classes() -> tuple[type, type]:
    """TRL's CPOConfig and CPOTrainer (in ``trl.experimental`` since TRL 0.2x; its import warning silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    return CPOConfig, CPOTrainer


def _train(policy: Any, ref: Any, peft_config: Any, tokenizer: Any, dataset: Any, cfg: dict[str, Any], *,
           config: TrainConfig, precision: Literal["fp32", "bf16"], work: Path, out: Path, device: str,
           progress: bool) -> tuple[int, list[dict[str, Any]]]:
    """Run TRL's DPOTrainer or CPOTrainer (SimPO); save the model, tokenizer, log and curve into ``out``."""
    import shutil

    from transformers import TrainerCallback

    log_path = out / "train_log.jsonl"
    history: list[dict[str, Any]] = []

    class _Log(TrainerCallback):
        start = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            row: dict[str, Any] = {"step": int(state.global_step)}
            row.update({name: float(logs[key]) for key, name in _LOG_KEYS.items() if logs and key in logs})
            if len(row) > 1 and "loss" in row:
                row["elapsed_s"] = round(time.perf_counter() - self.start, 3)  # wall time since training began
                history.append(row)
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    common: dict[str, Any] = dict(
        output_dir=str(work), beta=cfg["beta"], learning_rate=cfg["learning_rate"],
        num_train_epochs=cfg["epochs"], max_steps=config.max_steps, per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation"], max_length=cfg["max_length"],
        lr_scheduler_type=cfg["scheduler"], warmup_steps=cfg["warmup_ratio"], logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=device == "cpu", seed=config.seed, disable_tqdm=not progress,
        # explicit, never TRL's defaults (bf16=True, gradient_checkpointing=True): see choose_precision
        bf16=precision == "bf16", fp16=False,
    )
    if config.objective == "simpo":
        CPOConfig, CPOTrainer = _cpo_classes()
        args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg["simpo_gamma"],
                         **_checkpointing_kwargs(CPOConfig, config.gradient_checkpointing))
        trainer = CPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[_Log()])
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, **_checkpointing_kwargs(DPOConfig, config.gradient_checkpointing))
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[_Log()])
    try:
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the trainer's scratch folder (no checkpoints are kept)
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    model.config.use_cache = True  # the trainer turns the KV cache off; generation from the saved folder needs it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    train_curve(history, objective=config.objective).savefig(out / "train_curve.png", dpi=110)
    return int(trainer.state.global_step), history
