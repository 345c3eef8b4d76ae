"""The engine seam: what every stage asks of a model that generates, and what it gets back.

A `Generator` generates from rendered prompts (with an optional `SteerSpec` and a seed), scores
given continuations (per-token log-probs), and reads next-token logits. Stages only talk to this
protocol, so a new engine (vLLM, llama.cpp) is one module that implements it.

`SteerSpec` is declarative: per layer, one vector per batch row (or one for all rows), the hook
kind and which positions are steered. Each engine applies it its own way (torch forward hooks on
the HF decoder layers, TransformerLens hook points, or an engine's control-vector API).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

from ..errors import BadInputError, check_finite
from ..prompts import pre_query_template

__all__ = ["Decoding", "SteerSpec", "Generation", "Generator", "Positions", "SteerHook", "Seed", "stop_ids",
           "row_seed", "check_count"]

#: ``"all"``: every position; ``"generated"``: only positions after the prompt.
Positions = Literal["all", "generated"]
#: The residual hook a steering vector is added at (``resid_post``: output of block ``l``).
SteerHook = Literal["resid_pre", "resid_post"]
#: One seed for the whole call (the batch's RNG stream), or one per row (each row its own stream).
Seed = int | Sequence[int]


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How to decode: token budget, greedy or sampled, and the sampling settings.

    Attributes:
        max_new_tokens: token budget per row (the stop token included).
        do_sample: sample (``True``) or greedy (``False``).
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus mass (with ``do_sample``; ``top_k`` is off).
        repetition_penalty: HF's repetition penalty (1.0: off).

    Examples:
        >>> Decoding(max_new_tokens=32, do_sample=True, temperature=0.7).top_p
        1.0
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_count(self.max_new_tokens, "max_new_tokens")
        check_finite(self.temperature, "temperature")
        if self.temperature <= 0:
            raise BadInputError(f"temperature must be above 0, got {self.temperature}; for greedy decoding leave "
                                "sampling off (do_sample=False).", option="temperature")
        check_finite(self.top_p, "top_p", low=0.0, high=1.0, low_open=True)
        check_finite(self.repetition_penalty, "repetition_penalty", low=0.0, low_open=True)


def check_count(value: int | None, option: str, *, low: int = 1) -> None:
    """Refuse a count (tokens, rows, a batch size) that is not a whole number ``>= low``; ``None`` passes.

    The integer twin of `icon2_lens.errors.check_finite`, used by every config's checks; the error is a
    `icon2_lens.errors.BadInputError` naming ``option``.

    Examples:
        >>> check_count(8, "batch_size")
        >>> try:
        ...     check_count(0, "batch_size")
        ... except BadInputError as e:
        ...     print(e)
        batch_size must be positive, got 0.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{option} must be a whole number, got {value!r}.", option=option)
    if value < low:
        need = "positive" if low == 1 else f">= {low}"
        raise BadInputError(f"{option} must be {need}, got {value}.", option=option)


@dataclass(frozen=True)
class SteerSpec:
    """Vectors to add to the residual stream while generating: per layer, one row per batch row (or one).

    Attributes:
        vectors: layer id -> ``[rows, d_model]`` (``rows`` is 1 or the batch size).
        hook: ``"resid_post"`` (output of block ``l``; HF ``hidden_states[l + 1]``) or ``"resid_pre"``.
        positions: ``"all"`` or ``"generated"`` (only positions after the prompt).

    Examples:
        >>> spec = SteerSpec({3: torch.zeros(2, 8)})
        >>> spec.rows, spec.layers
        (2, [3])
    """

    vectors: Mapping[int, Float[Tensor, "rows d_model"]]
    hook: SteerHook = "resid_post"
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.hook not in ("resid_pre", "resid_post"):
            raise ValueError(f"Steering supports resid_pre and resid_post hooks, not {self.hook!r}.")
        if self.positions not in ("all", "generated"):
            raise ValueError(f"Unknown positions {self.positions!r}; use 'all' or 'generated'.")
        if not self.vectors:
            raise ValueError("A SteerSpec needs at least one layer.")
        rows = {int(v.shape[0]) for v in self.vectors.values() if v.ndim == 2}
        if any(v.ndim != 2 for v in self.vectors.values()) or len(rows - {1}) > 1:
            raise ValueError("SteerSpec vectors must be [rows, d_model] with the same number of rows (or 1) per layer.")

    @property
    def layers(self) -> list[int]:
        """The steered layers, in order."""
        return sorted(int(k) for k in self.vectors)

    @property
    def rows(self) -> int:
        """Rows the spec is for (1: the same vector for every row)."""
        return max(int(v.shape[0]) for v in self.vectors.values())

    def check_layers(self, n_layers: int, model_id: str = "the model") -> None:
        """Raise a clear error if a layer is outside ``0..n_layers-1``."""
        for layer in self.vectors:
            if not 0 <= layer < n_layers:
                raise ValueError(f"Layer {layer} is out of range: {model_id} has layers 0..{n_layers - 1}.")


@dataclass(frozen=True)
class Generation:
    """One generated response.

    Attributes:
        text: the decoded response (special tokens removed, cut at the stop token, stripped).
        finished: a stop token came within the budget.
        n_tokens: generated tokens, the stop token included.
        token_ids: the response's token ids (without the stop token).
    """

    text: str
    finished: bool
    n_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"text", "finished", "n_tokens"}`` (the row format of the stages)."""
        return {"text": self.text, "finished": self.finished, "n_tokens": self.n_tokens}


@runtime_checkable
class Generator(Protocol):
    """What a stage needs from an engine. Implemented by `icon2_lens.gen.hf.HFEngine` and
    `icon2_lens.gen.bridge.BridgeEngine`; a fake in the tests implements it in a few lines.

    Prompts are fully rendered text (chat template applied), tokenised without added special tokens.
    """

    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], decoding: Decoding, *, steer: SteerSpec | None = None,
                 seed: Seed = 0, stop: Sequence[int] | None = None) -> list[Generation]:
        """One `Generation` per prompt; same seed and inputs, same output."""
        ...

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str], *,
                              batch_size: int = 8) -> list[Float[Tensor, " tokens"]]:
        """Per-token log-probs of each continuation after its prompt (float32, CPU)."""
        ...

    def next_token_logits(self, prompts: Sequence[str], *, steer: SteerSpec | None = None,
                          batch_size: int = 8) -> Float[Tensor, "batch vocab"]:
        """Logits of the token after each prompt (float32, CPU)."""
        ...


def stop_ids(tokenizer: Any) -> list[int]:
    """The token ids that end an assistant turn: the chat template's end-of-turn token and EOS.

    Examples:
        >>> stop_ids(model.tokenizer)  # doctest: +SKIP
        [2]
    """
    ids = {pre_query_template(tokenizer).end_of_turn_id} if getattr(tokenizer, "chat_template", None) else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def row_seed(seed: int, *keys: object) -> int:
    """A 48-bit seed derived from ``seed`` and ``keys`` (e.g. the batch index): stable across runs and shards.

    Examples:
        >>> row_seed(0, 3) == row_seed(0, 3) != row_seed(0, 4)
        True
    """
    text = ":".join(str(x) for x in (seed, *keys))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
