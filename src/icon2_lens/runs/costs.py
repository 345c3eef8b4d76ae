"""One cost accounting for every stage: tokens, forward passes, wall time, peak memory.

`measure_costs` is a context manager that watches the models a stage runs. It counts through
forward pre-hooks on each model's top-level module (removed on exit, also on error), so it needs
no cooperation from the stage's code and counts the same way for extraction, scoring, sampling,
steered generation, judging and training:

- ``forward_passes``: calls of a watched model's forward (one batched call is one pass).
- ``prompt_tokens``: non-padding tokens read by passes that start from an empty KV cache
  (extraction and scoring forwards, generation prefills, training forwards), and the new tokens of
  a pass that reads two or more tokens per row on a cached shared prefix (`icon2_lens.gen.prefix`:
  the prefix is counted once, when it is computed).
- ``generated_tokens``: tokens produced by cached decoding. A generation prefill produces one
  token per row; each cached step produces one more for every row still running (its input token
  is not the pad or an end-of-sequence token). The total equals the generated lengths, end token
  included. Generation without a KV cache counts its re-reads as prompt tokens instead.
- ``wall_seconds`` and ``peak_rss_mib`` (the process's resident memory, sampled every 10 ms), and
  on CUDA ``peak_cuda_mib`` (``torch.cuda.max_memory_allocated``; its peak counter is reset when
  the stage starts).

Examples:
    >>> with il.measure_costs("generate", model) as meter:  # doctest: +SKIP
    ...     pairs = il.generate_pairs(model, dirs, kept)
    >>> meter.costs.generated_tokens, meter.costs.wall_seconds  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..gen import hf_model, stop_ids
from ..reports import cost_table as _cost_table
from .io import atomic_write_text

__all__ = ["StageCost", "CostMeter", "measure_costs", "load_costs", "cost_table"]

_MIB = 2**20


@dataclass
class StageCost:
    """The cost figures of one stage (see the module docstring for how each is counted).

    Attributes:
        stage: the stage's name.
        prompt_tokens: non-padding tokens read from an empty cache.
        generated_tokens: tokens produced by cached decoding.
        forward_passes: batched forward calls of the watched models.
        wall_seconds: wall-clock time inside the measured block.
        peak_rss_mib: peak resident memory of the process during the block.
        rss_increase_mib: that peak minus the resident memory when the block started.
        peak_cuda_mib: peak CUDA memory allocated during the block (``None`` on CPU).
        rows: rows the stage produced (set by the caller, e.g. kept instructions or pairs).
        device: the device of the first watched model.
        phases: the same token, pass and wall-time figures split by named phase (`CostMeter.phase`), e.g.
            ``{"generation": {...}, "labelling": {...}}`` as the Icon2 paper's Table 4 splits them; work outside
            every phase counts only in the totals.
    """

    stage: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    wall_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    rss_increase_mib: float = 0.0
    peak_cuda_mib: float | None = None
    rows: int | None = None
    device: str = "cpu"
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``costs.json`` (a folder gets ``costs.json`` inside it) atomically; return the file."""
        p = Path(path)
        if p.is_dir() or not p.suffix:
            p = p / "costs.json"
        return atomic_write_text(p, json.dumps(self.to_dict(), indent=2))


