"""What hook-based engines share around a forward pass: encoding, seeding, per-row sampling, decoding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..activations import left_pad
from .base import Generation, SteerSpec

__all__ = ["LogitScoring", "encode", "padded_batch", "position_ids", "seeded", "decode_rows", "RowGumbel", "pad_id"]


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id (EOS when it has none; `icon2_lens.load_model` sets one)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return int(pid)


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered texts, without added special tokens (chat text carries its own BOS)."""
    if not texts:
        raise ValueError("No prompts to generate from.")
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if any(len(x) == 0 for x in enc):
        raise ValueError("A prompt tokenises to nothing; pass non-empty prompts.")
    return [list(x) for x in enc]


def padded_batch(tokenizer: Any, ids: Sequence[Sequence[int]],
                 device: torch.device | str) -> tuple[Int[Tensor, "batch width"], Int[Tensor, "batch width"]]:
    """Left-padded ids and attention mask on ``device``."""
    input_ids, mask = left_pad(ids, pad_id(tokenizer))
    return input_ids.to(device), mask.to(device)


def position_ids(mask: Int[Tensor, "batch width"]) -> Int[Tensor, "batch width"]:
    """Position ids of a left-padded batch (0 at each row's first real token), as HF ``generate`` makes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside the block and restore the caller's RNG state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class RowGumbel:
    """An HF logits processor that samples each row from its own RNG stream (Gumbel-max).

    Adding Gumbel noise to the (penalised, tempered, top-p-filtered) logits and taking the argmax
    draws from their softmax; each row's noise comes from its own ``torch.Generator``, so a row's
    sample does not depend on the other rows of the batch or on the batching.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Float[Tensor, "batch vocab"]) -> Float[Tensor, "batch vocab"]:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} row seeds for a batch of {scores.shape[0]}.")
        u = torch.stack([torch.rand(scores.shape[1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


def decode_rows(tokenizer: Any, new_tokens: Int[Tensor, "batch new"], stop: Sequence[int]) -> list[Generation]:
    """Cut each row at its first stop token and decode it (special tokens removed, stripped)."""
    stops = set(int(s) for s in stop)
    rows = []
    for seq in new_tokens.tolist():
        cut = next((i for i, t in enumerate(seq) if t in stops), None)
        body = seq if cut is None else seq[:cut]
        rows.append(Generation(text=tokenizer.decode(body, skip_special_tokens=True).strip(), finished=cut is not None,
                               n_tokens=len(body) + (cut is not None), token_ids=body))
    return rows


class LogitScoring:
    """Next-token logits and continuation log-probs for an engine with a batched forward pass.

    A subclass gives ``tokenizer``, ``device``, ``steering(spec)`` and ``forward_logits(ids, mask)``.
    """

    tokenizer: Any

    @property
    def device(self) -> torch.device:  # pragma: no cover - abstract
        raise NotImplementedError

    def steering(self, spec: SteerSpec) -> AbstractContextManager[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_logits(self, input_ids: Tensor, mask: Tensor) -> Float[Tensor, "batch width vocab"]:  # pragma: no cover
        raise NotImplementedError

    def _logits(self, ids: Sequence[Sequence[int]]) -> tuple[Float[Tensor, "batch width vocab"], Tensor]:
        input_ids, mask = padded_batch(self.tokenizer, ids, self.device)
        with torch.inference_mode():
            logits = self.forward_logits(input_ids, mask)
        return logits.float(), input_ids

    def next_token_logits(self, prompts: Sequence[str], *, steer: SteerSpec | None = None,
                          batch_size: int = 8) -> Float[Tensor, "batch vocab"]:
        """Logits of the token after each prompt (float32, CPU), in left-padded batches."""
        ids = encode(self.tokenizer, prompts)
        out = []
        if steer is not None and steer.rows != 1:
            raise ValueError("next_token_logits steers with one vector per layer (rows = 1); batches are cut here.")
        with self.steering(steer) if steer is not None else nullcontext():
            for start in range(0, len(ids), batch_size):
                logits, _ = self._logits(ids[start:start + batch_size])
                out.append(logits[:, -1].cpu())
        return torch.cat(out)

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str], *,
                              batch_size: int = 8) -> list[Float[Tensor, " tokens"]]:
        """Per-token log-probs of each continuation given its prompt (float32, CPU).

        Prompt and continuation are tokenised separately (without added special tokens) and joined.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"Got {len(prompts)} prompts and {len(continuations)} continuations; give one of each.")
        p_ids = encode(self.tokenizer, prompts)
        c_ids = encode(self.tokenizer, continuations)
        out: list[Tensor | None] = [None] * len(p_ids)
        order = sorted(range(len(p_ids)), key=lambda i: len(p_ids[i]) + len(c_ids[i]))  # less padding per batch
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            logits, input_ids = self._logits([p_ids[i] + c_ids[i] for i in rows])
            tail = max(len(c_ids[i]) for i in rows)  # only the continuation positions need a softmax
            logp = torch.log_softmax(logits[:, -tail - 1:-1].float(), dim=-1)
            logp = logp.gather(-1, input_ids[:, -tail:, None])[..., 0].cpu()
            for j, i in enumerate(rows):
                out[i] = logp[j, tail - len(c_ids[i]):].clone()
        return [x for x in out if x is not None]
