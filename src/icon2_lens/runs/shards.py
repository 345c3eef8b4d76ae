"""Data-parallel shards of the row-parallel stages (synthesize, score, generate), and reading them back.

A stage cut into ``n`` shards forms its batches exactly as the unsharded run does (same batch size,
row order and per-batch seed); shard ``i`` runs only the batches ``b`` with ``b % n == i``. Rows keep
their global ``index``, so `read_shards` puts them back in order and the merge
(`icon2_lens.pipeline.merge_shards`, which runs each stage's global step) equals the unsharded run.
A finished shard folder holds a ``shard.json`` (written last) beside the stage's usual files.

    icon2-lens generate ... --shard 0/2 --out runs/pairs_0   # one process (or GPU, or machine) each
    icon2-lens generate ... --shard 1/2 --out runs/pairs_1
    icon2-lens merge generate --out runs/pairs runs/pairs_0 runs/pairs_1
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import names
from .io import atomic_write_text, read_jsonl

__all__ = ["parse_shard", "check_shard", "shard_batches", "shard_device", "shard_label", "write_shard_file",
           "read_shards", "ShardSet", "SHARD_FILE"]

#: The file a finished shard writes last: stage, shard, total rows, and settings that must agree across shards.
SHARD_FILE = names.SHARD


def check_shard(shard: tuple[int, int] | Sequence[int] | None) -> tuple[int, int] | None:
    """Validate a shard ``(i, n)``: ``n >= 1`` shards numbered ``0 <= i < n``; ``None`` means unsharded.

    Examples:
        >>> check_shard((1, 2)), check_shard(None)
        ((1, 2), None)
    """
    if shard is None:
        return None
    if isinstance(shard, str):
        raise TypeError(f"shard must be a tuple (i, n), got the string {shard!r}; use parse_shard({shard!r}).")
    try:
        i, n = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (i, n), got {shard!r}.") from None
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (i, n)):
        raise ValueError(f"shard (i, n) must be integers, got {shard!r}.")
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is out of range: need n >= 1 and 0 <= i < n (shards are numbered from 0, "
                         "e.g. 0/2 and 1/2).")
    return int(i), int(n)


def parse_shard(text: str, *, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Parse ``"i/n"`` (shard ``i`` of ``n``, from 0) or ``"auto"``.

    ``"auto"`` reads ``RANK`` and ``WORLD_SIZE``, which ``accelerate launch`` (with several processes)
    and ``torchrun`` set for every process; without both it is ``0/1`` (a single process, e.g.
    ``accelerate launch`` with one process, which sets neither).

    Args:
        text: ``"i/n"`` or ``"auto"``.
        env: the environment to read for ``"auto"`` (default ``os.environ``).

    Returns:
        ``(i, n)``.

    Examples:
        >>> parse_shard("1/4"), parse_shard("auto", env={"RANK": "3", "WORLD_SIZE": "8"}), parse_shard("auto", env={})
        ((1, 4), (3, 8), (0, 1))
    """
    env = os.environ if env is None else env
    if text.strip() == "auto":
        rank, world = env.get("RANK"), env.get("WORLD_SIZE")
        if rank is None and world is None:
            return 0, 1
        if rank is None or world is None:
            raise ValueError(f"--shard auto needs both RANK and WORLD_SIZE (set by accelerate launch / torchrun); "
                             f"found RANK={rank!r}, WORLD_SIZE={world!r}. Pass --shard i/n instead.")
        try:
            spec = int(rank), int(world)
        except ValueError:
            raise ValueError(f"--shard auto: RANK={rank!r} and WORLD_SIZE={world!r} must be integers.") from None
        return check_shard(spec)  # type: ignore[return-value]
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text)
    if m is None:
        raise ValueError(f"--shard {text!r}: use 'i/n' (shard i of n, numbered from 0, e.g. 0/4) or 'auto'.")
    return check_shard((int(m.group(1)), int(m.group(2))))  # type: ignore[return-value]


def shard_device(env: Mapping[str, str] | None = None) -> str | None:
    """``"cuda:LOCAL_RANK"`` when a launcher set ``LOCAL_RANK`` and CUDA is available, else ``None``
    (the default device).

    Examples:
        >>> shard_device({})  # no launcher
    """
    import torch

    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK")
    if local is None or not torch.cuda.is_available():
        return None
    return f"cuda:{int(local)}"