def load_costs(path: str | os.PathLike[str]) -> StageCost:
    """Read a ``costs.json`` (or the one inside a stage folder).

    Examples:
        >>> il.runs.load_costs("runs/demo/generate").generated_tokens  # doctest: +SKIP
    """
    p = Path(path)
    p = p / "costs.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; it is written when a stage finishes.")
    return StageCost(**json.loads(p.read_text()))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _ids_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        if isinstance(embeds, torch.Tensor):
            return torch.zeros(embeds.shape[:2], dtype=torch.long)
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _cached_length(cache: Any) -> int | None:
    """``None``: no cache object; otherwise the number of positions already in it."""
    if cache is None:
        return None
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class CostMeter:
    """Counts the cost of a block of work on watched models; use it through `measure_costs`.

    Examples:
        >>> with il.measure_costs("score", model) as meter:  # doctest: +SKIP
        ...     table = il.score_instructions(model, dirs, ds)
        >>> meter.costs.forward_passes  # doctest: +SKIP
    """

    def __init__(self, stage: str) -> None:
        self.costs = StageCost(stage=stage)
        self._handles: list[Any] = []
        self._watched: set[int] = set()
        self._phase: dict[str, float] | None = None

    def _count(self, key: str, n: int) -> None:
        setattr(self.costs, key, getattr(self.costs, key) + n)
        if self._phase is not None:
            self._phase[key] += n

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the block's tokens, passes and wall time also under ``costs.phases[name]`` (summed over blocks).

        Phases do not nest: a block inside another phase's block is an error.

        Examples:
            >>> with il.measure_costs("sampling_ranking", model) as meter:  # doctest: +SKIP
            ...     with meter.phase("generation"):
            ...         samples = eng.generate(prompts, decoding)
            ...     with meter.phase("labelling"):
            ...         scores = scorer(instructions, texts, criteria)
        """
        if self._phase is not None:
            raise RuntimeError(f"Phase {name!r} started inside another phase; phases do not nest.")
        keys = ("prompt_tokens", "generated_tokens", "forward_passes", "wall_seconds")
        bucket = self.costs.phases.setdefault(name, dict.fromkeys(keys, 0))
        self._phase = bucket
        t0 = time.perf_counter()
        try:
            yield
        finally:
            bucket["wall_seconds"] = round(bucket["wall_seconds"] + time.perf_counter() - t0, 3)
            self._phase = None

    def watch(self, module: torch.nn.Module, *, stop_ids: Iterable[int] = ()) -> None:
        """Count the forward calls of ``module`` (a top-level model) until the block ends.

        Args:
            module: a model whose ``forward`` takes ``input_ids`` (or token ids first), an optional
                ``attention_mask`` and ``past_key_values``.
            stop_ids: the pad and end-of-sequence token ids; a decoding row fed one of them has finished.
        """
        if id(module) in self._watched:
            return
        self._watched.add(id(module))
        stops = torch.tensor(sorted({int(i) for i in stop_ids if i is not None}), dtype=torch.long)
        count = self._count

        def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = _ids_of(args, kwargs)
            count("forward_passes", 1)
            if ids is None:
                return
            mask = kwargs.get("attention_mask")
            # `cache` from transformers 5.2x (`past_key_values` before)
            cached = _cached_length(kwargs.get("cache", kwargs.get("past_key_values")))
            if cached and ids.shape[1] > 1:  # a prompt read on a cached shared prefix (`icon2_lens.gen.prefix`)
                if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                    count("prompt_tokens", int(mask[:, -ids.shape[1]:].sum()))
                else:
                    count("prompt_tokens", ids.numel())
                return
            if cached:  # a decoding step: the rows still running produce one token each
                last = ids[:, -1].cpu()
                count("generated_tokens", int((~torch.isin(last, stops)).sum()) if len(stops) else ids.shape[0])
                return
            if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
                count("prompt_tokens", int(mask.sum()))
            else:
                count("prompt_tokens", ids.numel())
            if cached == 0:  # a generation prefill (an empty cache was passed): one token per row
                count("generated_tokens", ids.shape[0])

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def watch_model(self, model: Any) -> None:
        """Watch a `LoadedModel`'s bridge and the HF model of its fast engine (built here if needed)."""
        tok = model.tokenizer
        gen = hf_model(model)
        eos = getattr(getattr(gen, "generation_config", None), "eos_token_id", None)
        stops = [tok.pad_token_id, *stop_ids(tok), *(eos if isinstance(eos, (list, tuple)) else [eos])]
        stops = [s for s in stops if s is not None]
        self.watch(model.bridge, stop_ids=stops)
        self.watch(gen, stop_ids=stops)

    def remove(self) -> None:
        """Remove every hook this meter added."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._watched.clear()


@contextmanager
def measure_costs(stage: str, *models: Any, out: str | os.PathLike[str] | None = None) -> Iterator[CostMeter]:
    """Measure the cost of the block: tokens and passes of ``models``, wall time, peak memory.

    Args:
        stage: the stage's name (recorded in the figures).
        *models: `icon2_lens.LoadedModel` objects (bridge and generation model are watched) or
            plain ``torch.nn.Module`` causal LMs. Each gets forward pre-hooks for the duration of
            the block; they are removed on exit, also on error. Nothing else about them changes.
        out: a folder or file: the figures are written there as ``costs.json`` when the block
            finishes without error.

    Yields:
        The `CostMeter`; its ``costs`` (a `StageCost`) are complete after the block. Set
        ``meter.costs.rows`` inside the block to record how many rows the stage produced.

    Examples:
        >>> with il.measure_costs("generate", model, out="runs/pairs") as meter:  # doctest: +SKIP
        ...     pairs = il.generate_pairs(model, dirs, kept)
        ...     meter.costs.rows = len(pairs)
    """
    meter = CostMeter(stage)
    costs = meter.costs
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start_rss = peak = _rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    try:
        for m in models:
            if isinstance(m, torch.nn.Module):
                meter.watch(m, stop_ids=_module_stop_ids(m))
            else:
                meter.watch_model(m)
        if models:
            first = models[0]
            costs.device = str(first.device if hasattr(first, "device") else next(first.parameters()).device)
        sampler.start()
        yield meter
    finally:
        costs.wall_seconds = round(time.perf_counter() - t0, 3)
        stop.set()
        if sampler.is_alive():
            sampler.join()
        meter.remove()
        peak = max(peak, _rss())
        costs.peak_rss_mib = round(peak / _MIB, 1)
        costs.rss_increase_mib = round((peak - start_rss) / _MIB, 1)
        if cuda:
            costs.peak_cuda_mib = round(torch.cuda.max_memory_allocated() / _MIB, 1)
    if out is not None:
        costs.save(out)


def _module_stop_ids(module: torch.nn.Module) -> list[int]:
    cfg = getattr(module, "generation_config", None) or getattr(module, "config", None)
    ids: list[Any] = []
    for key in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, key, None)
        ids += list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(i) for i in ids if i is not None]


def cost_table(costs: Sequence[StageCost], *, per: tuple[str, int] | None = None) -> str:
    """A Markdown table of stage costs with a total row, and optionally the cost per output row.

    Args:
        costs: one `StageCost` per stage, in order.
        per: ``(name, count)``, e.g. ``("kept pair", 24)``: adds a row dividing the total by ``count``.

    Examples:
        >>> print(il.runs.cost_table([il.runs.load_costs(d) for d in folders], per=("kept pair", 24)))  # doctest: +SKIP
    """
    return _cost_table(costs, per=per)
