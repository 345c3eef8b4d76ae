"""Running TRL's trainers for `icon2_lens.training.train`: DPO (``DPOTrainer``) or SimPO (``CPOTrainer``).

The precision and gradient checkpointing are always passed explicitly (never TRL's defaults); every
logging step is appended to ``train_log.jsonl``; the trained model is saved with its tokenizer and curve.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from ..reports import train_curve_figure
from .config import TrainConfig

__all__ = ["run_trainer", "scratch_folder", "checkpointing_kwargs", "cpo_classes", "LOG_KEYS"]

#: TRL's log keys -> the names in ``train_log.jsonl``.
LOG_KEYS = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
             "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected", "learning_rate": "learning_rate"}


def checkpointing_kwargs(config_class: type, on: bool) -> dict[str, Any]:
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
def scratch_folder(out: Path, rank: int) -> Iterator[Path]:
    """A throw-away folder for a non-main training process (its copy of the outputs is discarded)."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.rank{rank}.", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cpo_classes() -> tuple[type, type]:
    """TRL's CPOConfig and CPOTrainer (in ``trl.experimental`` since TRL 0.2x; its import warning silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    return CPOConfig, CPOTrainer


def run_trainer(policy: Any, ref: Any, peft_config: Any, tokenizer: Any, dataset: Any, cfg: dict[str, Any], *,
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
            row.update({name: float(logs[key]) for key, name in LOG_KEYS.items() if logs and key in logs})
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
        CPOConfig, CPOTrainer = cpo_classes()
        args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg["simpo_gamma"],
                         **checkpointing_kwargs(CPOConfig, config.gradient_checkpointing))
        trainer = CPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[_Log()])
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, **checkpointing_kwargs(DPOConfig, config.gradient_checkpointing))
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
    train_curve_figure(history, objective=config.objective).savefig(out / "train_curve.png", dpi=110)
    return int(trainer.state.global_step), history
