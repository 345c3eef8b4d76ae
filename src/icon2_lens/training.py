"""Offline DPO on preference pairs with TRL (METHOD.md section 5).

The policy and the reference are two fresh plain HF models loaded from the same source (never the
bridge's rewritten model), and the reference is passed to TRL explicitly: TRL's default reloads
it from ``config._name_or_path``, which fails for the GGUF-derived embedded model (PITFALLS.md).
Every logging step appends loss, reward accuracy and reward margin to ``train_log.jsonl``; the
curve is drawn to ``train_curve.png``; the trained model is saved as a normal HF folder (with the
tokenizer and its chat template) that `icon2_lens.load_model` opens.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from .runs.io import atomic_folder, atomic_write_text

if TYPE_CHECKING:
    import datasets

    from .runs.costs import CostMeter
    import matplotlib.figure

__all__ = ["train_dpo", "TrainResult", "PRESETS", "load_train_log", "train_curve"]

#: Named hyperparameter sets. ``"demo"``: CPU-friendly for the embedded model; ``"paper"``: the
#: paper's DPO settings (1 epoch, beta 0.1, lr 5e-7, cosine, 10% warm-up, global batch 128).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"beta": 0.1, "learning_rate": 5e-6, "epochs": 1, "batch_size": 2, "gradient_accumulation": 1,
             "max_length": 384, "warmup_ratio": 0.1, "scheduler": "cosine"},
    "paper": {"beta": 0.1, "learning_rate": 5e-7, "epochs": 1, "batch_size": 8, "gradient_accumulation": 16,
              "max_length": 1024, "warmup_ratio": 0.1, "scheduler": "cosine"},
}
_LOG_KEYS = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
             "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected", "learning_rate": "learning_rate"}


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


def train_curve(history: list[dict[str, Any]]) -> "matplotlib.figure.Figure":
    """Loss, reward accuracy and reward margin per step (no pyplot, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(axes, ("loss", "reward_accuracy", "reward_margin"),
                              ("DPO loss", "reward accuracy", "reward margin")):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def _pairs_dataset(pairs: Any) -> "datasets.Dataset":
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
    costs: "CostMeter | None" = None,
) -> TrainResult:
    """Train a fresh copy of the model with DPO on ``pairs`` and save it as an HF folder.

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
        costs: a `icon2_lens.costs.CostMeter` (from `icon2_lens.measure_costs`) that should count the
            forward passes and tokens of the policy and reference models made here.

    Returns:
        A `TrainResult`. The folder is written atomically: an interrupted run leaves no partial folder.

    Examples:
        >>> res = il.train_dpo("runs/pairs", output_dir="runs/trained", max_steps=10)  # doctest: +SKIP
        >>> trained = il.load_model(res.output_dir)  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .runs.io import check_output_folder
    from .models import _resolve_source

    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; use one of {sorted(PRESETS)}.")
    cfg = dict(PRESETS[preset])
    for k, v in {"beta": beta, "learning_rate": learning_rate, "epochs": epochs, "max_length": max_length,
                 "batch_size": batch_size, "gradient_accumulation": gradient_accumulation}.items():
        if v is not None:
            cfg[k] = v
    if cfg["beta"] <= 0 or cfg["learning_rate"] <= 0 or cfg["batch_size"] < 1 or cfg["gradient_accumulation"] < 1:
        raise ValueError(f"beta, learning_rate, batch_size and gradient_accumulation must be positive: {cfg}.")
    out = check_output_folder(output_dir, overwrite=overwrite)
    dataset = _pairs_dataset(pairs)
    _, hf_path, model_id, _ = _resolve_source(model_source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(hf_path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    ref = None
    peft_config = None
    if lora:
        try:
            from peft import LoraConfig
        except ImportError as exc:
            raise ImportError("lora=True needs peft: pip install peft") from exc
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")
    else:
        ref = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    if costs is not None:
        for m in (policy, ref):
            if m is not None:
                costs.watch(m, stop_ids=[tokenizer.pad_token_id, tokenizer.eos_token_id])
    rank = int(os.environ.get("RANK", "0"))  # under accelerate/torchrun: only process 0 writes the folder
    work = out.parent / f".{out.name}.trainer{rank}"
    target = atomic_folder(out, overwrite=overwrite) if rank == 0 else _scratch_folder(out, rank)
    with target as tmp:
        steps, history = _train(policy, ref, peft_config, tokenizer, dataset, cfg, work=work, out=tmp,
                                max_steps=max_steps, lora=lora, device=device, seed=seed, progress=progress)
        atomic_write_text(tmp / "train_config.json", json.dumps(
            {**cfg, "preset": preset, "max_steps": max_steps, "lora": lora, "seed": seed, "base_model": model_id,
             "n_pairs": len(dataset), "steps": steps}, indent=2))
    return TrainResult(output_dir=out, log_path=out / "train_log.jsonl", curve_path=out / "train_curve.png",
                       steps=steps, history=history)


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


def _train(policy: Any, ref: Any, peft_config: Any, tokenizer: Any, dataset: Any, cfg: dict[str, Any], *,
           work: Path, out: Path, max_steps: int, lora: bool, device: str, seed: int,
           progress: bool) -> tuple[int, list[dict[str, Any]]]:
    """Run TRL's DPOTrainer; save the model, tokenizer, log and curve into ``out`` (the caller's temp folder)."""
    import shutil

    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    log_path = out / "train_log.jsonl"
    history: list[dict[str, Any]] = []

    class _Log(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            row = {"step": int(state.global_step)}
            row.update({name: float(logs[key]) for key, name in _LOG_KEYS.items() if logs and key in logs})
            if len(row) > 1 and "loss" in row:
                history.append(row)
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    args = DPOConfig(
        output_dir=str(work), beta=cfg["beta"], learning_rate=cfg["learning_rate"],
        num_train_epochs=cfg["epochs"], max_steps=max_steps, per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation"], max_length=cfg["max_length"],
        lr_scheduler_type=cfg["scheduler"], warmup_steps=cfg["warmup_ratio"], logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=device == "cpu", seed=seed, disable_tqdm=not progress,
    )
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[_Log()])
    try:
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the trainer's scratch folder (no checkpoints are kept)
    model = trainer.model
    if lora:
        model = model.merge_and_unload()
    model.config.use_cache = True  # the trainer turns the KV cache off; generation from the saved folder needs it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    train_curve(history).savefig(out / "train_curve.png", dpi=110)
    return int(trainer.state.global_step), history
