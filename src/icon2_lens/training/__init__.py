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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import BadFileError, BadInputError, json_kind, read_text, reading
from ..hardware import choose_precision
from ..models import resolve_source
from ..reports import train_curve_figure
from ..runs.io import atomic_folder, atomic_write_text
from .config import PRESETS, TrainConfig
from .trainer import run_trainer, scratch_folder

if TYPE_CHECKING:
    import datasets
    import matplotlib.figure

    from ..runs.costs import CostMeter

__all__ = ["train", "train_dpo", "TrainConfig", "TrainResult", "PRESETS", "choose_precision", "load_train_log",
           "train_curve"]


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
    with reading(p, what="a training log (JSONL) written by `icon2-lens train`",
                 todo="Pass a training output folder or its train_log.jsonl."):
        return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


def train_curve(history: list[dict[str, Any]], *,
                objective: Literal["dpo", "simpo"] = "dpo") -> matplotlib.figure.Figure:
    """Loss, reward accuracy and reward margin per step (`icon2_lens.reports.train_curve_figure`)."""
    return train_curve_figure(history, objective=objective)


def _is_finished(row: dict[str, Any]) -> bool:
    return row.get("chosen_finished", True) is not False and row.get("rejected_finished", True) is not False


def _trimmed(row: dict[str, Any]) -> dict[str, Any] | None:
    """The row with each unfinished side cut after its last sentence, or ``None`` if a side cannot be."""
    from ..math.text import trim_to_sentence

    out = dict(row)
    for side in ("chosen", "rejected"):
        if row.get(f"{side}_finished", True) is False:
            msgs = row[side]
            text = msgs[-1]["content"] if isinstance(msgs, list) else str(msgs)
            cut = trim_to_sentence(text)
            if cut is None:
                return None
            out[side] = [*msgs[:-1], {**msgs[-1], "content": cut}] if isinstance(msgs, list) else cut
    return out


_PAIRS_TODO = ("Each line must be a JSON object with 'prompt', 'chosen' and 'rejected', each a non-empty text or a "
               "list of chat messages ({'role': ..., 'content': text}), as `icon2-lens generate` writes them.")


def _read_pairs_file(path: Path) -> list[tuple[int, Any]]:
    """The rows of a pairs JSONL file with their line numbers; a line that is not JSON is an error naming both."""
    text = read_text(path, what="a pairs file (JSONL)", todo=_PAIRS_TODO)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BadFileError(path, f"line {i} is not valid JSON (column {exc.colno}: {exc.msg})",
                                   _PAIRS_TODO) from exc
    return out


def _side_problem(key: str, value: Any) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else f"{key!r} is empty"
    if isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"{key!r} is a list whose items are not chat messages with text 'role' and 'content'"
        return None
    kind = "an empty list" if isinstance(value, list) else json_kind(value)
    return f"{key!r} is {kind}, not text or a list of chat messages"


def _pair_problem(row: Any) -> str | None:
    """What keeps ``row`` from being a training pair TRL can read, or ``None``."""
    if not isinstance(row, dict):
        return f"it is {json_kind(row)}, not a JSON object"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        return f"it lacks {', '.join(repr(k) for k in missing)}"
    for key in ("prompt", "chosen", "rejected"):
        problem = _side_problem(key, row[key])
        if problem is not None:
            return problem
    if len({isinstance(row[k], str) for k in ("prompt", "chosen", "rejected")}) > 1:
        return "'prompt', 'chosen' and 'rejected' mix plain text and chat messages; use one form for all three"
    return None


