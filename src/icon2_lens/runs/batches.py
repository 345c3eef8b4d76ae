"""The one resumable, shardable, seeded batch loop that every row-making stage runs on.

A stage describes its work as a `BatchJob`: how many rows, how many per batch, and a function that
makes the rows of batch ``b`` from its seed. `run_batches` then

- seeds batch ``b`` with ``row_seed(seed, b)``, so the same seed gives the same rows whatever the
  sharding or the resuming;
- runs only the batches ``b % n == i`` of shard ``(i, n)`` (`icon2_lens.runs.shards`);
- with a folder, appends each finished batch to the data file (flushed and synced) after its
  settings file, and on a rerun with the same settings keeps the complete batches already there
  (a torn line or a partial last batch is cut off) and runs only the rest: nothing lost, nothing
  duplicated; a folder holding another run is refused, naming each differing setting;
- writes ``shard.json`` when a shard is finished;
- leaves nothing behind when it fails before its first batch is written (an invalid setting, a prompt
  longer than the context, Ctrl-C): the settings file it wrote and a folder it made are removed, so a
  corrected rerun starts afresh (and `icon2_lens.runs.io.open_run_folder` lets a rerun with other
  settings replace a folder that holds no row);
- shows a progress bar with the rows-per-second rate.

Examples:
    >>> job = BatchJob(stage="toy", n_rows=10, batch_size=4, seed=0,
    ...                make=lambda b, rows, seed: [{"x": i} for i in rows])
    >>> [r["index"] for r in run_batches(job, progress=False)]
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..gen.base import row_seed
from . import names
from .io import append_jsonl, atomic_write_text, has_rows, open_run_folder, read_jsonl_resumable
from .shards import check_shard, shard_batches, shard_label, write_shard_file

__all__ = ["BatchJob", "run_batches"]

#: Makes the rows of one batch: ``(batch index, the row indices it covers, its seed) -> rows``.
MakeBatch = Callable[[int, range, int], list[dict[str, Any]]]
#: Raises ``ValueError`` when a resumed row does not belong to this job's input (``row``, its index).
CheckRow = Callable[[dict[str, Any], int], None]


@dataclass(frozen=True, kw_only=True)
class BatchJob:
    """One stage's batches.

    Attributes:
        stage: the stage name (recorded in ``shard.json``).
        n_rows: rows of the whole (unsharded) run.
        batch_size: rows per batch; batch ``b`` covers indices ``b * batch_size ...``.
        seed: the run's seed; batch ``b`` gets ``row_seed(seed, b)``.
        make: makes a batch's rows (one per index it covers, unless ``whole_batches``).
        whole_batches: the last batch also makes ``batch_size`` rows (synthesis samples a full batch).
        check: validates a resumed row against the input (e.g. the same instruction).
        desc: progress-bar label.
        unit: progress-bar unit.
        shard_settings: more settings that must agree across shards (written into ``shard.json``).
        files: the stage's file names (default: ``names.STAGE_FILES[stage]``; a new pair-making method
            reuses ``names.STAGE_FILES["generate"]``).
    """

    stage: str
    n_rows: int
    batch_size: int
    seed: int
    make: MakeBatch
    whole_batches: bool = False
    check: CheckRow | None = None
    desc: str = "batches"
    unit: str = "row"
    shard_settings: dict[str, Any] = field(default_factory=dict)
    files: names.StageFiles | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
        if self.n_rows < 0:
            raise ValueError(f"n_rows must not be negative, got {self.n_rows}.")

    @property
    def n_batches(self) -> int:
        """Batches of the whole run."""
        return -(-self.n_rows // self.batch_size)

    def covers(self, b: int) -> range:
        """The row indices batch ``b`` makes."""
        end = (b + 1) * self.batch_size
        return range(b * self.batch_size, end if self.whole_batches else min(end, self.n_rows))

    def progress_rows(self, b: int) -> int:
        """Rows of batch ``b`` that count towards ``n_rows`` (the progress bar)."""
        return len(range(b * self.batch_size, min((b + 1) * self.batch_size, self.n_rows)))


def _resume(path: Path, job: BatchJob, batches: Sequence[int]) -> tuple[list[dict[str, Any]], int]:
    """The rows of the complete planned batches already in ``path`` (in order) and how many batches they are.

    A partial last batch is cut off the file; rows of batches beyond the plan (an earlier run of the same
    folder with more rows) are kept in the file but not returned.
    """
    done = read_jsonl_resumable(path)
    keep, n_done = 0, 0
    for b in batches:
        want = list(job.covers(b))
        part = done[keep:keep + len(want)]
        if len(part) < len(want):
            break
        if [r.get("index") for r in part] != want:
            raise ValueError(f"{path} does not match this run (rows {want[0]}..{want[-1]} expected at this point); "
                             "choose another folder.")
        if job.check is not None:
            for r in part:
                job.check(r, int(r["index"]))
        keep += len(want)
        n_done += 1
    if n_done < len(batches) and keep < len(done):  # a partial or foreign tail after the last complete batch
        atomic_write_text(path, "".join(_line(r) for r in done[:keep]))
    return done[:keep], n_done


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row) + "\n"


def run_batches(
    job: BatchJob,
    *,
    out: str | os.PathLike[str] | None = None,
    settings: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) ``job``'s batches; return the rows of this run (or shard), in index order.

    Args:
        job: the `BatchJob`.
        out: a folder: ``settings`` and the rows go there (`icon2_lens.runs.names.STAGE_FILES` names the files
            of the job's stage), and a rerun with the same settings resumes.
        settings: what identifies the run (recorded before the first row; the shard is added here).
        shard: ``(i, n)``: only the batches ``b % n == i``.
        progress: show a progress bar.

    Returns:
        The rows, each with ``index``, ``batch`` and ``seed`` set.
    """
    shard = check_shard(shard)
    batches = shard_batches(job.n_batches, shard)
    path: Path | None = None
    done: list[dict[str, Any]] = []
    n_done = 0
    made_folder = out is not None and not Path(out).exists()
    settings_path: Path | None = None
    try:
        if out is not None:
            files = job.files or names.STAGE_FILES.get(job.stage)
            if files is None:
                raise ValueError(f"Stage {job.stage!r} has no file names; pass BatchJob(files=...).")
            run_settings = dict(settings or {})
            if shard is not None:
                run_settings["shard"] = shard_label(shard)
            if files.settings is None:
                raise ValueError(f"Stage {job.stage!r} has no settings file, so it cannot resume from a folder.")
            path = open_run_folder(out, run_settings, settings_name=files.settings, data_name=files.data,
                                   what=job.stage)
            settings_path = Path(out) / files.settings
            if shard is not None:
                (Path(out) / names.SHARD).unlink(missing_ok=True)  # written again when this run is finished
            done, n_done = _resume(path, job, batches)
        _run(job, batches, path, done, n_done, progress)
    except BaseException:
        if path is not None and settings_path is not None and not has_rows(path):
            _forget(path, settings_path, made_folder=made_folder)
        raise
    if shard is not None and out is not None:
        write_shard_file(out, stage=job.stage, shard=shard, total=job.n_rows, rows=len(done),
                         settings=job.shard_settings)
    return done


