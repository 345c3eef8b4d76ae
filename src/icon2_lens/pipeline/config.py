"""The run config, built from the stage registry: each section is its stage's config dataclass.

A section's fields and defaults are those of the library's config dataclass (`icon2_lens.pairs.PairsConfig`,
...), plus the stage's pipeline-only fields (what to read, demo sizes). Validation is strict: an unknown
key or a value of the wrong type is an error naming the key; a dataclass's own checks (e.g. gamma- below
gamma+, finite numbers in range, the pipeline-only fields' checks) and the device (`icon2_lens.hardware.resolve_device`:
an unknown one, or CUDA where there is none) run when the config is loaded, not when a stage starts. Every such
error is a `icon2_lens.errors.BadInputError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator, model_validator

from ..errors import BadFileError, BadInputError, reading
from ..hardware import resolve_device
from .stages import STAGES, StageSpec

__all__ = ["RunConfig", "load_config", "run_config_model", "section_fields", "stage_config"]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
#: Settings the run gives every stage (so no section repeats them).
RUN_LEVEL = ("seed",)


def section_fields(spec: StageSpec) -> dict[str, tuple[Any, Any]]:
    """``name -> (type, default)`` of a stage's section: its config dataclass, its pipeline-only fields, and
    the pipeline's own defaults (``spec.pipeline_defaults``) on top."""
    out: dict[str, tuple[Any, Any]] = {}
    for cls in (spec.config, spec.extra):
        if cls is None:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in RUN_LEVEL:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise TypeError(f"{cls.__name__}.{f.name} has no default; every stage config field needs one.")
            out[f.name] = (hints[f.name], default)
    for key, value in spec.pipeline_defaults.items():
        out[key] = (out[key][0], value)
    return out


def _section_model(spec: StageSpec) -> type[BaseModel]:
    def check(self: BaseModel) -> BaseModel:
        stage_config(spec, self)  # the dataclass's own checks, as a config error
        if spec.extra is not None:  # and those of the pipeline-only fields
            values = self.model_dump()
            spec.extra(**{f.name: values[f.name] for f in dataclasses.fields(spec.extra) if f.name in values})
        return self

    validators: dict[str, Any] = {"_dataclass_checks": model_validator(mode="after")(check)}
    if spec.prepare is not None:
        prepare = spec.prepare

        def before(cls: type[BaseModel], data: Any) -> Any:  # a classmethod (pydantic wraps it: first arg `cls`)
            return prepare(data)

        validators["_prepare"] = model_validator(mode="before")(before)
    # pydantic's create_model overloads cannot take the fields as **dict (mypy checks the dict's values
    # against __base__, __module__, ...), hence the ignore here and in run_config_model.
    return create_model(  # type: ignore[call-overload]
        f"{spec.name.title()}Section", __config__=_STRICT, __validators__=validators,
        __doc__=spec.help, **section_fields(spec))


def stage_config(spec: StageSpec, section: Any) -> Any:
    """The stage's config dataclass from its validated section (pipeline-only fields left out)."""
    names = {f.name for f in dataclasses.fields(spec.config)} - set(RUN_LEVEL)
    values = section.model_dump() if isinstance(section, BaseModel) else dict(section)
    return spec.config(**{k: v for k, v in values.items() if k in names})


class _RunBase(BaseModel):
    model_config = _STRICT

    @field_validator("device", check_fields=False)
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        resolve_device(value)  # an unknown device or CUDA where there is none: an error at load time
        return value

    if TYPE_CHECKING:  # what run_config_model adds, for the type checker only (pydantic never sees these)
        model: str | None
        dtype: Literal["float32", "bfloat16", "float16"]
        device: str | None
        seed: int

        def __init__(self, **data: Any) -> None: ...  # every field has a default

        def __getattr__(self, name: str) -> Any: ...  # one section per registered stage

    def to_dict(self) -> dict[str, Any]:
        """The full config with every default filled in (what ``config.yaml`` holds)."""
        return self.model_dump(mode="json")


