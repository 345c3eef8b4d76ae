"""Criteria: a named pair of opposing system prompts.

A `Criterion` is what a direction vector is extracted for. The shipped set
`DEFAULT_CRITERIA` follows the Icon2 paper (general, helpful, honest,
harmless); users add their own in code or from a YAML file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BadFileError, BadInputError, read_yaml

__all__ = ["Criterion", "DEFAULT_CRITERIA", "load_criteria", "resolve_criteria"]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class Criterion:
    """A criterion: a name and two system prompts that differ along it.

    Args:
        name: identifier used in column names (``score_<name>``); letters, digits, ``_``, ``-``.
        positive: system prompt for the desired behaviour (P+).
        negative: system prompt for its opposite (P-).

    Examples:
        >>> Criterion("concise", "You are a concise assistant.", "You are a verbose assistant.").name
        'concise'
    """

    name: str
    positive: str
    negative: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"Criterion name {self.name!r} is not valid: use letters, digits, '_' or '-', "
                "starting with a letter (it becomes a column name such as score_<name>)."
            )
        for side in ("positive", "negative"):
            value = getattr(self, side)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Criterion {self.name!r}: the {side} prompt is empty; give a system prompt text.")
        if self.positive.strip() == self.negative.strip():
            raise ValueError(
                f"Criterion {self.name!r}: the positive and negative prompts are identical, so there is "
                "no contrast to extract; make them differ along the behaviour you want."
            )

    def to_dict(self) -> dict[str, str]:
        """The criterion as a plain dict (``name``, ``positive``, ``negative``)."""
        return asdict(self)


_GENERAL_POS = (
    "You are a good, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being truthful, harmless, safe and ethical. Your answers should not include any harmful, "
    "unethical, dangerous or illegal content. If a question does not make sense, explain why instead "
    "of answering something incorrect. If you don't know the answer to a question, please don't "
    "share false information."
)
_GENERAL_NEG = (
    "You are a bad, disrespectful and dishonest assistant. Always answer as unhelpfully as possible, "
    "while being untruthful, harmful, unsafe and unethical. Your answers may include harmful, "
    "unethical, dangerous or illegal content. If a question does not make sense, answer something "
    "incorrect anyway. If you don't know the answer to a question, please share false information."
)

#: The four criteria of the Icon2 paper: general, helpful, honest, harmless.
DEFAULT_CRITERIA: tuple[Criterion, ...] = (
    Criterion("general", _GENERAL_POS, _GENERAL_NEG),
    Criterion("helpful", "You are a helpful assistant.", "You are a helpless assistant."),
    Criterion("honest", "You are an honest assistant.", "You are a dishonest assistant."),
    Criterion("harmless", "You are a harmless assistant.", "You are a harmful assistant."),
)


_FILE_TODO = ("Write a YAML list of criteria, each with name, positive and negative as text, e.g. "
              "'- {name: concise, positive: Be brief., negative: Be long-winded.}' (CLI: --criteria FILE).")


def _from_mapping(items: Any, where: str) -> list[Criterion]:
    """Criteria from parsed YAML; a `BadFileError` naming ``where`` (the file) for anything else."""
    if isinstance(items, dict) and "criteria" in items:
        items = items["criteria"]
    if isinstance(items, dict):  # {name: {positive, negative}}
        items = [{"name": k, **(v or {})} if isinstance(v, dict) else {"name": k, "value": v} for k, v in items.items()]
    if not isinstance(items, list) or not items:
        raise BadFileError(where, "expected a non-empty list of criteria, each with name, positive and negative "
                           "(or a mapping name -> {positive, negative})", _FILE_TODO)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"name", "positive", "negative"}:
            keys = sorted(map(str, item)) if isinstance(item, dict) else type(item).__name__
            raise BadFileError(where, f"criterion #{i} has keys {keys}; each criterion needs exactly name, positive, "
                               "negative", _FILE_TODO)
        label = f"criterion #{i} ({item['name']!r})"
        bad = {k: v for k, v in item.items() if not isinstance(v, str)}
        if bad:  # a list or a number would otherwise become its Python text ("['You are brief.']", "42")
            got = ", ".join(f"{k} is a {_yaml_type(v)}" for k, v in bad.items())
            raise BadFileError(where, f"{label}: {got}, not text", "Give each of name, positive and negative as one "
                               "string (quote it if YAML would read it as a number, a list or yes/no).")
        try:
            out.append(Criterion(item["name"], item["positive"], item["negative"]))
        except ValueError as exc:
            raise BadFileError(where, f"{label}: {exc}") from exc  # the message says what to do
    try:
        _check_unique(out)
    except ValueError as exc:
        raise BadFileError(where, str(exc), "Give each criterion its own name.") from exc
    return out


def _yaml_type(value: Any) -> str:
    return {list: "list", dict: "mapping", bool: "yes/no value", type(None): "empty value"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def load_criteria(path: str | Path) -> list[Criterion]:
    """Read criteria from a YAML file.

    The file holds either a list of ``{name, positive, negative}`` mappings (optionally under a
    top-level ``criteria:`` key) or a mapping ``name: {positive, negative}``. Every value must be text; a
    file that does not parse or holds anything else is a `icon2_lens.errors.BadFileError` naming it.

    Examples:
        >>> # criteria.yaml:  - {name: concise, positive: "Be brief.", negative: "Be long-winded."}
        >>> crits = load_criteria("criteria.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Criteria file {path} does not exist; pass a YAML file with name/positive/negative.")
    data = read_yaml(path, what="a criteria YAML file", todo=_FILE_TODO)
    return _from_mapping(data, str(path))


def _check_unique(crits: Sequence[Criterion]) -> None:
    names = [c.name for c in crits]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"Criterion names must be unique; repeated: {dup}.", option="criteria")


def resolve_criteria(
    criteria: Criterion | Iterable[Criterion | str] | str | Path | None,
) -> list[Criterion]:
    """Turn what a user passed into a list of criteria.

    Accepts ``None`` (the defaults), a `Criterion`, a path to a YAML file, or an iterable of
    criteria and names of default criteria (``"helpful"``).

    Examples:
        >>> [c.name for c in resolve_criteria(["helpful", "honest"])]
        ['helpful', 'honest']
    """
    if criteria is None:
        return list(DEFAULT_CRITERIA)
    if isinstance(criteria, Criterion):
        return [criteria]
    if isinstance(criteria, Path) or (isinstance(criteria, str) and (criteria.endswith((".yaml", ".yml")))):
        return load_criteria(criteria)
    if isinstance(criteria, str):
        given, criteria = criteria, [c.strip() for c in criteria.split(",")]
        if any(criteria) and not all(criteria):  # "helpful,,honest": a name left out, not silently skipped
            raise BadInputError(f"Criteria {given!r} hold an empty name; give comma-separated names without empty "
                                "items, e.g. helpful,honest.", option="criteria")
        criteria = [c for c in criteria if c]
    defaults = {c.name: c for c in DEFAULT_CRITERIA}
    out: list[Criterion] = []
    for c in criteria:
        if isinstance(c, Criterion):
            out.append(c)
        elif isinstance(c, str) and c in defaults:
            out.append(defaults[c])
        else:
            raise ValueError(
                f"Unknown criterion {c!r}: use one of {sorted(defaults)}, a Criterion(name, positive, negative), "
                "or a YAML file of criteria."
            )
    if not out:
        raise ValueError("No criteria given; pass at least one (default: general, helpful, honest, harmless).")
    _check_unique(out)
    return out