def _run(job: BatchJob, batches: Sequence[int], path: Path | None, done: list[dict[str, Any]], n_done: int,
         progress: bool) -> None:
    """Make the batches after the first ``n_done`` of ``batches``, appending each to ``path`` and to ``done``."""
    total = sum(job.progress_rows(b) for b in batches)
    resumed = len(done)
    t0 = time.perf_counter()
    with tqdm(total=total, initial=sum(job.progress_rows(b) for b in batches[:n_done]), desc=job.desc,
              unit=job.unit, disable=not progress) as bar:
        for b in batches[n_done:]:
            seed = row_seed(job.seed, b)
            covers = job.covers(b)
            new = job.make(b, covers, seed)
            if len(new) != len(covers):
                raise RuntimeError(f"Batch {b} of {job.stage} made {len(new)} rows for {len(covers)} indices.")
            for i, r in zip(covers, new, strict=True):
                r.update(index=i, batch=b, seed=seed)
            if path is not None:
                append_jsonl(path, new)
            done.extend(new)
            bar.update(job.progress_rows(b))
            bar.set_postfix(per_s=f"{(len(done) - resumed) / max(time.perf_counter() - t0, 1e-9):.2f}")


def _forget(data: Path, settings: Path, *, made_folder: bool) -> None:
    """After a failure before the first row was written: remove the run's data and settings files (they describe
    nothing), and its folder when this run made it and nothing else is in it."""
    data.unlink(missing_ok=True)
    settings.unlink(missing_ok=True)
    folder = data.parent
    if made_folder and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