def run_config_model(stages: Mapping[str, StageSpec]) -> type[_RunBase]:
    """The run-config model of a stage registry: model settings plus one section per stage.

    Examples:
        >>> cfg = run_config_model(STAGES)()  # the defaults: what `RunConfig()` gives
    """
    sections = {s.name: (m, m()) for s, m in ((s, _section_model(s)) for s in stages.values())}
    return create_model(  # type: ignore[call-overload]
        "RunConfig", __base__=_RunBase,
        model=(str | None, None), dtype=(Literal["float32", "bfloat16", "float16"], "float32"),
        device=(str | None, None), seed=(int, 0), **sections)


#: A whole run: model settings and one section per registered stage (`icon2_lens.pipeline.stages.STAGES`).
#: Unknown keys and wrong types are errors naming the key. Every field has a default: the demo size, which
#: runs on the embedded model in minutes on a 2-core CPU. ``model``: what `icon2_lens.load_model` accepts
#: (``null``: the embedded model). Example: ``RunConfig.model_validate({"synthesize": {"n": 32}}).synthesize.n``.
if TYPE_CHECKING:
    RunConfig = _RunBase  # the type checker's view of the model built below
else:
    RunConfig = run_config_model(STAGES)


def _validation_message(exc: ValidationError, where: str) -> tuple[str, str | None]:
    lines, keys = [], []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        option = getattr(err.get("ctx", {}).get("error"), "option", None)
        if option is not None and err["loc"] and option != err["loc"][-1]:
            key = f"{key}.{option}"  # a dataclass check names the field: generate.gamma_neg
        keys.append(key)
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif err["type"] == "value_error":
            msg = re.sub(r"\s*\(CLI: [^)]*\)", "", str(err["msg"]).removeprefix("Value error, "))  # a config key
            lines.append(f"{key}: {msg.rstrip('.')}")
        else:
            got = err.get("input")
            lines.append(f"{key}: {err['msg'].rstrip('.')} (got {got!r})")
    return (f"Invalid config {where}: " + "; ".join(lines) + ". See `icon2-lens run --help` and docs/pipeline.md.",
            keys[0] if keys else None)


def load_config(source: str | os.PathLike[str] | dict[str, Any] | _RunBase | None = None, *,
                stages: Mapping[str, StageSpec] | None = None) -> _RunBase:
    """Read and validate a run config: a YAML file, a dict, a run config, or ``None`` for the defaults.

    Args:
        source: the config.
        stages: a stage registry other than `icon2_lens.pipeline.stages.STAGES` (e.g. with a new method).

    Raises:
        BadInputError: an unknown key, a value of the wrong type or out of range, an unknown device, naming the key
            (``option``: the first one, dotted: ``"generate.gamma_neg"``); a file that does not parse is a
            `icon2_lens.errors.BadFileError` naming it.
        FileNotFoundError: ``source`` is a path to no file.

    Examples:
        >>> load_config({"generate": {"gamma_pos": 0.05}}).generate.gamma_pos
        0.05
    """
    model = RunConfig if stages is None or stages is STAGES else run_config_model(stages)
    if source is None:
        return model()
    if isinstance(source, model):
        return source
    where = "(dict)"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        where = str(path)
        todo = "Fix it; `icon2-lens run --print-config` prints a valid one."
        with reading(path, what="a run config (YAML)", todo=todo):
            text = path.read_text(encoding="utf-8")
        try:
            source = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise BadFileError(path, f"is not valid YAML ({' '.join(str(exc).split())})", todo) from None
    if not isinstance(source, dict):
        raise BadInputError(f"Invalid config {where}: expected a mapping of sections, got {type(source).__name__}.")
    try:
        return model.model_validate(source)
    except ValidationError as exc:
        message, key = _validation_message(exc, where)
        raise BadInputError(message, option=key) from None
