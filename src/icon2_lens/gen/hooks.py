"""How a `SteerSpec` is added to an activation: the part every hook-based engine shares.

Hooks see ``[batch, prompt, d]`` in the prefill and ``[batch, 1, d]`` at each decoding step with the
KV cache (``[batch, prompt + k, d]`` without it). A `PositionTracker` per hook knows which absolute
(padded) positions a call covers, so ``positions="generated"`` steers exactly the positions after the
prompt, including the first generated token when it is fed back, under both cache modes.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from .base import Positions

__all__ = ["PositionTracker", "SteerAdder"]


class PositionTracker:
    """Absolute (padded) positions covered by successive calls of one hook within one generation.

    Examples:
        >>> t = PositionTracker(); t.positions(5), t.positions(1), t.prompt_len
        ((0, 5), (5, 6), 5)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the prompt (a new generation starts)."""
        self.next_pos = 0
        self.prompt_len: int | None = None

    def positions(self, seq_len: int) -> tuple[int, int]:
        """``(start, end)`` of the positions a call with ``seq_len`` positions covers."""
        if self.next_pos > 0 and seq_len == 1:
            start = self.next_pos  # a decoding step with the KV cache: one new token
        elif self.next_pos > 0 and seq_len == self.next_pos + 1:
            start = 0  # a decoding step without the cache: the whole sequence again, one longer
        else:
            start = 0  # a prefill: a new prompt
            self.prompt_len = seq_len
        self.next_pos = start + seq_len
        return start, start + seq_len


class SteerAdder:
    """Adds one layer's vector to activations, at all positions or only the generated ones.

    ``calls`` counts the calls that changed activations (for tests and diagnostics).

    Examples:
        >>> add = SteerAdder(torch.ones(1, 4), positions="all")  # doctest: +SKIP
        >>> add(torch.zeros(2, 3, 4)).sum().item()  # doctest: +SKIP
        24.0
    """

    def __init__(self, vector: Float[Tensor, "rows d_model"], *, positions: Positions) -> None:
        self.vector, self.positions = vector, positions
        self.tracker = PositionTracker()
        self.calls = 0

    def __call__(self, act: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        vec = self.vector
        if act.shape[0] != vec.shape[0] and vec.shape[0] != 1:
            raise ValueError(f"Per-row steering has {vec.shape[0]} rows but the batch has {act.shape[0]}.")
        start, _ = self.tracker.positions(act.shape[1])
        delta = vec.to(device=act.device, dtype=act.dtype)[:, None, :]
        if self.positions == "all":
            self.calls += 1
            return act + delta
        first = max(self.tracker.prompt_len or 0, start) - start  # first local index after the prompt
        if first >= act.shape[1]:
            return act
        self.calls += 1
        out = act.clone()
        out[:, first:] += delta
        return out