def _pairs_dataset(pairs: Any, *, finished_only: bool = False,
                   trim: bool = False) -> tuple[datasets.Dataset, dict[str, int]]:
    from datasets import Dataset

    where: Path | None = None
    if isinstance(pairs, (str, os.PathLike)):
        p = Path(pairs)
        p = p / "pairs.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; generate pairs first (`icon2-lens generate`).")
        where = p
        numbered = _read_pairs_file(p)
    else:
        numbered = [(i, r if not isinstance(r, dict) else dict(r)) for i, r in enumerate(pairs, 1)]
    if not numbered and where is not None:
        raise BadFileError(where, "holds no pairs (it is empty)", "Generate pairs first (`icon2-lens generate`).")
    if not numbered:
        raise BadInputError("No pairs to train on; generate pairs first (`icon2-lens generate`).", option="pairs")
    not_pairs = 0
    rows = []
    for line, r in numbered:
        if isinstance(r, dict) and r.get("kept") is False:  # a method's row that gave no pair (e.g. a tie)
            not_pairs += 1
            continue
        problem = _pair_problem(r)
        if problem is not None:
            if where is not None:
                raise BadFileError(where, f"line {line}: {problem}", _PAIRS_TODO)
            raise BadInputError(f"Pairs row {line}: {problem}. {_PAIRS_TODO}", option="pairs")
        rows.append(r)
    if not rows:
        problem = (f"None of the {not_pairs} rows is a kept pair (every row has kept: false, e.g. the judge could not "
                   "decide)")
        if where is not None:
            raise BadFileError(where, problem, "Make pairs for more instructions.")
        raise BadInputError(f"{problem}; make pairs for more instructions.", option="pairs")
    counts = {"given": len(rows) + not_pairs, "not_pairs": not_pairs, "dropped": 0, "trimmed": 0}
    if finished_only or trim:
        kept = []
        for r in rows:
            if _is_finished(r):
                kept.append(r)
            elif trim and (t := _trimmed(r)) is not None:
                kept.append(t)
                counts["trimmed"] += 1
            elif not finished_only:
                kept.append(r)  # cannot be trimmed: kept as cut, as finished_only=False asks
        counts["dropped"] = len(rows) - len(kept)
        if not kept:
            raise ValueError(f"None of the {len(rows)} pairs has both responses finished (ended with the end-of-turn "
                             "token)" + (" or trimmable to a sentence end" if trim else "") + "; generate with a "
                             "larger max_new_tokens, trim cut responses to their last sentence with "
                             "TrainConfig(trim_unfinished=True) (CLI: --trim-unfinished), or train on cut responses "
                             "with TrainConfig(finished_only=False) (CLI: --no-finished-only).")
        rows = kept
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]), counts


def train(
    pairs: Any,
    *,
    config: TrainConfig | None = None,
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

    from ..runs.io import check_output_folder

    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}; build one with "
                         "TrainConfig(objective=..., preset=..., ...).")
    cfg = config.hyperparameters()
    out = check_output_folder(output_dir, overwrite=overwrite)
    dataset, counts = _pairs_dataset(pairs, finished_only=config.finished_only, trim=config.trim_unfinished)
    dropped = counts["dropped"]
    if dropped or counts["trimmed"]:
        log(f"training on {len(dataset)} of {counts['given']} pairs: {counts['trimmed']} with a response cut at the "
            f"token budget trimmed to its last sentence, {dropped} left out (finished_only)")
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
    model_label = hf_path if model_source is None else str(model_source)
    model_todo = "Pass a model folder written by save_pretrained, a .gguf file or an HF id (CLI: --model)."
    with reading(model_label, what="an HF causal language model", todo=model_todo):
        tokenizer = AutoTokenizer.from_pretrained(hf_path, local_files_only=True)
        policy = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
        with reading(model_label, what="an HF causal language model", todo=model_todo):
            ref = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    if costs is not None:
        for m in (policy, ref):
            if m is not None:
                costs.watch(m, stop_ids=[tokenizer.pad_token_id, tokenizer.eos_token_id])
    rank = int(os.environ.get("RANK", "0"))  # under accelerate/torchrun: only process 0 writes the folder
    work = out.parent / f".{out.name}.trainer{rank}"
    target = atomic_folder(out, overwrite=overwrite) if rank == 0 else scratch_folder(out, rank)
    with target as tmp:
        steps, history = run_trainer(policy, ref, peft_config, tokenizer, dataset, cfg, config=config,
                                     precision=precision, work=work, out=tmp, device=device, progress=progress)
        atomic_write_text(tmp / "train_config.json", json.dumps(
            {**dataclasses.asdict(config), **cfg, "precision": precision, "precision_asked": config.precision,
             "precision_reason": reason, "base_model": model_id, "n_pairs": len(dataset),
             "n_unfinished_dropped": dropped, "n_unfinished_trimmed": counts["trimmed"],
             "n_not_pairs": counts["not_pairs"], "steps": steps},
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


