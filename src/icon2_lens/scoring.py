"""Inherent-consistency scoring and selection (METHOD.md section 3).

Each instruction is read with no system prompt of its own (see `icon2_lens.prompts.scoring_texts`)
and the last token's residual ``h^l`` is projected on every criterion's direction ``u_c^l``:

    consistency(d, c) = mean over layers l of h^l . u_c^l              (paper's Eq. 2)
    consistency(d)    = max over c;  criterion(d) = argmax over c       (Eq. 3)

By default (``standardize=True``) each layer's projection is z-scored with the feature set's
projection mean and standard deviation stored in the `DirectionSet` before the mean over layers,
so layers and criteria with larger norms or offsets do not dominate; ``standardize=False`` is the
paper's Eq. 2 literally. On SmolLM2 the raw scores of the four criteria differ in their means by
more than their spread across instructions, so the raw argmax picks *harmless* for 88% of the
instructions whatever they say (docs: Synthesis and filtering, measured). The math is in
`icon2_lens.math.probe` (`project`, `consistency_scores`, `probe_scores`, `assign_criteria`) and
`icon2_lens.math.selection` (the selection rules), tested without a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm

from .activations import check_context, tokenize_texts
from .directions import DirectionSet
from .errors import BadInputError, check_finite
from .gen.base import check_count
from .gen.prefix import last_token_reader
from .instructions import load_instructions
from .math.probe import assign_criteria, consistency_scores, probe_scores, project
from .math.selection import DEFAULT_TOP_FRACTION, select_indices
from .models import LoadedModel
from .prompts import Render, scoring_texts
from .reports import consistency_figure
from .runs.shards import check_shard, parse_shard, shard_label, write_shard_file

if TYPE_CHECKING:
    import datasets
    import matplotlib.figure

__all__ = [
    "table_settings",
    "PROVENANCE_COLUMNS",
    "SHARD_COLUMNS",
    "ScoreConfig",
    "score_instructions",
    "select_instructions",
    "project",
    "consistency_scores",
    "assign_criteria",
    "scoring_layers",
    "consistency_histogram",
    "save_scores",
    "DEFAULT_TOP_FRACTION",
]


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """Settings of `score_instructions` and of the selection (`select_instructions` / `save_scores`): the one
    source of their defaults (library, CLI and pipeline). Give at most one selection rule; none: the top 10%.

    Attributes:
        layers: ``"all"`` (the paper's Eq. 2), ``"suggested"``, or layer ids.
        standardize: z-score each layer's projection with the feature-set statistics before averaging.
        render: ``"chat"`` (user turn) or ``"raw"`` text.
        batch_size: prompts per forward pass.
        top_fraction: keep this share.
        top_k: keep the best ``k``.
        threshold: keep ``consistency >= threshold``.
        balance_criteria: apply the rule within each assigned criterion.
        min_separation: the validity gate: a criterion whose held-out response-pair separation (the layer
            report's measure (c), `icon2_lens.DirectionSet.response_separation`) over the steering layers is
            below this is not assigned (its rows go to their best valid criterion), with a warning.
        allow_invalid: assign criteria that fail the validity gate anyway.
    """

    layers: Literal["all", "suggested"] | list[int] = "all"
    standardize: bool = True
    render: Render = "chat"
    batch_size: int = 32
    top_fraction: float | None = None
    top_k: int | None = None
    threshold: float | None = None
    balance_criteria: bool = False
    min_separation: float = 0.6
    allow_invalid: bool = False

    def __post_init__(self) -> None:
        check_finite(self.min_separation, "min_separation")
        if not 0.0 <= self.min_separation <= 1.0:
            raise BadInputError(f"min_separation is a share of pairs, in [0, 1]; got {self.min_separation}.",
                                option="min_separation")
        check_count(self.batch_size, "batch_size")
        _check_rule(self.top_fraction, self.top_k, self.threshold)
        rules = [k for k in ("top_fraction", "top_k", "threshold") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise BadInputError(f"set only one of top_fraction, top_k, threshold (got {', '.join(rules)}); "
                                "set the others to null", option=rules[-1])
        if self.balance_criteria and self.threshold is not None:
            raise BadInputError("balance_criteria works with top_fraction or top_k, not with a threshold.",
                                option="balance_criteria")


def _check_rule(top_fraction: float | None, top_k: int | None, threshold: float | None) -> None:
    """The selection rule's values: a share in (0, 1], a positive count, a finite threshold."""
    check_finite(top_fraction, "top_fraction", low=0.0, high=1.0, low_open=True)
    check_count(top_k, "top_k")
    check_finite(threshold, "threshold")


def scoring_layers(directions: DirectionSet, layers: Literal["all", "suggested"] | Sequence[int] | range) -> list[int]:
    """Resolve a layer choice to model layer ids present in ``directions``.

    ``"all"``: every layer of the set (the paper's Eq. 2); ``"suggested"``: the range the layer report
    recorded; or explicit layer ids.

    Examples:
        >>> scoring_layers(dirs, "all")  # doctest: +SKIP
        [0, 1, ..., 29]
    """
    if layers == "all":
        return list(directions.layers)
    if layers == "suggested":
        if not directions.suggested_layers:
            raise ValueError("These directions have no suggested layers yet; run `icon2-lens layers` (or "
                             "layer_report(...).apply(dirs)) first, or pass layers='all' or a list.")
        return list(directions.suggested_layers)
    if isinstance(layers, str):
        raise ValueError(f"Unknown layers {layers!r}; use 'all', 'suggested' or a list of layer ids.")
    out = list(layers)
    missing = [x for x in out if x not in directions.layers]
    if not out or missing:
        raise ValueError(f"Layers {missing or out} are not in the directions (which have {list(directions.layers)}); "
                         "pass layers from these (CLI: --layers), or 'all' or 'suggested'.")
    return out


def score_instructions(
    model: LoadedModel,
    directions: DirectionSet,
    instructions: Sequence[str] | str | Path | Any,
    *,
    layers: Literal["all", "suggested"] | Sequence[int] | range = ScoreConfig.layers,
    standardize: bool = ScoreConfig.standardize,
    render: Render = ScoreConfig.render,
    system_prompt: str | None = None,
    batch_size: int = ScoreConfig.batch_size,
    min_separation: float = ScoreConfig.min_separation,
    allow_invalid: bool = ScoreConfig.allow_invalid,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    reuse_prefix: bool = True,
) -> datasets.Dataset:
    """Score each instruction's inherent consistency with every criterion (Eq. 2/3).

    Args:
        model: from `icon2_lens.load_model`; must match the model the directions came from.
        directions: a `DirectionSet`; its hook is the one read.
        instructions: a list, a TXT/JSONL file, a ``synthesize`` output folder, or a ``datasets.Dataset``
            (see `icon2_lens.load_instructions`).
        layers: ``"all"`` (default, as the paper), ``"suggested"`` or layer ids.
        standardize: z-score each layer's projection with the feature-set statistics stored in
            ``directions`` (``proj_mean``, ``proj_std``) before averaging (default). ``False``: the
            paper's raw Eq. 2, whose argmax is dominated by per-criterion offsets on SmolLM2.
        render: ``"chat"`` (default: the instruction as a user turn, ending at the assistant-turn
            start, no system message of our own; SmolLM2's template inserts its default system
            prompt there) or ``"raw"`` (the bare text). See `icon2_lens.prompts.scoring_texts`.
        system_prompt: replace the template's default system message (``render="chat"`` only).
        batch_size: prompts per forward pass. Memory is one chunk of ``32 * batch_size`` prompts plus
            ``n x criterion`` scores: flat in the number of instructions.
        min_separation: the validity gate (`valid_criteria`): criteria whose response-pair separation over
            the steering layers is below it are not assigned; their ``score_`` columns are still written.
        allow_invalid: assign every criterion, valid or not.
        progress: show a progress bar.
        shard: ``(i, n)``: score only the batches ``b`` with ``b % n == i`` of the batches the
            unsharded run forms (the same rows in each, so the same padding and bit-identical scores),
            for data-parallel runs (`icon2_lens.shards`). Standardisation uses the feature-set
            statistics of ``directions``, not the scored rows, so it does not depend on the shard.
        reuse_prefix: compute the tokens every prompt of a batch starts with (the chat template's head and
            default system prompt) once and reuse their KV cache for the batch (default;
            `icon2_lens.gen.prefix.PrefixReader`, HF fast path); ``False`` reads full prompts through the
            bridge's hook points. Same scores within float tolerance.

    Returns:
        A ``datasets.Dataset`` with ``instruction``, ``score_<criterion>`` per criterion,
        ``consistency`` (the max) and ``criterion`` (the argmax's name), in input order, then the settings
        as provenance columns (`PROVENANCE_COLUMNS`: ``probe_layers``, ``standardize``, ``render``,
        ``system_prompt``, ``hook``, ``model``; `table_settings` reads them back). With a ``shard``: only
        the shard's rows, in input order, with the columns `SHARD_COLUMNS` (``index``: the row's position
        in the whole input; the shard, total row count, batch size and a hash of the input);
        `save_scores` writes it as a shard folder for `icon2_lens.merge_shards`.

    Examples:
        >>> table = il.score_instructions(model, dirs, ["Write a poem.", "Explain DNS."])  # doctest: +SKIP
        >>> table.column_names  # doctest: +SKIP
        ['instruction', 'score_general', 'score_helpful', 'score_honest', 'score_harmless', 'consistency', 'criterion']
    """
    from datasets import Dataset

    directions.check_compatible(model)
    check_count(batch_size, "batch_size")
    check_finite(min_separation, "min_separation", low=0.0, high=1.0)
    shard = check_shard(shard)
    layer_ids = scoring_layers(directions, layers)
    instr = load_instructions(instructions)
    check_context(model, scoring_texts(model.tokenizer, instr, render=render, system_prompt=system_prompt),
                  what="instructions")  # before the first batch
    cols = [directions.layers.index(x) for x in layer_ids]
    vecs = directions.vectors[:, cols]
    mean = std = None
    if standardize:
        mean, std = directions.stats["proj_mean"][:, cols], directions.stats["proj_std"][:, cols]
    scores = torch.empty(len(instr), len(directions.criteria))
    chunk = 32 * batch_size
    # Batches are numbered over the whole input (a chunk holds 32 of them); a shard (i, n) runs batches b % n == i.
    mine = (lambda b: True) if shard is None else (lambda b: b % shard[1] == shard[0])
    n_mine = sum(min(batch_size, len(instr) - b * batch_size) for b in range(-(-len(instr) // batch_size)) if mine(b))
    done: list[int] = []
    with last_token_reader(model, hook=directions.hook, layers=layer_ids, reuse_prefix=reuse_prefix) as reader, \
            tqdm(total=n_mine, desc="scoring", unit="instr", disable=not progress) as bar:
        for c0 in range(0, len(instr), chunk):
            first = c0 // batch_size
            if not any(mine(first + j) for j in range(-(-len(instr[c0:c0 + chunk]) // batch_size))):
                continue
            ids = tokenize_texts(model, scoring_texts(model.tokenizer, instr[c0:c0 + chunk], render=render,
                                                      system_prompt=system_prompt))
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per batch
            for b0 in range(0, len(order), batch_size):
                if not mine(first + b0 // batch_size):
                    continue
                rows = order[b0:b0 + batch_size]
                h = reader.read([ids[i] for i in rows])
                scores[[c0 + i for i in rows]] = probe_scores(h, vecs, mean=mean, std=std)
                done.extend(c0 + i for i in rows)
                bar.update(len(rows))
    keep = sorted(done)
    scores = scores[keep]
    valid = valid_criteria(directions, min_separation=min_separation, allow_invalid=allow_invalid)
    masked = scores.clone()
    masked[:, [i for i, c in enumerate(directions.criteria) if c not in valid]] = float("-inf")
    best, idx = assign_criteria(masked)
    table: dict[str, list[Any]] = {"instruction": [instr[i] for i in keep]}
    for ci, name in enumerate(directions.criteria):
        table[f"score_{name}"] = scores[:, ci].tolist()
    table["consistency"] = best.tolist()
    table["criterion"] = [directions.criteria[i] for i in idx.tolist()]
    provenance = {"probe_layers": layer_ids, "standardize": standardize, "render": render,
                  "system_prompt": system_prompt, "hook": directions.hook, "model": model.info.model_id,
                  "assigned_criteria": valid}
    if shard is not None:
        table["index"] = keep
        digest = hashlib.sha256(json.dumps(instr).encode()).hexdigest()
        provenance.update({"shard": shard_label(shard), "shard_total": len(instr), "shard_batch_size": batch_size,
                           "instructions_sha256": digest})
    table.update({k: [v] * len(keep) for k, v in provenance.items()})
    return Dataset.from_dict(table)


#: Provenance columns a sharded `score_instructions` adds (dropped again by the merge).
SHARD_COLUMNS = ("index", "shard", "shard_total", "shard_batch_size", "instructions_sha256")
#: The scoring settings, as columns of every row of a score table.
PROVENANCE_COLUMNS = ("probe_layers", "standardize", "render", "system_prompt", "hook", "model", "assigned_criteria")


def valid_criteria(directions: DirectionSet, *, min_separation: float = ScoreConfig.min_separation,
                   allow_invalid: bool = ScoreConfig.allow_invalid, warn: bool = True) -> list[str]:
    """The criteria that pass the validity gate: held-out response-pair separation (the layer report's (c),
    `icon2_lens.DirectionSet.response_separation`) over the steering layers at least ``min_separation``.

    A direction below it does not order good answers above bad ones on human-written pairs (0.5 is chance;
    on SmolLM2 *harmless* reads backwards), so steering along it makes pairs that point the wrong way. A
    criterion without response pairs passes (nothing to check it on). Without a layer report nothing can be
    checked: every criterion passes, with a warning. With ``allow_invalid`` every criterion passes and the
    warning says which would have failed.

    Examples:
        >>> valid_criteria(dirs)  # doctest: +SKIP
        ['general', 'helpful', 'honest']
    """
    import warnings

    sep = directions.response_separation()
    if not sep:
        if warn:
            warnings.warn("These directions have no layer report, so the validity gate (response-pair separation "
                          f">= {min_separation}) cannot be checked; every criterion is assigned. Run `icon2-lens "
                          "layers` first.", stacklevel=3)
        return list(directions.criteria)
    bad = {c: v for c, v in sep.items() if v is not None and v < min_separation and c in directions.criteria}
    if bad and warn:
        which = ", ".join(f"{c} ({v:.2f})" for c, v in bad.items())
        if allow_invalid:
            warnings.warn(f"Criteria below the validity gate are assigned anyway (allow_invalid): {which}; their "
                          f"directions order fewer than {min_separation:.0%} of held-out good/bad response pairs "
                          "the right way at the steering layers.", stacklevel=3)
        else:
            warnings.warn(f"Not assigning {which}: at the steering layers their directions order fewer than "
                          f"{min_separation:.0%} of held-out good/bad response pairs the right way (0.5 is chance), "
                          "so steering along them would make pairs that point the wrong way; their rows go to their "
                          "best valid criterion. Pass allow_invalid=True (CLI: --allow-invalid) to use them.",
                          stacklevel=3)
    if allow_invalid:
        return list(directions.criteria)
    keep = [c for c in directions.criteria if c not in bad]
    if not keep:
        raise ValueError(f"No criterion passes the validity gate (response-pair separation >= {min_separation}): "
                         f"{sep}. Check the layer report, choose other layers, or pass allow_invalid=True.")
    return keep


def table_settings(table: Any) -> dict[str, Any]:
    """The scoring settings a score table carries in its provenance columns (read from its first row), and
    its criteria (from its ``score_<criterion>`` columns, in order).

    Examples:
        >>> table_settings(table)["criteria"]  # doctest: +SKIP
        ['general', 'helpful', 'honest', 'harmless']
    """
    columns = list(table.column_names) if hasattr(table, "column_names") else list(table[0])
    out: dict[str, Any] = {"criteria": [c[len("score_"):] for c in columns if c.startswith("score_")]}
    if len(table) == 0:
        return out
    first = table[0]
    out.update({k: first[k] for k in (*PROVENANCE_COLUMNS, *SHARD_COLUMNS[1:]) if k in first})
    if "probe_layers" in out:
        out["layers"] = out.pop("probe_layers")
    return out


def save_scores(
    table: datasets.Dataset,
    out: str | os.PathLike[str],
    *,
    top_fraction: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    balance_criteria: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write a `score_instructions` table into a folder as ``icon2-lens score`` does (atomically).

    A whole table is selected (`select_instructions`) and written as ``scores.jsonl``,
    ``selected.jsonl``, ``consistency_hist.png`` and ``score_report.json``. A shard's table
    (``score_instructions(..., shard=(i, n))``) is written as a shard folder for
    `icon2_lens.merge_shards`: ``scores.jsonl`` (full float precision, with ``index``) and
    ``shard.json``; selection needs all rows, so it is the merge's job and no rule may be given here.

    Args:
        table: from `score_instructions` (or a merged one).
        out: the output folder.
        top_fraction: selection: keep this share (default rule: `DEFAULT_TOP_FRACTION`).
        top_k: selection: keep the best ``k``.
        threshold: selection: keep ``consistency >= threshold``.
        balance_criteria: selection within each assigned criterion.
        overwrite: replace an existing non-empty folder.

    Returns:
        The paths written.

    Examples:
        >>> il.scoring.save_scores(table, "runs/scored", top_fraction=0.1)  # doctest: +SKIP
    """
    from .runs.io import atomic_folder, check_output_folder

    check_output_folder(out, overwrite=overwrite)
    settings = table_settings(table)
    selection: dict[str, Any] = {"top_fraction": top_fraction, "top_k": top_k, "threshold": threshold,
                 "balance_criteria": balance_criteria}
    if "shard" in settings:
        if any(v is not None for v in (top_fraction, top_k, threshold)) or balance_criteria:
            raise ValueError("A shard's scores are not selected on their own (the selection needs all rows); give the "
                             "selection options to merge_shards (CLI: icon2-lens merge score) instead.")
        shard = settings.pop("shard")
        total = settings.pop("shard_total")
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
            write_shard_file(tmp, stage="score", shard=parse_shard(shard), total=total, rows=len(table),
                             settings=settings)
        return [Path(out) / "scores.jsonl", Path(out) / "shard.json"]
    selected = select_instructions(table, **selection)
    report = {
        "settings": settings,
        "selection": selection,
        "scored": len(table),
        "selected": len(selected),
        "criterion_all": dict(Counter(table["criterion"])),
        "criterion_selected": dict(Counter(selected["criterion"])),
        "lowest_selected_consistency": min(selected["consistency"]),
    }
    names = ["scores.jsonl", "selected.jsonl", "consistency_hist.png", "score_report.json"]
    with atomic_folder(out, overwrite=overwrite) as tmp:
        table.to_json(tmp / names[0], lines=True)
        selected.to_json(tmp / names[1], lines=True)
        consistency_histogram(table, selected).savefig(tmp / names[2], dpi=110)
        (tmp / names[3]).write_text(json.dumps(report, indent=2))
    return [Path(out) / n for n in names]


def select_instructions(
    table: datasets.Dataset,
    *,
    top_fraction: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    balance_criteria: bool = False,
) -> datasets.Dataset:
    """Keep the most consistent instructions of a `score_instructions` table.

    Give at most one rule; with none, the top ``DEFAULT_TOP_FRACTION`` (10%, as the paper) is kept.

    Args:
        table: from `score_instructions` (needs ``consistency`` and ``criterion``).
        top_fraction: keep the best ``ceil(fraction * n)`` rows, ``0 < fraction <= 1``.
        top_k: keep the best ``k`` rows.
        threshold: keep rows with ``consistency >= threshold``.
        balance_criteria: apply ``top_fraction`` / ``top_k`` within each assigned criterion so that
            every criterion is represented: ``top_k`` is split evenly across criteria, and a criterion
            with fewer rows than its share passes the rest to the others; not with ``threshold``.

    Returns:
        The kept rows, best first (ties keep input order), with all columns of ``table``. Raises
        ``ValueError`` when nothing would be kept.

    Examples:
        >>> sel = il.select_instructions(table, top_fraction=0.1)  # doctest: +SKIP
    """
    missing = {"consistency", "criterion"} - set(table.column_names)
    if missing:
        raise ValueError(f"The table lacks {sorted(missing)}; pass the output of score_instructions.")
    _check_rule(top_fraction, top_k, threshold)
    keep = select_indices(list(table["consistency"]), list(table["criterion"]), top_fraction=top_fraction, top_k=top_k,
                          threshold=threshold, balance_criteria=balance_criteria)
    return table.select(keep)


def consistency_histogram(
    table: datasets.Dataset,
    selected: datasets.Dataset | None = None,
    *,
    bins: int = 30,
) -> matplotlib.figure.Figure:
    """One panel per criterion: consistency of the rows assigned to it, the selection cut drawn.

    The cut of a panel is the lowest consistency among the selected rows of that criterion (with a
    global rule it is the same line in every panel). Built without pyplot (no global state).

    Examples:
        >>> consistency_histogram(table, il.select_instructions(table)).savefig("hist.png")  # doctest: +SKIP
    """
    crit = list(table["criterion"])
    names = table_settings(table)["criteria"] or None
    selected_cons: dict[str, list[float]] = {}
    if selected is not None:
        for c, v in zip(selected["criterion"], selected["consistency"], strict=True):
            selected_cons.setdefault(c, []).append(v)
    return consistency_figure(crit, list(table["consistency"]), names=names, selected=selected_cons, bins=bins)
