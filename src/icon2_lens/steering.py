"""Steering: add ``gamma * u`` to the residual stream at a range of layers (METHOD.md section 4).

Two paths run the same hooks:

* ``"hf"`` (default, the fast path): torch forward hooks on the decoder layers of
  `icon2_lens.models.LoadedModel.generation_model` (a plain HF model sharing the bridge's weights),
  used with HF ``generate``. ``blocks.{l}.hook_resid_post`` is the output of decoder layer ``l``,
  ``blocks.{l}.hook_resid_pre`` its input.
* ``"bridge"``: TransformerLens hooks on the bridge's hook points (``blocks.{l}.hook_resid_post``),
  for ``model.bridge(...)`` / ``model.bridge.generate(...)`` and analysis code.

Both see ``[batch, prompt, d]`` in the prefill and ``[batch, 1, d]`` at each decoding step with the
KV cache (``[batch, prompt + k, d]`` without it). A per-hook position tracker knows which absolute
(padded) positions a call covers, so ``positions="generated"`` steers exactly the positions after
the prompt, including the first generated token when it is fed back, under both cache modes.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import _HOOK_RE
from .directions import DirectionSet
from .models import LoadedModel

__all__ = ["steer", "Steering", "steering_vectors", "Scale", "Positions", "SteerPath"]

#: ``"relative"``: gamma is a fraction of the layer's mean residual norm; ``"unit"``: gamma times the unit vector.
Scale = Literal["relative", "unit"]
#: ``"all"``: every position; ``"generated"``: only positions after the prompt.
Positions = Literal["all", "generated"]
#: Which model the hooks go on: the fast HF generation model, the bridge, or both.
SteerPath = Literal["hf", "bridge", "both"]


def steering_vectors(
    directions: DirectionSet,
    criterion: str | Sequence[str],
    gamma: float | Sequence[float] | Float[Tensor, " batch"],
    *,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
) -> dict[int, Float[Tensor, "batch d_model"]]:
    """The vector added at each layer, one row per batch row (or one row for all).

    ``criterion`` and ``gamma`` may each be one value or one per batch row. With
    ``scale="relative"`` row ``i`` at layer ``l`` is ``gamma_i * resid_norm[c_i, l] * u[c_i, l]``
    (``resid_norm``: the mean residual norm at the read position, stored in the DirectionSet).

    Examples:
        >>> vecs = steering_vectors(dirs, "helpful", 0.1, layers=range(15, 25))  # doctest: +SKIP
        >>> vecs[15].shape  # doctest: +SKIP
        torch.Size([1, 576])
    """
    if scale not in ("relative", "unit"):
        raise ValueError(f"Unknown scale {scale!r}; use 'relative' or 'unit'.")
    names = [criterion] if isinstance(criterion, str) else list(criterion)
    if not names:
        raise ValueError("No criterion given; pass a criterion name (or one per row).")
    idx = [directions.index(c) for c in names]
    g = torch.as_tensor(gamma, dtype=torch.float32).flatten()
    if not torch.isfinite(g).all():
        raise ValueError("gamma must be finite.")
    rows = max(len(idx), len(g))
    if len(idx) not in (1, rows) or len(g) not in (1, rows):
        raise ValueError(f"Got {len(idx)} criteria and {len(g)} gammas; give one of each or one per row.")
    idx_t = torch.tensor(idx).expand(rows) if len(idx) == 1 else torch.tensor(idx)
    g = g.expand(rows)
    if layers is None:
        layers = directions.suggested_layers
        if not layers:
            raise ValueError("These directions have no suggested layers; run `icon2-lens layers` first or pass layers=.")
    layers = list(layers)
    if not layers:
        raise ValueError("The layer selection is empty; pass at least one layer (or None for the suggested range).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layers repeat in {layers}; pass each layer once.")
    out = {}
    for layer in layers:
        if layer not in directions.layers:
            raise ValueError(f"Layer {layer} is not in the directions (which have {list(directions.layers)}).")
        li = directions.layers.index(layer)
        u = directions.vectors[idx_t, li]  # [rows, d]
        size = g if scale == "unit" else g * directions.stats["resid_norm"][idx_t, li]
        out[int(layer)] = size[:, None] * u
    return out


class _Tracker:
    """Absolute (padded) positions covered by successive calls of one hook within one generation."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.next_pos = 0
        self.prompt_len: int | None = None

    def positions(self, seq_len: int) -> tuple[int, int]:
        if self.next_pos > 0 and seq_len == 1:
            start = self.next_pos  # a decoding step with the KV cache: one new token
        elif self.next_pos > 0 and seq_len == self.next_pos + 1:
            start = 0  # a decoding step without the cache: the whole sequence again, one longer
        else:
            start = 0  # a prefill: a new prompt
            self.prompt_len = seq_len
        self.next_pos = start + seq_len
        return start, start + seq_len


