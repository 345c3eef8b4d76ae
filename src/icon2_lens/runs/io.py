"""Atomic file and folder writes: outputs are never left half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import BadFileError, reading

__all__ = ["atomic_write_text", "atomic_folder", "check_output_folder", "append_jsonl", "read_jsonl",
           "read_jsonl_resumable", "open_run_folder", "has_rows"]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename.

    Examples:
        >>> atomic_write_text("out/report.md", "# report")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output_folder(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse to write into an existing non-empty folder unless ``overwrite`` is set.

    Examples:
        >>> check_output_folder("out/new", overwrite=False)  # doctest: +SKIP
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file; choose another output folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {path} already exists and is not empty; pass overwrite=True (CLI: --overwrite) "
            "to replace it, or choose another folder."
        )
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``path``; on success it replaces ``path`` in one rename.

    On error the temp folder is removed and ``path`` is left as it was.

    Examples:
        >>> with atomic_folder("out/directions") as tmp:  # doctest: +SKIP
        ...     (tmp / "x.json").write_text("{}")
    """
    path = check_output_folder(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            try:
                os.replace(path, old / "x")
            except BaseException:  # the previous folder cannot be moved aside: it stays; no empty .old is left
                shutil.rmtree(old, ignore_errors=True)
                raise
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)  # put the previous folder back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a JSONL file in one write, flushed and synced (a crash leaves at most a torn last line).

    Examples:
        >>> append_jsonl("out/raw.jsonl", [{"index": 0, "raw": "Hi"}])  # doctest: +SKIP
    """
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """The values of a JSONL file (blank lines skipped); a bad line is a ``ValueError`` naming ``path:line``.

    Examples:
        >>> rows = read_jsonl("runs/pairs/pairs.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{k} is not valid JSON ({exc.msg}).") from exc
    return rows


def read_jsonl_resumable(path: str | os.PathLike[str], *, unit: int = 1) -> list[dict[str, Any]]:
    """Rows of a file written by `append_jsonl`, repaired for resuming.

    Keeps the longest prefix of complete, valid lines whose count is a multiple of ``unit`` (a
    batch), and truncates the file to it: a torn last line or a partial batch from an interrupted
    run is cut off, so a rerun neither loses nor duplicates rows. A missing file gives ``[]``.

    Examples:
        >>> rows = read_jsonl_resumable("out/raw.jsonl", unit=16)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        return []
    good: list[dict[str, Any]] = []
    ends: list[int] = [0]  # byte offset after each good line
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                good.append(json.loads(line))
            except json.JSONDecodeError:
                break
            ends.append(ends[-1] + len(line))
    n_complete = (len(good) // unit) * unit
    if ends[n_complete] != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(ends[n_complete])
    return good[:n_complete]


def has_rows(path: str | os.PathLike[str]) -> bool:
    """Whether a JSONL data file holds at least one complete line (a row a rerun would keep).

    Examples:
        >>> has_rows("no/such/file.jsonl")
        False
    """
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return any(line.endswith(b"\n") and line.strip() for line in f)


def open_run_folder(out: str | os.PathLike[str], settings: dict[str, Any], *, settings_name: str,
                    data_name: str, what: str) -> Path:
    """Prepare a resumable run folder; return the path of its append-only data file.

    A new folder gets ``settings_name`` (JSON). A folder holding a run with the same settings is
    continued; one with other settings is refused with a message naming each difference, unless it
    holds no complete row yet (a run that failed before its first batch was written): then the new
    settings replace the old ones, so a corrected rerun is never blocked by the failed one. A data
    file without settings is refused.

    Examples:
        >>> raw = open_run_folder("runs/synth", {"seed": 0}, settings_name="synthesis.json",  # doctest: +SKIP
        ...                       data_name="raw.jsonl", what="synthesis")
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is a file; choose another output folder.")
    folder.mkdir(parents=True, exist_ok=True)
    data_path, settings_path = folder / data_name, folder / settings_name
    if settings_path.is_file():
        with reading(settings_path, what=f"the settings of a {what} run (JSON)",
                     todo="Delete the folder (or choose another) and run again."):
            old = json.loads(settings_path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise BadFileError(settings_path, f"holds a JSON {type(old).__name__}, not the settings of a {what} run",
                               "Delete the folder (or choose another) and run again.")
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff and not has_rows(data_path):  # nothing made with the old settings: the new ones replace them
            data_path.unlink(missing_ok=True)  # at most a torn line
            atomic_write_text(settings_path, json.dumps(settings, indent=2))
        elif diff:
            said = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{folder} holds a {what} run with other settings ({said}); rerun with the same "
                             "settings to continue it, or choose another output folder (CLI: or --overwrite).")
    elif data_path.exists():
        raise ValueError(f"{data_path} exists without {settings_name}; choose another output folder.")
    else:
        atomic_write_text(settings_path, json.dumps(settings, indent=2))
    return data_path
