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

import yaml

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


def _from_mapping(items: Any, where: str) -> list[Criterion]:
    if isinstance(items, dict) and "criteria" in items:
        items = items["criteria"]
    if isinstance(items, dict):  # {name: {positive, negative}}
        items = [{"name": k, **(v or {})} if isinstance(v, dict) else {"name": k, "value": v} for k, v in items.items()]
    if not isinstance(items, list) or not items:
        raise ValueError(
            f"{where}: expected a non-empty list of criteria, each with name, positive and negative "
            "(or a mapping name -> {positive, negative})."
        )
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"name", "positive", "negative"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(
                f"{where}: criterion #{i} has keys {keys}; each criterion needs exactly name, positive, negative."
            )
        out.append(Criterion(str(item["name"]), str(item["positive"]), str(item["negative"])))
    return out


def load_criteria(path: str | Path) -> list[Criterion]:
    """Read criteria from a YAML file.

    The file holds either a list of ``{name, positive, negative}`` mappings (optionally under a
    top-level ``criteria:`` key) or a mapping ``name: {positive, negative}``.

    Examples:
        >>> # criteria.yaml:  - {name: concise, positive: "Be brief.", negative: "Be long-winded."}
        >>> crits = load_criteria("criteria.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Criteria file {path} does not exist; pass a YAML file with name/positive/negative.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"Criteria file {path} is not valid YAML: {exc}") from exc
    crits = _from_mapping(data, str(path))
    _check_unique(crits)
    return crits


def _check_unique(crits: Sequence[Criterion]) -> None:
    names = [c.name for c in crits]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Criterion names must be unique; repeated: {dup}.")


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
        criteria = [c.strip() for c in criteria.split(",") if c.strip()]
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