def shard_batches(n_batches: int, shard: tuple[int, int] | None) -> list[int]:
    """The batch indices shard ``(i, n)`` runs: ``b % n == i`` (all of them unsharded).

    Examples:
        >>> shard_batches(5, (1, 2)), shard_batches(3, None)
        ([1, 3], [0, 1, 2])
    """
    if shard is None:
        return list(range(n_batches))
    i, n = shard
    return list(range(i, n_batches, n))


def shard_label(shard: tuple[int, int]) -> str:
    """``"i/n"``, as stored in settings files.

    Examples:
        >>> shard_label((1, 4))
        '1/4'
    """
    return f"{shard[0]}/{shard[1]}"


def write_shard_file(folder: str | os.PathLike[str], *, stage: str, shard: tuple[int, int], total: int, rows: int,
                     settings: dict[str, Any] | None = None) -> Path:
    """Mark a shard folder finished: write ``shard.json`` (atomically), what `merge_shards` reads besides the data.

    Args:
        folder: the shard's output folder.
        stage: the stage that wrote it.
        shard: ``(i, n)``.
        total: rows of the whole (unsharded) run.
        rows: rows in this shard's data file.
        settings: more settings that must agree across the shards (e.g. a hash of the input).

    Returns:
        The path of ``shard.json``.

    Examples:
        >>> write_shard_file("runs/pairs_0", stage="generate", shard=(0, 2), total=100, rows=48)  # doctest: +SKIP
    """

    info = {"stage": stage, "shard": shard_label(shard), "total": total, "rows": rows, "settings": settings or {}}
    return atomic_write_text(Path(folder) / SHARD_FILE, json.dumps(info, indent=2))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg}).") from exc


@dataclass
class ShardSet:
    """The rows and settings of a complete, consistent set of shard folders (`read_shards`).

    Attributes:
        rows: every row, in ``index`` order.
        settings: the settings all shards agree on (run settings without the shard, plus ``shard.json``'s).
        run_settings: the shards' settings file without the shard (what the unsharded run writes).
        total: rows of the whole run.
    """

    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    run_settings: dict[str, Any]
    total: int


def _read_shard(folder: Path, stage: str, settings_file: str | None, data_file: str) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"Shard folder {folder} does not exist.")
    marker = folder / SHARD_FILE
    if not marker.is_file():
        raise ValueError(f"{folder} has no {SHARD_FILE}: it is not a finished shard (an interrupted shard is finished "
                         "by rerunning its command with the same settings and --shard).")
    info = _read_json(marker)
    if info.get("stage") != stage:
        raise ValueError(f"{folder} is a {info.get('stage')!r} shard, not a {stage!r} one.")
    settings = dict(info.get("settings") or {})
    info["run_settings"] = {}
    if settings_file is not None:
        run = _read_json(folder / settings_file)
        if run.get("shard") != info.get("shard"):
            raise ValueError(f"{folder}: {settings_file} says shard {run.get('shard')!r} but {SHARD_FILE} "
                             f"says {info.get('shard')!r}; rerun that shard into a fresh folder.")
        run.pop("shard", None)
        info["run_settings"] = run
        settings = {**run, **settings}
    i, n = parse_shard(str(info.get("shard")))
    rows = read_jsonl(folder / data_file)
    if len(rows) != info.get("rows"):
        raise ValueError(f"{folder}: {data_file} holds {len(rows)} rows but {SHARD_FILE} says "
                         f"{info.get('rows')}; rerun that shard.")
    return {"folder": folder, "i": i, "n": n, "total": info.get("total"), "settings": settings, "info": info,
            "rows": rows}


