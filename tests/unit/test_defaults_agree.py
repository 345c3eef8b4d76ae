"""One source of defaults: every stage's config dataclass gives the library function's keyword defaults, the
pipeline's run-config section and the CLI's options. The only differences are the demo sizes the pipeline
declares in its stage registry (`pipeline_defaults`), listed here so a new one cannot slip in unseen."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

import icon2_lens as il
from icon2_lens.pipeline.config import RunConfig, section_fields
from icon2_lens.pipeline.stages import STAGES

#: The library function of each stage whose keyword defaults must equal its config dataclass's.
FUNCTIONS = {
    "extract": il.extract_directions,
    "layers": il.layer_report,
    "synthesize": il.synthesize_instructions,
    "score": il.score_instructions,
    "evaluate": il.evaluate,
}
#: The pipeline's demo sizes (documented in docs/pipeline.md); nothing else may differ.
DEMO_SIZES = {"layers": {"n_heldout": 16, "n_paraphrase_instructions": 4}, "score": {"top_k": 24},
              "train": {"trim_unfinished": True},  # not a size: the demo's answers never finish (see stages.py)
              "compare": {"methods": []}}  # not a size: a run compares only when methods are listed


def _defaults(cls):
    out = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return out | {f.name: f.default_factory() for f in dataclasses.fields(cls)
                  if f.default_factory is not dataclasses.MISSING}


@pytest.mark.parametrize("stage", list(STAGES))
def test_pipeline_section_defaults_are_the_config_dataclass_defaults(stage):
    spec = STAGES[stage]
    section = getattr(RunConfig(), stage).model_dump()
    own = _defaults(spec.config)
    own.pop("seed", None)  # the run's seed is one setting for every stage
    differing = {k: section[k] for k in own if section[k] != own[k]}
    assert differing == DEMO_SIZES.get(stage, {})
    assert spec.pipeline_defaults == DEMO_SIZES.get(stage, {})
    assert set(section) == set(section_fields(spec))


@pytest.mark.parametrize("stage", list(FUNCTIONS))
def test_library_keyword_defaults_are_the_config_dataclass_defaults(stage):
    params = inspect.signature(FUNCTIONS[stage]).parameters
    own = _defaults(STAGES[stage].config)
    shared = [k for k in own if k in params]
    assert shared, f"{stage}: the function shares no setting with its config"
    assert {k: params[k].default for k in shared} == {k: own[k] for k in shared}


def test_generate_pairs_takes_its_config():
    params = inspect.signature(il.generate_pairs).parameters
    assert "config" in params and len(params) <= 11  # was 20 keyword parameters
    assert il.pairs.DEFAULT_DECODING == {k: getattr(il.PairsConfig, k) for k in il.pairs.DEFAULT_DECODING}


#: The smallest command line of each stage command (required inputs only).
MINIMAL = {
    "extract": ["--out", "o"],
    "layers": ["--directions", "d"],
    "synthesize": ["--n", "4", "--out", "o"],
    "score": ["--directions", "d", "--instructions", "i", "--out", "o"],
    "generate": ["--directions", "d", "--instructions", "i", "--out", "o"],
    "train": ["--pairs", "p", "--out", "o"],
    "controls": ["--pairs", "p", "--directions", "d", "--out", "o"],
    "evaluate": ["--trained", "t", "--directions", "d", "--out", "o"],
    "compare": ["--out", "o"],
    "distill": ["run", "--out", "o"],  # the sub-command whose options are the stage config's
}
#: Stage commands with sub-commands: the one whose options are the stage's config dataclass.
NESTED = {"distill": "run"}


def test_baseline_options_without_flags_give_each_method_config_defaults():
    from icon2_lens.baselines import METHODS
    from icon2_lens.cli import build_parser
    from icon2_lens.cli.commands import COMMANDS

    assert METHODS  # every registered method has a sub-command
    for name, spec in METHODS.items():
        args = build_parser().parse_args(["baseline", name, "--instructions", "i", "--out", "o"])
        assert COMMANDS["baseline"].build_config(args) == spec.config(), name


@pytest.mark.parametrize("stage", list(STAGES))
def test_cli_options_without_flags_give_the_config_dataclass_defaults(stage):
    from icon2_lens.cli import build_parser
    from icon2_lens.cli.commands import COMMANDS

    args = build_parser().parse_args([stage, *MINIMAL[stage]])
    assert COMMANDS[stage].build_config(args) == STAGES[stage].config()


def test_every_config_field_is_a_cli_option_and_the_help_shows_its_default():
    from icon2_lens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for stage, spec in STAGES.items():
        stage_parser = sub.choices[stage]
        if stage in NESTED:
            nested = next(a for a in stage_parser._actions if isinstance(a, argparse._SubParsersAction))
            stage_parser = nested.choices[NESTED[stage]]
        text = stage_parser.format_help()
        for f in dataclasses.fields(spec.config):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, (stage, flag)
            default = f.default if f.default is not dataclasses.MISSING else ", ".join(map(str, f.default_factory()))
            assert f"(default: {default})" in " ".join(text.split()), (stage, f.name)
