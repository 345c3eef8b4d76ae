"""`TrainConfig`: the settings of `icon2_lens.training.train`, the one source of their defaults, and the presets."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["TrainConfig", "PRESETS", "PRESET_OBJECTIVE"]

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
PRESET_OBJECTIVE: dict[str, str] = {"sao": "simpo"}
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
        finished_only: train only on pairs whose both responses ended with the end-of-turn token (rows with
            ``chosen_finished`` / ``rejected_finished`` columns; rows without them count as finished). A
            response cut at the token budget would otherwise get TRL's end-of-turn token appended and teach
            the model to stop mid-sentence. The count dropped is logged and written to ``train_config.json``.
        trim_unfinished: cut an unfinished response after its last complete sentence
            (`icon2_lens.math.trim_to_sentence`) instead of dropping its pair; when a side cannot be trimmed (it
            would keep less than half its text) the pair is dropped with ``finished_only``, kept as cut without.
            The count trimmed is logged and recorded too.

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
    finished_only: bool = True
    trim_unfinished: bool = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.preset not in PRESETS:  # pragma: no cover - the Literal check above covers it
            raise ValueError(f"Unknown preset {self.preset!r}; use one of {sorted(PRESETS)}.")
        need = PRESET_OBJECTIVE.get(self.preset)
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


def check_type(name: str, value: Any, hint: Any) -> None:
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


