"""Last-token residuals with a shared prefix computed once: the KV cache of the tokens every prompt of a batch
starts with is computed for one row and reused for all rows.

Extraction renders every instruction after the same system prompt (a criterion's positive or negative
prompt), and scoring after the same chat-template head; on the embedded model that prefix is 60% of
extraction's prompt tokens (83-85 of 97-120 for the *general* criterion, 14 of 28-49 for the others).
`PrefixReader` is a drop-in for `icon2_lens.activations.LastTokenReader` that:

1. finds the longest token prefix all rows of a batch share (at least two tokens of every row are left
   over, so each row's last token is computed in the batch, and the cost meter counts the pass as a read);
2. runs that prefix once, through the plain HF model that shares the bridge's weights
   (`icon2_lens.gen.hf_model`, HF's own attention and KV cache), and keeps its keys and values for the
   next batches with the same prefix (a few prefixes are kept: extraction alternates positive and
   negative);
3. runs the rows' remaining tokens, right-padded, on top of the repeated cache (positions continue after
   the prefix, the attention mask covers prefix + real tokens), and reads each row's last real token
   at the requested layers through torch forward hooks on the decoder layers; the pass stops after the
   deepest requested layer.

The residuals equal a full forward pass over the whole prompts within float tolerance (tested on the
tiny model and SmolLM2: relative difference about 1e-6 in float32). ``resid_post`` of layer ``l`` is the
output of decoder layer ``l`` (= ``blocks.{l}.hook_resid_post`` = HF ``hidden_states[l + 1]`` before the
final norm), ``resid_pre`` its input. ``resid_mid`` has no HF module boundary in general: `last_token_reader`
gives the bridge's `LastTokenReader` for it, and when prefix reuse is off.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..activations import HookKind, LastTokenReader, check_activations, hook_kind, left_pad, resolve_layers
from ..models import LoadedModel
from .batching import position_ids
from .hf import HFEngine, decoder_layers, shared_hf_model

__all__ = ["PrefixReader", "last_token_reader", "common_prefix_length"]

#: Prefixes (their keys and values) a reader keeps for later batches.
_KEEP_PREFIXES = 4


class _StopForward(Exception):
    """Raised from the deepest requested layer's hook to skip the rest of the forward pass."""


def common_prefix_length(ids: Sequence[Sequence[int]], *, rest: int = 1) -> int:
    """Length of the longest token prefix all rows share, leaving at least ``rest`` tokens of every row.

    Examples:
        >>> common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
        2
        >>> common_prefix_length([[7, 8], [7, 8]]), common_prefix_length([[7, 8, 9], [7, 8, 9]], rest=2)
        (1, 1)
    """
    if not ids:
        return 0
    limit = min(len(x) for x in ids) - rest
    first = ids[0]
    n = 0
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return max(n, 0)


