"""Command-line options generated from config dataclasses (so the CLI's defaults are the library's).

Every field of a stage's config dataclass becomes ``--field-name``: booleans as ``--x/--no-x``, ``Literal``
options as choices, ``X | None`` as an optional ``X``, layer choices parsed from ``all``, ``suggested``,
``10-19`` or ``3,5,7``. An option not given stays ``None`` and the dataclass's default applies, so one
default serves Python, CLI and pipeline; ``--help`` shows it. Help texts come from the dataclass's
``Attributes:`` docstring section.

The values are checked by the dataclass itself (its ``__post_init__``: ranges, NaN and infinity, one setting
against another), so Python and the command line refuse the same values; `config_from_args` turns such an
error into a `icon2_lens.errors.BadInputError` that speaks in option names (``--gamma-pos``, not
``gamma_pos``), before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import BadInputError

__all__ = ["add_config_options", "config_from_args", "given_options", "parse_layers", "cli_message"]


def parse_layers(text: str) -> str | list[int]:
    """``"all"``, ``"suggested"``, a range ``"10-19"`` or a list ``"3,5,7"``.

    Examples:
        >>> parse_layers("10-12"), parse_layers("3,5"), parse_layers("all")
        ([10, 11, 12], [3, 5], 'all')
    """
    if text in ("all", "suggested"):
        return text
    try:
        if "-" in text.strip("-") and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: use 'all', 'suggested', a range like '10-19' or a list like '3,5,7'."
                         ) from None


class _LayersText(str):
    """A ``--layers`` value, parsed by `given_options` (so a bad value is a clear error, exit code 2)."""


def _field_help(cls: type) -> dict[str, str]:
    """Each field's help from the ``Attributes:`` docstrings of ``cls`` and its bases (the class's own first)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(_own_field_help(klass))
    return out


def _own_field_help(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    if "Attributes:" not in doc:
        return out
    doc = inspect.cleandoc(doc)
    current = None
    for line in doc.split("Attributes:", 1)[1].splitlines():
        m = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if m and not line.startswith(" " * 12):
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip() and current:
            current = None
    return out


def _options(hint: Any) -> tuple[Any, list[Any] | None, bool]:
    """(argparse type, choices, is_bool) for a field's type."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        return None, None, True
    if origin is Literal:
        return type(args[0]), list(args), False
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        literals = [a for a in members if typing.get_origin(a) is Literal]
        lists = [a for a in members if typing.get_origin(a) is list]
        if literals and lists and typing.get_args(lists[0]) == (int,):
            return _LayersText, None, False
        if len(members) == 1:
            return _options(members[0])
        return str, None, False
    if origin is list and args and typing.get_origin(args[0]) is Literal:
        return _comma_list(list(typing.get_args(args[0]))), None, False
    if hint in (int, float, str):
        return hint, None, False
    return str, None, False


def _comma_list(choices: list[Any]) -> Any:
    """An argparse type: a comma-separated list of ``choices`` (empty text: an empty list)."""
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; give a comma-separated list of "
                                             f"{', '.join(map(str, choices))} (or '' for none)")
        return items
    parse.__name__ = "comma-separated list"
    return parse


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                       exclusive: Sequence[Sequence[str]] = ()) -> list[str]:
    """Add ``--field-name`` for every field of the config dataclass ``cls``; return the field names added.

    Args:
        parser: the subcommand's parser.
        cls: a config dataclass (e.g. `icon2_lens.pairs.PairsConfig`).
        skip: fields that get no option (or have a hand-written one).
        exclusive: groups of fields that are mutually exclusive on the command line.

    Examples:
        >>> p = argparse.ArgumentParser(); add_config_options(p, PairsConfig)  # doctest: +SKIP
    """
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    groups = {name: parser.add_mutually_exclusive_group() for grp in exclusive for name in grp[:1]}
    group_of = {name: groups[grp[0]] for grp in exclusive for name in grp}
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, choices, is_bool = _options(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            ", ".join(map(str, f.default_factory())) if f.default_factory is not dataclasses.MISSING else None)
        text = f"{helps.get(f.name, '')} (default: {default})".strip().replace("%", "%%")
        target = group_of.get(f.name, parser)
        flag = "--" + f.name.replace("_", "-")
        if is_bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            target.add_argument(flag, dest=f.name, type=typ, choices=choices, default=None, help=text)
        added.append(f.name)
    return added


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (not ``None``)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = parse_layers(value) if isinstance(value, _LayersText) else value
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_message(text: str, names: Sequence[str], option: str | None = None) -> str:
    """A library message about the settings ``names`` reworded with their command-line spelling.

    ``name=True`` / ``name=False`` become ``--name`` / ``--no-name``, ``name=value`` ``--name value``, a
    snake_case name (or ``option``, or the name the message starts with) ``--name``; ``(CLI: ...)`` hints are
    dropped (the message is the CLI's now). If ``option`` is still not named, the message is prefixed with it.

    Examples:
        >>> cli_message("gamma_neg must be below gamma_pos (got gamma_pos=0.1, gamma_neg=0.2).",
        ...             ["gamma_pos", "gamma_neg"], "gamma_neg")
        '--gamma-neg must be below --gamma-pos (got --gamma-pos 0.1, --gamma-neg 0.2).'
        >>> cli_message("threshold=nan is not a finite number; give a number.", ["threshold"], "threshold")
        '--threshold nan is not a finite number; give a number.'
    """
    names = sorted(set(names), key=len, reverse=True)  # longest first: top_k before top
    if not names:
        return text
    alt = "|".join(map(re.escape, names))
    text = re.sub(r"\s*\(CLI: [^)]*\)", "", text)
    text = re.sub(rf"(?<![-\w])({alt})=(True|False)\b",
                  lambda m: _flag(m[1]) if m[2] == "True" else "--no-" + m[1].replace("_", "-"), text)
    text = re.sub(rf"(?<![-\w])({alt})=", lambda m: _flag(m[1]) + " ", text)
    bare = [n for n in names if "_" in n or n == option]
    if bare:
        text = re.sub(rf"(?<![-\w])({'|'.join(map(re.escape, bare))})\b(?!-)", lambda m: _flag(m[1]), text)
    first = re.match(rf"({alt})\b", text)
    if first:
        text = _flag(first[1]) + text[len(first[1]):]
    if option is not None and option in names and _flag(option) not in text:
        text = f"{_flag(option)}: {text}"
    return text


def config_from_args(args: argparse.Namespace, cls: type, base: dict[str, Any] | None = None) -> Any:
    """``cls(**base, **given)``: options given on the command line over ``base`` over the dataclass defaults.

    The dataclass checks the values; its error comes back as a `icon2_lens.errors.BadInputError` in the
    command line's words (`cli_message`: ``--threshold nan is not a finite number``), raised before any
    model loads.
    """
    try:
        return cls(**{**(base or {}), **given_options(args, cls)})
    except ValueError as exc:
        names = [f.name for f in dataclasses.fields(cls)]
        option = getattr(exc, "option", None)
        raise BadInputError(cli_message(str(exc), names, option), option=option) from exc
