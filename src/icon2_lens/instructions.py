"""Instruction sets: the built-in feature set and loading user instructions.

The package ships 320 varied instructions written for this project (writing, coding, maths,
advice, facts, planning, everyday tasks, other), interleaved so that any contiguous slice is
varied. They form three named sets: ``"default"`` (the feature set: the first 256),
``"heldout"`` (the other 64, which the layer report reads as held-out stimuli) and ``"all"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import BadFileError, BadInputError, json_kind, read_text, reading

__all__ = ["load_instructions", "builtin_instructions", "BUILTIN_SETS"]

#: Names of the instruction sets shipped with the package.
BUILTIN_SETS = ("default", "heldout", "all")
_FILE = "feature_instructions.txt"
_N_FEATURE = 256  # size of the "default" feature set; the rest of the file is "heldout"


def builtin_instructions(name: str = "default") -> list[str]:
    """The instructions of a built-in set.

    Args:
        name: ``"default"`` (256 feature instructions), ``"heldout"`` (64 others) or ``"all"``.

    Examples:
        >>> len(builtin_instructions()), len(builtin_instructions("heldout"))
        (256, 64)
    """
    if name not in BUILTIN_SETS:
        raise ValueError(f"Unknown built-in instruction set {name!r}; available: {list(BUILTIN_SETS)}.")
    text = resources.files("icon2_lens").joinpath("data").joinpath(_FILE).read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return {"default": lines[:_N_FEATURE], "heldout": lines[_N_FEATURE:], "all": lines}[name]


_FILE_TODO = ("Write one instruction per line (.txt), or one JSON object with an 'instruction' field (or a JSON "
              "string) per line (.jsonl), in UTF-8.")


def _column_hint(column: str) -> str:
    return (f"Give each row an {column!r} field" + (" (or a plain JSON string)" if column == "instruction" else "")
            + "; from Python, load_instructions(..., column=NAME) reads another field.")


def _from_jsonl(path: Path, column: str) -> list[str]:
    out = []
    text = read_text(path, what="an instruction file (JSONL)", todo=_FILE_TODO)
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadFileError(path, f"line {i} is not valid JSON (column {exc.colno}: {exc.msg})",
                               "Each line must be one JSON object with an 'instruction' field, or a JSON string; "
                               "fix or delete that line.") from exc
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict) and column in row:
            value = row[column]
            if not isinstance(value, str):
                raise BadFileError(path, f"line {i}: the {column!r} field is {json_kind(value)}, not text",
                                   "Give each instruction as a JSON string.")
            out.append(value)
        elif isinstance(row, dict):
            raise BadFileError(path, f"line {i} has no {column!r} field (found {sorted(row)})", _column_hint(column))
        else:
            raise BadFileError(path, f"line {i} is {json_kind(row)}, not a JSON object with an {column!r} field "
                               "or a string", _column_hint(column))
    return out


def load_instructions(
    source: str | Path | Sequence[str] | Any = "default",
    *,
    column: str = "instruction",
    limit: int | None = None,
) -> list[str]:
    """Load instructions from a built-in set, a list, a TXT/JSONL file, or a ``datasets.Dataset``.

    Args:
        source: a built-in set (``"default"``: the 256-instruction feature set; ``"heldout"``;
            ``"all"``), a list of strings, a ``.txt`` file (one per
            line), a ``.jsonl`` file (objects with ``column``, or plain strings), a ``synthesize``
            output folder (its ``instructions.jsonl``), a folder holding a saved ``datasets``
            dataset, or a ``datasets.Dataset``.
        column: field to read from JSONL rows and datasets.
        limit: keep only the first ``limit`` instructions.

    Returns:
        The instructions, stripped, in order. Raises ``ValueError`` if none remain.

    Examples:
        >>> load_instructions(["Write a haiku.", "  Explain DNS. "])
        ['Write a haiku.', 'Explain DNS.']
    """
    items: Iterable[Any]
    where: str
    if isinstance(source, str) and source in BUILTIN_SETS:
        items, where = builtin_instructions(source), f"built-in set {source!r}"
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        where = str(path)
        if path.is_dir() and (path / "instructions.jsonl").is_file():  # a `synthesize` output folder
            where = str(path / "instructions.jsonl")
            items = _from_jsonl(path / "instructions.jsonl", column)
        elif path.is_dir() and (path / "synthesis.json").is_file() and (path / "shard.json").is_file():
            raise FileNotFoundError(
                f"{path} is one shard of a sharded synthesis run; clean-up and de-duplication need all shards: "
                "merge them first (icon2-lens merge synthesize --out DIR SHARD_DIR ...) and use the merged folder."
            )
        elif path.is_dir() and (path / "synthesis.json").is_file():
            raise FileNotFoundError(
                f"{path} is a synthesis run without instructions.jsonl yet (it was interrupted); rerun "
                "`icon2-lens synthesize` with the same settings and --out to finish it."
            )
        elif path.is_dir():
            from datasets import load_from_disk

            with reading(path, what="a saved datasets folder (or a synthesize output folder)",
                         todo="Pass a folder written by Dataset.save_to_disk or by `icon2-lens synthesize`, or a "
                              ".txt/.jsonl file."):
                ds = load_from_disk(str(path))
            items = _dataset_column(ds, column, where)
        elif not path.is_file():
            raise FileNotFoundError(
                f"Instruction source {source!r} is neither a file, a dataset folder nor a built-in set "
                f"({list(BUILTIN_SETS)}); pass a .txt or .jsonl file, a list, or a datasets.Dataset."
            )
        elif path.suffix == ".jsonl":
            items = _from_jsonl(path, column)
        elif path.suffix in (".txt", ""):
            items = read_text(path, what="an instruction file (text)", todo=_FILE_TODO).splitlines()
        else:
            raise BadFileError(path, f"unsupported file type {path.suffix!r}",
                               "Use .txt (one instruction per line) or .jsonl (one JSON object per line).")
    elif hasattr(source, "column_names"):
        where = "dataset"
        items = _dataset_column(source, column, where)
    else:
        where = "list"
        items = list(source)
        bad = [type(x).__name__ for x in items if not isinstance(x, str)]
        if bad:
            raise TypeError(f"Instructions must be strings; got {sorted(set(bad))}.")
    out = [str(x).strip() for x in items if str(x).strip()]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise BadInputError("The number of instructions to use (limit=; CLI: --n-instructions, or --n of "
                                f"evaluate) must be a positive whole number, got {limit!r}.", option="limit")
        out = out[:limit]
    if not out:
        if where in ("list", "dataset") or where.startswith("built-in"):
            raise BadInputError(f"No instructions found in the {where}; give at least one non-empty instruction.")
        raise BadFileError(where, "No instructions found in it (it is empty or blank)", _FILE_TODO)
    return out


def _dataset_column(ds: Any, column: str, where: str) -> list[str]:
    if column not in ds.column_names:
        problem = f"has no column {column!r} (columns: {ds.column_names})"
        todo = f"Give the dataset an {column!r} column; from Python, load_instructions(..., column=NAME) reads another."
        if where == "dataset":
            raise BadInputError(f"The {where} {problem}. {todo}", option="column")
        raise BadFileError(where, problem, todo)
    return [str(x) for x in ds[column]]