class PrefixReader:
    """Reads the last-token residual at fixed layers, computing each batch's shared token prefix once.

    A drop-in for `icon2_lens.activations.LastTokenReader` (same ``layers``, ``names``, ``read``): use it as a
    context manager; the forward hooks are added on entry and always removed on exit (also on error).
    ``read`` takes token-id lists and returns ``[batch, layer, d_model]`` (float32, CPU).

    Args:
        model: a `icon2_lens.models.LoadedModel`.
        hook: ``"resid_post"`` or ``"resid_pre"`` (also as ``"hook_resid_post"`` / ``"blocks.{layer}.hook_…"``).
        layers: layer indices (default: all).
        min_prefix: a batch whose rows share fewer tokens runs as one left-padded forward pass instead.

    Examples:
        >>> with PrefixReader(model, hook="resid_post") as reader:  # doctest: +SKIP
        ...     h = reader.read(tokenize_texts(model, texts))
    """

    def __init__(self, model: LoadedModel, *, hook: HookKind | str = "resid_post",
                 layers: Sequence[int] | range | None = None, min_prefix: int = 2) -> None:
        kind = hook_kind(hook)
        if kind not in ("resid_post", "resid_pre"):
            raise ValueError(f"PrefixReader reads 'resid_post' or 'resid_pre', not {kind!r}; use LastTokenReader "
                             "(or last_token_reader, which chooses) for it.")
        self.model = model
        self.kind = kind
        self.layers = resolve_layers(model, layers)
        self.names = [f"blocks.{layer}.hook_{kind}" for layer in self.layers]
        pad_id = model.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (load_model sets it to EOS).")
        self._pad_id = int(pad_id)
        self.min_prefix = min_prefix
        if "hf" not in model.engines:  # the cache `icon2_lens.gen.engine` keeps: the HF model is built once
            model.engines["hf"] = HFEngine(model)
        self._hf = model.engines["hf"].hf_model
        self._modules = decoder_layers(self._hf)
        self._deepest = max(self.layers)
        # transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)
        params = inspect.signature(self._hf.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # the prefix pass runs to the end: logits of its last position only, where the model allows it
        self._keep_one = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._buf: Tensor | None = None
        self._rows: Tensor | None = None  # per row, the position to read (None: the prefix pass, read nothing)
        self._stack: ExitStack | None = None
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = OrderedDict()
        self._plain_cache: bool | None = None  # False once the model's cache turned out not to be plain K/V
        #: Counters of the last reads: prompt tokens run, prefix tokens reused (for benchmarks and tests).
        self.tokens_run = 0
        self.tokens_reused = 0

    # hooks -------------------------------------------------------------------------------------------------
    def _capture(self, j: int, layer: int, act: Tensor) -> None:
        if self._rows is not None:
            assert self._buf is not None
            picked = act[torch.arange(act.shape[0], device=act.device), self._rows.to(act.device)]
            self._buf[:, j] = picked.detach().to(device="cpu", dtype=torch.float32)
        if layer == self._deepest and self._rows is not None:
            raise _StopForward

    def _make_hook(self, j: int, layer: int) -> Callable[..., None]:
        if self.kind == "resid_post":
            def post(_mod: Any, _args: Any, output: Any) -> None:
                self._capture(j, layer, output[0] if isinstance(output, tuple) else output)

            return post

        def pre(_mod: Any, args: Any, kwargs: Any) -> None:
            self._capture(j, layer, args[0] if args else kwargs["hidden_states"])

        return pre

    def __enter__(self) -> PrefixReader:
        stack = ExitStack()
        try:
            for j, layer in enumerate(self.layers):
                module = self._modules[layer]
                fn = self._make_hook(j, layer)
                handle = (module.register_forward_hook(fn) if self.kind == "resid_post"
                          else module.register_forward_pre_hook(fn, with_kwargs=True))
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stack, self._stack = self._stack, None
        self._prefixes.clear()
        if stack is not None:
            stack.close()

    # forward passes ----------------------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return next(self._hf.parameters()).device

    def _run(self, **kwargs: Any) -> Any:
        """One forward pass of the top-level HF model (the module the cost meter watches); ``None`` when the
        deepest requested layer stopped it."""
        try:
            with torch.inference_mode():
                return self._hf(use_cache=kwargs.pop("use_cache", False), **kwargs)
        except _StopForward:
            return None

    def _prefix_cache(self, prefix: tuple[int, ...]) -> list[tuple[Tensor, Tensor]] | None:
        """Keys and values of ``prefix`` (one row) at every layer, computed once and kept for later batches;
        ``None`` when the model's cache is not plain keys and values per layer (then batches run in full)."""
        if prefix in self._prefixes:
            self._prefixes.move_to_end(prefix)
            self.tokens_reused += len(prefix)
            return self._prefixes[prefix]
        if self._plain_cache is False:
            return None
        self._rows = None  # the hooks read nothing in the prefix pass, and it runs to the end
        out = self._run(input_ids=torch.tensor([prefix], device=self._device), use_cache=True, **self._keep_one)
        self.tokens_run += len(prefix)
        cache = getattr(out, "past_key_values", None)
        found = [(getattr(layer, "keys", None), getattr(layer, "values", None))
                 for layer in getattr(cache, "layers", None) or []]
        kv = [(k, v) for k, v in found if isinstance(k, Tensor) and isinstance(v, Tensor)]
        sliding = getattr(cache, "is_sliding", None) or []
        if len(kv) != len(self._modules) or len(found) != len(kv) or any(sliding):
            self._plain_cache = False  # linear-attention or sliding-window layers: no prefix reuse for this model
            return None
        self._prefixes[prefix] = kv
        while len(self._prefixes) > _KEEP_PREFIXES:
            self._prefixes.popitem(last=False)
        return kv

    def read(self, ids: Sequence[Sequence[int]]) -> Float[Tensor, "batch layer d_model"]:
        """Run one batch and return its last-token residuals (float32, CPU), in the order of ``ids``."""
        if self._stack is None:
            raise RuntimeError("PrefixReader.read() must be called inside `with PrefixReader(...)`.")
        if any(len(x) == 0 for x in ids):
            raise ValueError("A prompt tokenises to nothing; pass non-empty prompts.")
        b, device = len(ids), self._device
        # two tokens of every row stay in the batch pass: a pass on a cache with one new token per row is
        # a decoding step to the cost meter (`icon2_lens.runs.costs`), two or more a prompt read
        n_prefix = common_prefix_length(ids, rest=2)
        self._buf = torch.empty((b, len(self.layers), self.model.d_model), dtype=torch.float32)
        try:
            if n_prefix < self.min_prefix:
                self._read_full(ids, device)
            else:
                self._read_shared(ids, n_prefix, device)
            out = self._buf
        finally:
            self._buf, self._rows = None, None
        return check_activations(out, self.layers, model_id=self.model.info.model_id)

    def _read_full(self, ids: Sequence[Sequence[int]], device: torch.device) -> None:
        input_ids, mask = left_pad(ids, self._pad_id)
        self._rows = torch.full((len(ids),), input_ids.shape[1] - 1, dtype=torch.long)
        self._run(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                  position_ids=position_ids(mask).to(device))
        self.tokens_run += int(mask.sum())

    def _read_shared(self, ids: Sequence[Sequence[int]], n_prefix: int, device: torch.device) -> None:
        from transformers import DynamicCache

        kv = self._prefix_cache(tuple(ids[0][:n_prefix]))
        b = len(ids)
        if kv is None:
            self._read_full(ids, device)
            return
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.expand(b, *k.shape[1:]).contiguous(), v.expand(b, *v.shape[1:]).contiguous(), i)
        suffix_ids, suffix_mask = left_pad([x[n_prefix:] for x in ids], self._pad_id, side="right")
        width = suffix_ids.shape[1]
        mask = torch.cat([torch.ones((b, n_prefix), dtype=torch.long), suffix_mask], 1)
        positions = (n_prefix + torch.arange(width))[None].expand(b, width)
        self._rows = suffix_mask.sum(1) - 1
        self._run(input_ids=suffix_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  use_cache=True, **{self._cache_kw: cache})
        self.tokens_run += int(suffix_mask.sum())
        self.tokens_reused += n_prefix * (b - 1)