def read_shards(folders: Sequence[str | os.PathLike[str]], *, stage: str, settings_file: str | None, data_file: str,
                whole_batches_of: str | None = None) -> ShardSet:
    """Read and check the shard folders of one sharded run.

    Checks that the shards are ``0/n`` ... ``n-1/n`` for one ``n``, each exactly once, that their settings
    agree except for the shard, and that every row index of ``0..total-1`` appears exactly once.

    Args:
        folders: the shard folders, in any order.
        stage: the stage name their ``shard.json`` must carry.
        settings_file: the run's settings file (``None``: the stage has none).
        data_file: the append-only rows file.
        whole_batches_of: the settings key of the batch size when the run writes whole batches (rows up to the
            end of the last batch count).

    Returns:
        A `ShardSet`.

    Examples:
        >>> s = read_shards(["p0", "p1"], stage="generate", settings_file="generation.json",  # doctest: +SKIP
        ...                 data_file="pairs.jsonl")
    """
    if isinstance(folders, (str, os.PathLike)) or not folders:
        raise ValueError("Pass a list of shard folders (at least one).")
    shards = [_read_shard(Path(f), stage, settings_file, data_file) for f in folders]
    _check_set(shards)
    ref = shards[0]
    for s in shards[1:]:
        for key in sorted(set(ref["settings"]) | set(s["settings"])):
            if ref["settings"].get(key) != s["settings"].get(key):
                raise ValueError(f"Shards disagree on {key!r}: {ref['settings'].get(key)!r} in {ref['folder']}, "
                                 f"{s['settings'].get(key)!r} in {s['folder']}; all shards must run with the same "
                                 "settings.")
        if s["total"] != ref["total"]:
            raise ValueError(f"Shards disagree on the number of rows: {ref['total']} in {ref['folder']}, "
                             f"{s['total']} in {s['folder']}; all shards must run on the same input.")
    rows = _merged_rows(shards, int(ref["settings"][whole_batches_of]) if whole_batches_of else None)
    return ShardSet(rows=rows, settings=ref["settings"], run_settings=ref["info"]["run_settings"], total=ref["total"])


def _check_set(shards: list[dict[str, Any]]) -> None:
    ns = {s["n"] for s in shards}
    if len(ns) > 1:
        said = ", ".join(f"{s['folder']} is {s['i']}/{s['n']}" for s in shards)
        raise ValueError(f"The shards come from runs cut into different numbers of shards ({said}).")
    n = ns.pop()
    seen: dict[int, list[Path]] = {}
    for s in shards:
        seen.setdefault(s["i"], []).append(s["folder"])
    dup = {i: f for i, f in seen.items() if len(f) > 1}
    if dup:
        said = "; ".join(f"{i}/{n}: {', '.join(map(str, f))}" for i, f in sorted(dup.items()))
        raise ValueError(f"Duplicate shards ({said}); pass each shard folder once.")
    missing = [i for i in range(n) if i not in seen]
    if missing:
        raise ValueError(f"Missing shards {', '.join(f'{i}/{n}' for i in missing)} (got "
                         f"{', '.join(f'{i}/{n}' for i in sorted(seen))}); run them and pass every shard folder.")


def _merged_rows(shards: list[dict[str, Any]], round_to: int | None) -> list[dict[str, Any]]:
    total = shards[0]["total"]
    if round_to:  # whole batches are written: up to the end of the last batch
        total = -(-total // round_to) * round_to
        for s in shards:  # batches beyond the end (an earlier run of that folder with a larger n)
            s["rows"] = [r for r in s["rows"] if not isinstance(r.get("index"), int) or r["index"] < total]
    owner: dict[int, Path] = {}
    dups: list[str] = []
    for s in shards:
        for r in s["rows"]:
            idx = r.get("index")
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise ValueError(f"{s['folder']}: a row has no integer 'index'; it was not written by a sharded run.")
            if idx in owner:
                dups.append(f"{idx} ({owner[idx]}, {s['folder']})")
            owner[idx] = s["folder"]
    if dups:
        raise ValueError(f"Row indices occur more than once: {', '.join(dups[:5])}"
                         f"{' ...' if len(dups) > 5 else ''}; pass each shard once, each from its own run.")
    missing = sorted(set(range(total)) - set(owner))
    extra = sorted(set(owner) - set(range(total)))
    if missing or extra:
        raise ValueError(f"The shards do not cover rows 0..{total - 1} exactly (missing {missing[:10]}, unexpected "
                         f"{extra[:10]}); a shard is incomplete or from another run: rerun it.")
    rows = [r for s in shards for r in s["rows"]]
    rows.sort(key=lambda r: r["index"])
    return rows