class Steering:
    """Hooks that add steering vectors; a context manager (hooks removed on exit, also on error).

    Made by `steer`. ``reset()`` forgets the prompt length learnt from the last prefill (call it
    between two ``generate`` calls inside one context when ``positions="generated"`` and the new
    prompt could be mistaken for a continuation; `icon2_lens.pairs` does so for every batch).
    """

    def __init__(self, model: LoadedModel, vectors: dict[int, Tensor], *, hook_kind: str, positions: Positions,
                 path: SteerPath) -> None:
        if positions not in ("all", "generated"):
            raise ValueError(f"Unknown positions {positions!r}; use 'all' or 'generated'.")
        if path not in ("hf", "bridge", "both"):
            raise ValueError(f"Unknown path {path!r}; use 'hf', 'bridge' or 'both'.")
        if hook_kind not in ("resid_pre", "resid_post"):
            raise ValueError(f"Steering supports resid_pre and resid_post hooks, not {hook_kind!r}.")
        for layer in vectors:
            if not 0 <= layer < model.n_layers:
                raise ValueError(f"Layer {layer} is out of range: {model.info.model_id} has layers 0..{model.n_layers - 1}.")
        self.model, self.vectors, self.hook_kind, self.positions, self.path = model, vectors, hook_kind, positions, path
        self._trackers: list[_Tracker] = []
        self._stack: ExitStack | None = None
        self.calls = 0  # hook calls that changed activations (for tests and diagnostics)

    def _add(self, act: Tensor, vec: Tensor, tracker: _Tracker) -> Tensor:
        if act.shape[0] != vec.shape[0] and vec.shape[0] != 1:
            raise ValueError(f"Per-row steering has {vec.shape[0]} rows but the batch has {act.shape[0]}.")
        start, end = tracker.positions(act.shape[1])
        delta = vec.to(device=act.device, dtype=act.dtype)[:, None, :]
        if self.positions == "all":
            self.calls += 1
            return act + delta
        first = max(tracker.prompt_len or 0, start) - start  # first local index after the prompt
        if first >= act.shape[1]:
            return act
        self.calls += 1
        out = act.clone()
        out[:, first:] += delta
        return out

    def _hf_hooks(self, stack: ExitStack) -> None:
        layers = _decoder_layers(self.model.generation_model())
        for layer, vec in self.vectors.items():
            tracker = _Tracker()
            self._trackers.append(tracker)
            if self.hook_kind == "resid_post":
                def post(_mod: Any, _args: Any, output: Any, vec: Tensor = vec, tracker: _Tracker = tracker) -> Any:
                    if isinstance(output, tuple):
                        return (self._add(output[0], vec, tracker), *output[1:])
                    return self._add(output, vec, tracker)

                handle = layers[layer].register_forward_hook(post)
            else:
                def pre(_mod: Any, args: Any, kwargs: Any, vec: Tensor = vec, tracker: _Tracker = tracker) -> Any:
                    if args:
                        return (self._add(args[0], vec, tracker), *args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = self._add(kwargs["hidden_states"], vec, tracker)
                    return args, kwargs

                handle = layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
            stack.callback(handle.remove)

    def _bridge_hooks(self, stack: ExitStack) -> None:
        hooks = []
        for layer, vec in self.vectors.items():
            tracker = _Tracker()
            self._trackers.append(tracker)

            def fn(act: Tensor, hook: Any = None, vec: Tensor = vec, tracker: _Tracker = tracker) -> Tensor:
                return self._add(act, vec, tracker)

            hooks.append((f"blocks.{layer}.hook_{self.hook_kind}", fn))
        stack.enter_context(self.model.bridge.hooks(fwd_hooks=hooks))

    def reset(self) -> None:
        """Forget positions seen so far (start of a new generation)."""
        for t in self._trackers:
            t.reset()

    def __enter__(self) -> "Steering":
        if self._stack is not None:
            raise RuntimeError("This Steering is already active.")
        stack = ExitStack()
        try:
            if self.path in ("hf", "both"):
                self._hf_hooks(stack)
            if self.path in ("bridge", "both"):
                self._bridge_hooks(stack)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self._trackers = []
        if stack is not None:
            stack.close()


def _decoder_layers(hf: Any) -> Any:
    """The list of decoder layers of an HF causal LM (``model.layers`` for Llama-like models)."""
    base = getattr(hf, "base_model", hf)
    for attr in ("layers", "h", "blocks"):
        if hasattr(base, attr):
            return getattr(base, attr)
    decoder = getattr(base, "decoder", None)
    if decoder is not None and hasattr(decoder, "layers"):
        return decoder.layers
    raise ValueError(f"Cannot find the decoder layers of {type(hf).__name__}; use path='bridge'.")


def steer(
    model: LoadedModel,
    directions: DirectionSet,
    criterion: str | Sequence[str],
    gamma: float | Sequence[float] | Float[Tensor, " batch"],
    *,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
    positions: Positions = "all",
    path: SteerPath = "both",
) -> Steering:
    """Add ``gamma * u_criterion`` to the residual stream at every layer of a range, while active.

    Args:
        model: from `icon2_lens.load_model`; must match the directions.
        directions: the `DirectionSet`; its hook kind (``resid_post`` or ``resid_pre``) is steered.
        criterion: a criterion name, or one per batch row.
        gamma: strength: one value, or one per batch row (a list or a 1-D tensor).
        layers: layer ids (default: the range the layer report suggested).
        scale: ``"relative"`` (default: gamma is a fraction of the layer's mean residual norm at
            the read position, so one gamma means the same across models and layers) or ``"unit"``
            (gamma times the unit vector, the paper's literal reading).
        positions: ``"all"`` (default, as the paper) or ``"generated"`` (only tokens after the prompt).
        path: ``"both"`` (default: hooks on the HF generation model and on the bridge), ``"hf"`` or ``"bridge"``.

    Returns:
        A `Steering`; use it as a context manager. Hooks are removed on exit, also on error.

    Examples:
        >>> with il.steer(model, dirs, "helpful", 0.07, layers=range(15, 25)):  # doctest: +SKIP
        ...     out = model.generation_model().generate(ids, max_new_tokens=40)
    """
    directions.check_compatible(model)
    vecs = steering_vectors(directions, criterion, gamma, layers=layers, scale=scale)
    m = _HOOK_RE.match(directions.hook)
    return Steering(model, vecs, hook_kind=m.group("kind") if m else directions.hook, positions=positions, path=path)
