"""Read the last-token residual stream at TransformerLens hook points.

Batched and pad-safe: prompts are tokenised without added special tokens (chat-rendered
text already carries the template's BOS), sorted by length, left-padded with an attention
mask (the bridge derives position ids from it), and only ``act[:, -1, :]`` of the requested
hook points is kept. The forward pass stops right after the last requested hook point, so no
logits are computed and memory is ``prompts x layers x d_model`` plus one batch.

**The context rule** (before any forward pass): an instruction prompt whose tokens, chat template included,
exceed the model's context (``max_position_embeddings`` of its HF config, `context_length`) is refused with a
`icon2_lens.errors.BadInputError` (``option="instructions"``) that says how many prompts are too long, the
longest one's length and the context, and what to do (shorten or drop them, or use a model with a longer
context). Nothing is truncated silently. It is applied where instructions enter a model:

- `tokenize_texts` (extraction, scoring) and `icon2_lens.pairs.generate_steered` (steered pairs, calibration,
  evaluation answers) check each batch's prompts;
- the stages that loop over many batches (`icon2_lens.score_instructions`, `icon2_lens.generate_pairs`,
  `icon2_lens.evaluate`) check all their prompts first (`check_context`), so a long instruction near the end
  of a file is refused before the first batch, not after hours.

Prompts that carry a *response* are exempt: `read_last_token` by default, the self-probe, a judge's prompt,
continuation log-probs, and the engines themselves (`icon2_lens.gen`), on which the baselines feed a model its
own answers back (self-rewarding, self-refine, SAO). A response is as long as a model made it, and tokens
past the context are the model's own business (HF warns about them).
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

from .errors import BadInputError
from .models import LoadedModel

__all__ = ["HookKind", "LastTokenReader", "hook_names", "hook_kind", "left_pad", "read_last_token", "tokenize_texts",
           "resolve_layers", "context_length", "check_fits", "check_context", "check_activations"]

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


def context_length(model: LoadedModel) -> int | None:
    """The model's context in tokens: ``max_position_embeddings`` of its HF config (the bridge's ``n_ctx`` when the
    config has none); ``None`` when neither says (then nothing is checked).

    Examples:
        >>> context_length(model)  # doctest: +SKIP
        8192
    """
    bridge = getattr(model, "bridge", None)
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int):
        n = getattr(getattr(bridge, "cfg", None), "n_ctx", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_fits(lengths: Sequence[int], n_ctx: int | None, *, what: str = "prompts",
               model_id: str = "the model") -> None:
    """The context rule (module docs): refuse prompts of more than ``n_ctx`` tokens, naming how many and the longest.

    Examples:
        >>> check_fits([10, 20], 256)
        >>> try:
        ...     check_fits([10, 300, 400], 256, what="instructions", model_id="tiny")
        ... except BadInputError as e:
        ...     print(e.option, str(e)[:68])
        instructions 2 of 3 instructions are longer than the context of tiny (256 tokens)
    """
    if n_ctx is None:
        return
    over = [n for n in lengths if n > n_ctx]
    if over:
        raise BadInputError(
            f"{len(over)} of {len(lengths)} {what} {'is' if len(over) == 1 else 'are'} longer than the context of "
            f"{model_id} ({n_ctx} tokens): the longest is {max(over)} tokens, chat template included. Shorten or "
            "drop them (the long lines of the instructions file, CLI: --instructions), or use a model with a longer "
            "context; nothing was run.", option="instructions")


def check_context(model: LoadedModel, texts: Sequence[str], *, what: str = "prompts") -> None:
    """Apply the context rule to all of a stage's rendered prompts at once, before its first forward pass.

    Examples:
        >>> check_context(model, prompts, what="instructions")  # doctest: +SKIP
    """
    n_ctx = context_length(model)
    if n_ctx is None or not texts:
        return
    enc = model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    check_fits([len(x) for x in enc], n_ctx, what=what, model_id=model.info.model_id)


def tokenize_texts(model: LoadedModel, texts: Sequence[str], *, fit_context: bool = True) -> list[list[int]]:
    """Token ids of each text, without added special tokens (chat text carries its own BOS); with ``fit_context``
    (default) a text longer than the model's context is refused (the context rule, module docs).

    Examples:
        >>> tokenize_texts(model, ["<|im_start|>user\\nHi"])  # doctest: +SKIP
    """
    enc = model.tokenizer(list(texts), add_special_tokens=False)
    ids = [list(x) for x in enc["input_ids"]]
    n_ctx = context_length(model) if fit_context else None
    if n_ctx is not None:
        check_fits([len(x) for x in ids], n_ctx, model_id=model.info.model_id)
    return ids


def left_pad(
    ids: Sequence[Sequence[int]], pad_id: int, *, side: Literal["left", "right"] = "left"
) -> tuple[Int[Tensor, "batch width"], Int[Tensor, "batch width"]]:
    """Padded ``input_ids`` and ``attention_mask`` (1 on real tokens) of token-id lists (the one pad function):
    on the left by default, on the right with ``side="right"`` (rows continuing a shared cached prefix).

    Examples:
        >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
        >>> left_pad([[5, 6], [7]], pad_id=0, side="right")[0].tolist()
        [[5, 6], [7, 0]]
    """
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            cols = slice(width - len(x), width) if side == "left" else slice(0, len(x))
            input_ids[i, cols] = torch.tensor(list(x), dtype=torch.long)
            mask[i, cols] = 1
    return input_ids, mask


def check_activations(h: Float[Tensor, "batch layer d_model"], layers: Sequence[int], *,
                      model_id: str = "the model") -> Float[Tensor, "batch layer d_model"]:
    """Refuse residuals with NaN or infinite values (a float16 overflow, broken weights), naming the first layer.

    Examples:
        >>> check_activations(torch.zeros(2, 1, 4), [0]).shape
        torch.Size([2, 1, 4])
        >>> try:
        ...     check_activations(torch.full((1, 1, 2), float("nan")), [3], model_id="tiny")
        ... except BadInputError as e:
        ...     print(str(e)[:56])
        tiny produced NaN or infinite activations at layer 3 for
    """
    bad = ~torch.isfinite(h)
    if bool(bad.any()):
        rows, cols = bad.any(-1).nonzero(as_tuple=True)
        raise BadInputError(
            f"{model_id} produced NaN or infinite activations at layer {layers[int(cols[0])]} for "
            f"{int(rows.unique().numel())} of {h.shape[0]} prompts of a batch (usually a float16 overflow); load the "
            "model in float32 or bfloat16 (CLI: --dtype float32) and run again; nothing was written.", option="dtype")
    return h


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
        return check_activations(out, self.layers, model_id=self.model.info.model_id)


def read_last_token(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    hook: HookKind | str = "resid_post",
    layers: Sequence[int] | range | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "reading residuals",
    fit_context: bool = False,
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
        fit_context: refuse texts longer than the model's context (the context rule); off by default, as
            this reads responses too (callers that read instructions check them first).

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
    ids = tokenize_texts(model, texts, fit_context=fit_context)
    out = torch.empty((len(texts), len(reader.names), model.d_model), dtype=torch.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per batch
    with reader, tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = reader.read([ids[i] for i in rows])
            bar.update(len(rows))
    return out
