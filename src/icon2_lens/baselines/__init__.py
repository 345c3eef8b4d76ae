"""The methods Icon2 competes with, on the same engine seam, batch runner and cost accounting.

Each method is one module with a config dataclass (extending `ResponseBudget`, so every method has the same
token budget and decoding fields) and a ``make_pairs(model, instructions, config, *, seed, out, shard, progress,
meter)`` that writes TRL conversational pairs with provenance (``method``, settings, seeds, finished flags, and
``kept``/``drop_reason`` for instructions that gave no pair), resumable and shardable like ``generate``, with a
``costs.json`` split into ``generation`` and ``labelling``. `METHODS` is the registry; `make_pairs` runs any of
them by name, Icon2 included. ``../shared/BASELINES.md`` (and each module's docstring) gives the sources of every
prompt and setting.

Examples:
    >>> sorted(METHODS)  # doctest: +SKIP
    ['sampling_ranking', 'sao', 'self_refine', 'self_rewarding', 'system_prompts']
    >>> pairs = il.make_pairs("system_prompts", model, ["Name a river."])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from ..directions import DirectionSet
from ..models import LoadedModel
from ..pairs import PairsConfig, generate_pairs
from ..runs.costs import CostMeter
from . import sampling_ranking, sao, self_refine, self_rewarding, system_prompts
from .common import (
    GENERATION,
    LABELLING,
    InstructionRow,
    ResponseBudget,
    dropped_row,
    instruction_rows,
    pair_row,
    run_method,
)

if TYPE_CHECKING:
    import datasets

__all__ = ["METHODS", "MethodSpec", "make_pairs", "method_config", "ResponseBudget", "InstructionRow",
           "instruction_rows", "pair_row", "dropped_row", "run_method", "GENERATION", "LABELLING"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered pair-making method.

    Attributes:
        name: its name (``icon2-lens baseline NAME``, ``compare --methods``, the ``method`` column).
        config: its config dataclass (the one source of its defaults).
        make_pairs: its ``make_pairs(model, instructions, config, *, seed, out, shard, progress, meter)``.
        help: one line for ``--help`` and the docs.
        self_judging: whether it labels with the model's own judgement (its judge statistics are reported).
    """

    name: str
    config: type
    make_pairs: Callable[..., list[dict[str, Any]]]
    help: str
    self_judging: bool = False


#: The baselines by name (Icon2 itself is `icon2_lens.generate_pairs`; `make_pairs` runs it as ``"icon2"``).
METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec(system_prompts.METHOD, system_prompts.SystemPromptsConfig, system_prompts.make_pairs,
               "chosen under the criterion's positive system prompt, rejected under its negative one (App. I)"),
    MethodSpec(sampling_ranking.METHOD, sampling_ranking.SamplingRankingConfig, sampling_ranking.make_pairs,
               "k samples scored by a reward model (default: the reward probe, a stand-in for ArmoRM); best vs worst "
               "(App. B.1, SimPO recipe)"),
    MethodSpec(self_rewarding.METHOD, self_rewarding.SelfRewardingConfig, self_rewarding.make_pairs,
               "k samples judged by the model itself (Constitutional AI multiple choice, answer-token log-probs, both "
               "orders); best vs worst (App. B.1)", self_judging=True),
    MethodSpec(self_refine.METHOD, self_refine.SelfRefineConfig, self_refine.make_pairs,
               "sample 3, critique one and refine it (chosen) vs a random original sample (App. B.1)",
               self_judging=True),
    MethodSpec(sao.METHOD, sao.SAOConfig, sao.make_pairs,
               "persona -> self-written prompt, two samples ranked by the model's own pairwise judge (SAO)",
               self_judging=True),
)}


def method_config(method: str, settings: dict[str, Any] | None = None) -> Any:
    """The config dataclass of ``method`` with ``settings`` over its defaults (an unknown key is an error).

    Examples:
        >>> method_config("system_prompts", {"max_new_tokens": 64}).max_new_tokens
        64
    """
    cls = PairsConfig if method == "icon2" else _spec(method).config
    settings = dict(settings or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{method} has no setting(s) {unknown}; its settings are {sorted(known)}.")
    return cls(**settings)


def _spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use 'icon2' or one of {sorted(METHODS)}.")
    return METHODS[method]


def make_pairs(
    method: str,
    model: LoadedModel,
    instructions: Any,
    config: Any = None,
    *,
    directions: DirectionSet | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
    **settings: Any,
) -> datasets.Dataset:
    """Make preference pairs with any registered method (or ``"icon2"``), by name.

    Args:
        method: ``"icon2"`` or a name in `METHODS`.
        model: from `icon2_lens.load_model`.
        instructions: a list of strings, rows with ``instruction`` (and ``criterion``), a ``score`` folder, a file
            or a built-in set (`icon2_lens.baselines.instruction_rows`).
        config: the method's config dataclass (default: its defaults); ``settings`` override its fields.
        directions: Icon2's `DirectionSet` (``"icon2"`` only).
        seed: the run's seed.
        out: a folder; a rerun with the same settings resumes.
        shard: ``(i, n)`` for data-parallel runs.
        progress: progress bar.
        meter: count costs into this meter instead of writing ``costs.json``.

    Returns:
        A ``datasets.Dataset`` of TRL conversational pairs with provenance (rows a method could not make into a pair
        have ``kept`` false).

    Examples:
        >>> ds = il.make_pairs("system_prompts", model, ["Name a river."], max_new_tokens=64)  # doctest: +SKIP
        >>> ds = il.make_pairs("icon2", model, kept_table, directions=dirs)  # doctest: +SKIP
    """
    from datasets import Dataset

    if method == "icon2":
        if directions is None:
            raise ValueError("method 'icon2' steers along a DirectionSet; pass directions=...")
        pcfg = replace(config or PairsConfig(), **settings) if settings else (config or PairsConfig())
        table = [{"instruction": r.instruction, "criterion": r.criterion} for r in instruction_rows(instructions)]
        return generate_pairs(model, directions, table, pcfg, seed=seed, out=out, progress=progress, shard=shard)
    spec = _spec(method)
    if config is not None and not isinstance(config, spec.config):
        raise TypeError(f"{method} takes a {spec.config.__name__}, got a {type(config).__name__}.")
    cfg: Any = config if config is not None else method_config(method, settings)
    if config is not None and settings:
        cfg = replace(cfg, **settings)
    rows = spec.make_pairs(model, instructions, cfg, seed=seed, out=out, shard=shard, progress=progress, meter=meter)
    return Dataset.from_list(rows)
