"""Merging the shard folders of a sharded stage into the folder the unsharded command writes.

    icon2-lens generate ... --shard 0/2 --out runs/pairs_0   # one process (or GPU, or machine) each
    icon2-lens generate ... --shard 1/2 --out runs/pairs_1
    icon2-lens merge generate --out runs/pairs runs/pairs_0 runs/pairs_1

Reading and checking the shards is `icon2_lens.runs.shards.read_shards`; this module adds each
stage's global step (clean-up of synthesis, selection of scores, the model-free pair report).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..evaluation import pair_report
from ..runs import names
from ..runs.io import atomic_folder, atomic_write_text, check_output_folder
from ..runs.shards import read_shards
from ..scoring import SHARD_COLUMNS, save_scores
from ..synthesis import finish_synthesis

if TYPE_CHECKING:
    import datasets

__all__ = ["merge_shards", "MergeStage"]

#: The stages that can be sharded and merged.
MergeStage = Literal["synthesize", "score", "generate"]

def merge_shards(
    stage: MergeStage,
    shard_dirs: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    overwrite: bool = False,
    top_fraction: float | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    balance_criteria: bool = False,
) -> datasets.Dataset:
    """Merge the shard folders of a sharded stage into the folder the unsharded command writes.

    Checks that the shards are ``0/n`` ... ``n-1/n`` for one ``n``, each exactly once, that their
    settings agree except for the shard, and that every row index appears exactly once; then runs
    the stage's global step on all rows in index order and writes (atomically, into ``out``):

    - ``"synthesize"``: clean-up and de-duplication over all rows: ``instructions.jsonl``,
      ``dropped.jsonl``, ``report.json``, plus the merged ``raw.jsonl`` and ``synthesis.json`` (without
      the shard), i.e. a finished unsharded synthesis folder.
    - ``"score"``: the selection: ``scores.jsonl``, ``selected.jsonl``, ``consistency_hist.png``,
      ``score_report.json`` (see `icon2_lens.scoring.save_scores`).
    - ``"generate"``: ``pairs.jsonl``, ``generation.json`` (without the shard) and ``report.json``
      with the model-free figures of `icon2_lens.evaluation.pair_report` only (no ``win_share``: the probe scorer
      of the unsharded command needs the model; call ``pair_report(pairs, scorer=ProbeScorer(...))``).

    Args:
        stage: ``"synthesize"``, ``"score"`` or ``"generate"``.
        shard_dirs: the shard output folders, in any order.
        out: the merged output folder.
        overwrite: replace an existing non-empty ``out``.
        top_fraction: score only: keep this share (the default rule when no rule is given is 10%).
        top_k: score only: keep the best ``k``.
        threshold: score only: keep ``consistency >= threshold``.
        balance_criteria: score only: apply the rule within each assigned criterion.

    Returns:
        The merged rows as a ``datasets.Dataset``, equal to what the unsharded call returns: the kept
        instructions (synthesize, with the report for `icon2_lens.synthesis.synthesis_report`), the full score
        table (score), or the pairs (generate).

    Examples:
        >>> pairs = il.merge_shards("generate", ["runs/pairs_0", "runs/pairs_1"], out="runs/pairs")  # doctest: +SKIP
    """

    if stage not in names.SHARDABLE:
        raise ValueError(f"Unknown stage {stage!r}; use one of {list(names.SHARDABLE)}.")
    selection: dict[str, Any] = {"top_fraction": top_fraction, "top_k": top_k, "threshold": threshold}
    if stage != "score" and (any(v is not None for v in selection.values()) or balance_criteria):
        raise ValueError(f"Selection options (top_fraction, top_k, threshold, balance_criteria) apply to merging "
                         f"'score' shards only, not {stage!r}.")
    if isinstance(shard_dirs, (str, os.PathLike)) or not shard_dirs:
        raise ValueError("Pass a list of shard folders (at least one).")
    out_path = check_output_folder(out, overwrite=overwrite)
    if any(out_path.resolve() == Path(f).resolve() for f in shard_dirs):
        raise ValueError(f"The output folder {out_path} is one of the shard folders; choose another --out.")
    files = names.STAGE_FILES[stage]
    shards = read_shards(shard_dirs, stage=stage, settings_file=files.settings, data_file=files.data,
                         whole_batches_of="batch_size" if stage == "synthesize" else None)  # raw.jsonl: whole batches
    rows = shards.rows
    with atomic_folder(out_path, overwrite=overwrite) as tmp:
        if stage == "synthesize":
            assert files.settings is not None  # synthesize and generate write a settings file
            atomic_write_text(tmp / files.data, "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(tmp / files.settings, json.dumps(shards.run_settings, indent=2))
            ds = finish_synthesis(rows, shards.run_settings, n=shards.total, folder=tmp,
                                  special_tokens=shards.settings["special_tokens"], wall=0.0,
                                  **shards.settings["cleanup"])
        elif stage == "score":
            from datasets import Dataset

            table = Dataset.from_list([{k: v for k, v in r.items() if k not in SHARD_COLUMNS} for r in rows])
            save_scores(table, tmp, overwrite=True, balance_criteria=balance_criteria, **selection)
            ds = table
        else:
            from datasets import Dataset

            assert files.settings is not None
            atomic_write_text(tmp / files.data, "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(tmp / files.settings, json.dumps(shards.run_settings, indent=2))
            ds = Dataset.from_list(rows)
            atomic_write_text(tmp / names.PAIR_REPORT, json.dumps(pair_report(rows), indent=2))
    return ds
