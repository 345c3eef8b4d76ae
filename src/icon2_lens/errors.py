"""The one error type of bad input, and readers that name the file they could not read.

Every problem a user can fix (a bad option value, a file that does not parse, a model folder that is not a
model) is raised as `BadInputError` (a ``ValueError``) with a one-line message that says what was wrong and
what to do; a file's problems as `BadFileError`, which also names the file. The command line turns these into
``icon2-lens CMD: error: ...`` and exit code 2, without a traceback (``--debug`` shows it).

This module is standard-library only and sits below every other module, so each reader can use it.

Examples:
    >>> from icon2_lens.errors import BadFileError, read_json
    >>> try:
    ...     read_json("nope.json", what="a run manifest")
    ... except BadFileError as e:
    ...     print(e.path)
    nope.json
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Icon2Error", "BadInputError", "BadFileError", "MissingFileError", "reading", "read_text", "read_json",
           "read_yaml", "json_kind", "check_finite", "public_path"]

T = TypeVar("T")


class Icon2Error(Exception):
    """The base of this library's own errors."""


class BadInputError(Icon2Error, ValueError):
    """Input the user can fix: an option value, a config value, a file's content. The message says what to do.

    Attributes:
        option: the option or setting that was wrong (``"gamma_pos"``), when one was.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class BadFileError(BadInputError):
    """A file (or model folder) that is missing, unreadable, corrupt or of the wrong kind.

    Attributes:
        path: the file the user gave.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, todo: str = "") -> None:
        self.path = str(path)
        self.problem, self.todo = problem.rstrip(". "), todo.strip()
        super().__init__(f"{self.path}: {self.problem}." + (f" {self.todo}" if self.todo else ""))


class MissingFileError(BadFileError, FileNotFoundError):
    """A file the user named that does not exist (also a ``FileNotFoundError``, as callers may expect)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, todo: str = "") -> None:
        BadFileError.__init__(self, path, problem, todo)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def public_path(text: str) -> str:
    """``text`` with this library's temp names (``.x.abc123.tmp``, ``.x.abc123.old``) put back to the real name.

    Examples:
        >>> public_path("/runs/.icon2_out.zkxa99lx.tmp/x and '.c60.w7pasd50.old/y'")
        "/runs/icon2_out/x and 'c60/y'"
    """
    import re

    return re.sub(r"\.([^/\s'\"]+?)\.[a-z0-9_]{6,12}\.(?:tmp|old)", r"\1", text)


@contextmanager
def reading(path: str | os.PathLike[str], *, what: str, todo: str = "") -> Iterator[None]:
    """Turn any error raised while reading ``path`` into a `BadFileError` naming it (interrupts pass through).

    ``what`` says what the file should be ("a DirectionSet", "a criteria YAML"); ``todo`` what to do about it.

    Examples:
        >>> with reading("d/directions.safetensors", what="a DirectionSet's tensors"):  # doctest: +SKIP
        ...     tensors = load_file("d/directions.safetensors")
    """
    try:
        yield
    except BadInputError:
        raise
    except FileNotFoundError as exc:
        raise MissingFileError(path, f"{what} was expected here, and there is no such file", todo) from exc
    except IsADirectoryError as exc:
        raise BadFileError(path, f"is a folder, not {what}", todo) from exc
    except PermissionError as exc:
        raise BadFileError(path, f"cannot be read ({exc.strerror or 'permission denied'})",
                           todo or "Check its permissions.") from exc
    except UnicodeDecodeError as exc:
        raise BadFileError(path, f"is not UTF-8 text ({what} was expected)", todo) from exc
    except Exception as exc:  # any parse or integrity error of a user's file
        kind = type(exc).__name__
        if kind.islower():  # struct.error, zlib.error: say whose
            kind = f"{type(exc).__module__}.{kind}"
        raise BadFileError(path, f"is not readable as {what} ({kind}: {public_path(_one_line(exc))})", todo) from exc


def _read(path: str | os.PathLike[str], parse: Callable[[str], T], *, what: str, todo: str) -> T:
    with reading(path, what=what, todo=todo):
        return parse(Path(path).read_text(encoding="utf-8"))


def read_text(path: str | os.PathLike[str], *, what: str, todo: str = "") -> str:
    """A UTF-8 text file; any problem is a `BadFileError` naming ``path``."""
    return _read(path, lambda s: s, what=what, todo=todo)


def read_json(path: str | os.PathLike[str], *, what: str, todo: str = "") -> Any:
    """A JSON file; a missing, torn or non-UTF-8 file is a `BadFileError` naming ``path``."""
    return _read(path, json.loads, what=what, todo=todo)


def read_yaml(path: str | os.PathLike[str], *, what: str, todo: str = "") -> Any:
    """A YAML file (``yaml.safe_load``); a parse error is a `BadFileError` naming ``path``, the line and column."""
    import yaml

    text = read_text(path, what=what, todo=todo)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1}: {getattr(exc, 'problem', '')})" if mark else ""
        raise BadFileError(path, f"is not valid YAML{at}", todo) from exc


def json_kind(value: object) -> str:
    """A JSON value's kind in words, for messages about a file's content.

    Examples:
        >>> json_kind(3), json_kind([1]), json_kind(None)
        ('a number', 'a list', 'null')
    """
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object", str: "a string", type(None): "null"}.get(type(value),
                                                                                        type(value).__name__)


def check_finite(value: float | None, option: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """Refuse NaN, infinity and values outside ``[low, high]`` (``(low, high]`` with ``low_open``).

    Examples:
        >>> check_finite(0.5, "threshold", low=0.0, high=1.0)
        >>> check_finite(float("nan"), "threshold")
        Traceback (most recent call last):
        ...
        icon2_lens.errors.BadInputError: threshold=nan is not a finite number; give a number.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{option}={value!r} is not a number; give a number.", option=option)
    if not math.isfinite(value):
        raise BadInputError(f"{option}={value!r} is not a finite number; give a number.", option=option)
    if low is not None and (value <= low if low_open else value < low):
        raise BadInputError(f"{option}={value!r} is out of range; it must be {'>' if low_open else '>='} {low}.",
                            option=option)
    if high is not None and value > high:
        raise BadInputError(f"{option}={value!r} is out of range; it must be <= {high}.", option=option)