def _shares_weights(model: LoadedModel) -> bool:
    """Whether the HF fast path runs on the bridge's own weights (no second copy); builds and keeps its engine
    (the cache `icon2_lens.gen.engine` keeps) when they can be shared."""
    eng = model.engines.get("hf")
    if eng is None:
        hf = shared_hf_model(model)
        if hf is None:
            return False
        eng = model.engines["hf"] = HFEngine(model, hf_model=hf)
    return bool(eng.shared)


def last_token_reader(model: LoadedModel, *, hook: HookKind | str = "resid_post",
                      layers: Sequence[int] | range | None = None,
                      reuse_prefix: bool = True) -> PrefixReader | LastTokenReader:
    """The reader for last-token residuals: `PrefixReader` (shared prefixes computed once, HF fast path) when
    ``reuse_prefix``, the hook is ``resid_post`` or ``resid_pre`` and the plain HF model can share the bridge's
    weights; else the bridge's `LastTokenReader` (never a second copy of the weights just to read residuals).

    Examples:
        >>> with last_token_reader(model, hook="resid_post", layers=[3, 5]) as reader:  # doctest: +SKIP
        ...     h = reader.read(ids)  # [batch, 2, d_model]
    """
    if reuse_prefix and hook_kind(hook) in ("resid_post", "resid_pre") and _shares_weights(model):
        return PrefixReader(model, hook=hook, layers=layers)
    return LastTokenReader(model, hook=hook, layers=layers)
