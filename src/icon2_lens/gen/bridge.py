"""The bridge engine: TransformerLens hook points and the bridge's own ``generate``.

Slower than `icon2_lens.gen.hf.HFEngine` (the bridge's decoding loop and eager attention), but it
runs exactly the hook points a mechanistic-analysis notebook sees (``blocks.{l}.hook_resid_post``),
so it is the reference the fast path is tested against.

It decodes without the KV cache: with TransformerLens 4.3 on transformers 5.24 the bridge's cached
decoding drifts from the model's own function after the first token (greedy tokens differ from a
token-by-token full forward of the same bridge, with or without padding or steering; measured
2026-12-01), while uncached decoding equals it and the HF engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..models import LoadedModel
from .base import Decoding, Generation, Seed, SteerSpec, stop_ids
from .batching import LogitScoring, decode_rows, encode, padded_batch, seeded
from .hooks import SteerAdder

__all__ = ["BridgeEngine"]


class BridgeEngine(LogitScoring):
    """A `icon2_lens.gen.Generator` on the TransformerBridge (TransformerLens hooks).

    Per-row seeds generate row by row (the bridge's loop has one RNG stream per call).

    Examples:
        >>> eng = il.gen.engine(model, "bridge")  # doctest: +SKIP
    """

    name = "bridge"

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.tokenizer = model, model.tokenizer

    @cached_property
    def stop_ids(self) -> list[int]:
        """The default stop of `generate`: the chat template's end-of-turn token and EOS (worked out once)."""
        return stop_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        """Where the bridge runs."""
        return self.model.device

    @contextmanager
    def steering(self, spec: SteerSpec) -> Iterator[list[SteerAdder]]:
        """Add ``spec`` at the bridge's hook points while inside; hooks are removed on exit, also on error."""
        spec.check_layers(self.model.n_layers, self.model.info.model_id)
        adders = [SteerAdder(spec.vectors[layer], positions=spec.positions) for layer in spec.layers]
        hooks = []
        for layer, add in zip(spec.layers, adders, strict=True):
            def fn(act: Tensor, hook: Any = None, add: SteerAdder = add) -> Tensor:
                return add(act)

            hooks.append((f"blocks.{layer}.hook_{spec.hook}", fn))
        with ExitStack() as stack:
            stack.enter_context(self.model.bridge.hooks(fwd_hooks=hooks))
            yield adders

    def forward_logits(self, input_ids: Tensor, mask: Tensor) -> Float[Tensor, "batch width vocab"]:
        """Logits of a left-padded batch (the bridge derives position ids from the mask)."""
        return self.model.bridge(input_ids, attention_mask=mask)

    def generate(self, prompts: Sequence[str], decoding: Decoding, *, steer: SteerSpec | None = None,
                 seed: Seed = 0, stop: Sequence[int] | None = None) -> list[Generation]:
        """Generate one response per prompt with the bridge's ``generate`` (see `icon2_lens.gen.Generator`)."""
        if not isinstance(seed, int):
            seeds = list(seed)
            if len(seeds) != len(prompts):
                raise ValueError(f"Got {len(seeds)} row seeds for {len(prompts)} prompts; give one per prompt.")
            if steer is not None and steer.rows not in (1, len(prompts)):
                raise ValueError(f"Per-row steering has {steer.rows} rows but there are {len(prompts)} prompts.")
            out = []
            for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
                row = None if steer is None else SteerSpec(
                    {k: v[i:i + 1] if v.shape[0] > 1 else v for k, v in steer.vectors.items()},
                    hook=steer.hook, positions=steer.positions)
                out.extend(self.generate([p], decoding, steer=row, seed=s, stop=stop))
            return out
        tok = self.tokenizer
        input_ids, mask = padded_batch(tok, encode(tok, prompts), self.device)
        stop = list(stop) if stop is not None else self.stop_ids
        if steer is not None and steer.rows not in (1, len(prompts)):
            raise ValueError(f"Per-row steering has {steer.rows} rows but there are {len(prompts)} prompts.")
        with seeded(seed, self.device), torch.inference_mode(), \
                (self.steering(steer) if steer is not None else nullcontext()):
            out_ids = self.model.bridge.generate(
                input_ids, attention_mask=mask, max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                temperature=decoding.temperature, top_p=decoding.top_p if decoding.do_sample else None,
                repetition_penalty=decoding.repetition_penalty, eos_token_id=stop, stop_at_eos=True,
                use_past_kv_cache=False, return_type="tokens", verbose=False, prepend_bos=False)
        return decode_rows(tok, out_ids[:, input_ids.shape[1]:], stop)
