"""Read the last-token residual stream at TransformerLens hook points.

Batched and pad-safe: prompts are tokenised without added special tokens (chat-rendered
text already carries the template's BOS), sorted by length, left-padded with an attention
mask (the bridge derives position ids from it), and only ``act[:, -1, :]`` of the requested
hook points is kept. The forward pass stops right after the last requested hook point, so no
logits are computed and memory is ``prompts x layers x d_model`` plus one batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .models import LoadedModel

__all__ = ["HookKind", "LastTokenReader", "hook_names", "hook_kind", "left_pad", "read_last_token", "tokenize_texts",
           "resolve_layers"]

#: Residual-stream hook points (TransformerLens names, ``blocks.{l}.hook_<kind>``).
HookKind = Literal["resid_pre", "resid_mid", "resid_post"]
_RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
_HOOK_RE = re.compile(r"^(?:blocks\.\{layer\}\.)?(?:hook_)?(?P<kind>[A-Za-z_]+)$")


class _StopForward(Exception):
    """Raised from the last hook to skip the rest of the forward pass."""


def resolve_layers(model: LoadedModel, layers: Sequence[int] | range | None) -> list[int]:
    """Validate a layer selection (``None`` = all layers); negative indices count from the end.

    Examples:
        >>> resolve_layers(model, [-1])  # doctest: +SKIP
        [29]
    """
    n = model.n_layers
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"Layers must be integers; got {layer!r}.")
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise ValueError(f"Layer {layer} is out of range: {model.info.model_id} has layers 0..{n - 1}.")
        out.append(idx)
    if not out:
        raise ValueError("The layer selection is empty; pass at least one layer (or None for all).")
    if len(set(out)) != len(out):
        raise ValueError(f"Layers repeat in {list(layers)}; pass each layer once.")
    return out


def hook_kind(hook: str) -> str:
    """The residual kind of a hook name: ``"resid_post"`` for ``"resid_post"``, ``"hook_resid_post"`` or
    ``"blocks.{layer}.hook_resid_post"`` (the one hook-name parser).

    Examples:
        >>> hook_kind("blocks.{layer}.hook_resid_pre")
        'resid_pre'
    """
    m = _HOOK_RE.match(hook)
    if m is None or m.group("kind") not in _RESID_KINDS:
        raise ValueError(
            f"Unknown hook {hook!r}. Use a residual-stream hook: 'resid_pre', 'resid_mid' or 'resid_post' "
            "(also accepted as 'hook_resid_post' or 'blocks.{layer}.hook_resid_post')."
        )
    return m.group("kind")


def hook_names(model: LoadedModel, hook: str, layers: Sequence[int]) -> list[str]:
    """TransformerLens hook names for ``hook`` at ``layers``, checked against the bridge.

    ``hook`` may be ``"resid_post"``, ``"hook_resid_post"`` or ``"blocks.{layer}.hook_resid_post"``.

    Examples:
        >>> hook_names(model, "resid_post", [0, 1])  # doctest: +SKIP
        ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    names = [f"blocks.{layer}.hook_{hook_kind(hook)}" for layer in layers]
    missing = [n for n in names if n not in model.bridge.hook_dict]
    if missing:
        raise ValueError(f"Hook points {missing[:3]} do not exist in this model; check the hook and layers.")
    return names


def tokenize_texts(model: LoadedModel, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without added special tokens (chat text carries its own BOS).

    Examples:
        >>> tokenize_texts(model, ["<|im_start|>user\\nHi"])  # doctest: +SKIP
    """
    enc = model.tokenizer(list(texts), add_special_tokens=False)
    return [list(ids) for ids in enc["input_ids"]]


def left_pad(
    ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch width"], Int[Tensor, "batch width"]]:
    """Left-padded ``input_ids`` and ``attention_mask`` (1 on real tokens) of token-id lists (the one left-pad).

    Examples:
        >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
    return input_ids, mask


class LastTokenReader:
    """Reads the last-token residual at fixed hook points, one batch at a time.

    Use as a context manager: hooks are added on entry and always removed on exit (also on
    error). Inside, `read` takes token-id lists and returns ``[batch, layer, d_model]``.

    Examples:
        >>> with LastTokenReader(model, hook="resid_post") as reader:  # doctest: +SKIP
        ...     h = reader.read(tokenize_texts(model, texts))
    """

    def __init__(self, model: LoadedModel, *, hook: HookKind | str = "resid_post",
                 layers: Sequence[int] | range | None = None) -> None:
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.names = hook_names(model, hook, self.layers)
        pad_id = model.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (load_model sets it to EOS).")
        self._pad_id = int(pad_id)
        # The hook that fires last is the deepest layer (pre < mid < post within a block).
        self._last = max(range(len(self.names)), key=lambda j: self.layers[j])
        self._buf: Tensor | None = None
        self._ctx: AbstractContextManager[Any] | None = None

    def _make_hook(self, j: int) -> Callable[[Tensor, object], None]:
        def hook_fn(act: Tensor, hook: object) -> None:
            assert self._buf is not None
            self._buf[:, j] = act[:, -1, :].detach().to(device="cpu", dtype=torch.float32)
            if j == self._last:
                raise _StopForward

        return hook_fn

    def __enter__(self) -> LastTokenReader:
        ctx = self.model.bridge.hooks(fwd_hooks=[(n, self._make_hook(j)) for j, n in enumerate(self.names)])
        self._ctx = ctx
        ctx.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(exc_type, exc, tb)

    def read(self, ids: Sequence[Sequence[int]]) -> Float[Tensor, "batch layer d_model"]:
        """Run one left-padded batch and return its last-token residuals (float32, CPU)."""
        if self._ctx is None:
            raise RuntimeError("LastTokenReader.read() must be called inside `with LastTokenReader(...)`.")
        if any(len(x) == 0 for x in ids):
            raise ValueError("A prompt tokenises to nothing; pass non-empty prompts.")
        input_ids, mask = left_pad(ids, self._pad_id)
        self._buf = torch.empty((len(ids), len(self.names), self.model.d_model), dtype=torch.float32)
        device = self.model.device
        try:
            with torch.inference_mode():
                self.model.bridge(input_ids.to(device), attention_mask=mask.to(device), return_type=None)
        except _StopForward:
            pass
        out, self._buf = self._buf, None
        return out


def read_last_token(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    hook: HookKind | str = "resid_post",
    layers: Sequence[int] | range | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "reading residuals",
) -> Float[Tensor, "n layer d_model"]:
    """The residual stream at the last token of each text, at every selected layer.

    Args:
        model: a `icon2_lens.models.LoadedModel`.
        texts: fully rendered prompts (e.g. from `icon2_lens.prompts.render_chat`).
        hook: residual hook kind (``resid_post`` = output of block ``l``).
        layers: layer indices (default: all).
        batch_size: prompts per forward pass.
        progress: show a progress bar.
        desc: progress-bar label.

    Returns:
        float32 CPU tensor ``[n, layer, d_model]``, in the order of ``texts``; identical to reading
        each text alone.

    Examples:
        >>> h = read_last_token(model, [render_chat(model.tokenizer, "Hi")])  # doctest: +SKIP
        >>> h.shape  # doctest: +SKIP
        torch.Size([1, 30, 576])
    """
    if len(texts) == 0:
        raise ValueError("No texts to read; pass at least one prompt.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    reader = LastTokenReader(model, hook=hook, layers=layers)
    ids = tokenize_texts(model, texts)
    out = torch.empty((len(texts), len(reader.names), model.d_model), dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per batch
    with reader, tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = reader.read([ids[i] for i in rows])
            bar.update(len(rows))
    return out
