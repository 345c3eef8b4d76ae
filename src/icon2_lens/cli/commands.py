"""The ``icon2-lens`` subcommands (`COMMANDS`): what each reads, runs and writes.

The stage commands and the helpers every command shares are in `icon2_lens.cli.stage_commands`;
calibrate, run, merge, serve and export in `icon2_lens.cli.run_commands`; baseline and compare in
`icon2_lens.cli.method_commands`; distill in `icon2_lens.cli.distill_commands`. This module is the registry that
`icon2_lens.cli.build_parser` reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..controls import ControlsConfig
from ..directions import ExtractConfig
from ..evaluation import EvaluateConfig
from ..layers import LayersConfig
from ..pairs import PairsConfig
from ..pipeline.compare import CompareConfig
from ..scoring import ScoreConfig
from ..synthesis import SynthesisConfig
from ..training import TrainConfig
from . import distill_commands, method_commands, run_commands, stage_commands
from .options import config_from_args
from .stage_commands import add_model_args, load

__all__ = ["COMMANDS", "Command", "add_model_args", "load"]


class Command:
    """A subcommand: its inputs and outputs, the config dataclass its settings come from, and what it runs."""

    def __init__(self, add_args: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace, Any], list[Path]], *, config: type | None = None,
                 uses_model: bool = True, make_config: Callable[[argparse.Namespace], Any] | None = None,
                 skip: tuple[str, ...] = (), exclusive: tuple[tuple[str, ...], ...] = (), help: str = "") -> None:
        self.add_args, self.run, self.config, self.uses_model = add_args, run, config, uses_model
        self.make_config, self.skip, self.exclusive, self.help = make_config, skip, exclusive, help

    def build_config(self, args: argparse.Namespace) -> Any:
        """The command's config from the command line (over the dataclass's defaults)."""
        if self.make_config is not None:
            return self.make_config(args)
        return config_from_args(args, self.config) if self.config is not None else None


_RULES = (("top_fraction", "top_k", "threshold"),)

#: Every stage of the registry has a command here (a test checks it); plus calibrate, run, merge and serve.
COMMANDS: dict[str, Command] = {
    "extract": Command(stage_commands.extract_args, stage_commands.extract_command, config=ExtractConfig,
                       help="extract criterion direction vectors into a DirectionSet folder"),
    "layers": Command(stage_commands.layers_args, stage_commands.layers_command, config=LayersConfig,
                      help="per-layer separation report and suggested steering range"),
    "synthesize": Command(stage_commands.synthesize_args, stage_commands.synthesize_command, config=SynthesisConfig,
                          help="let the model write instructions (Magpie-style) and clean them up"),
    "score": Command(stage_commands.score_args, stage_commands.score_command, config=ScoreConfig, exclusive=_RULES,
                     help="score instructions' inherent consistency with each criterion and select the best"),
    "generate": Command(stage_commands.generate_args, stage_commands.generate_command, config=PairsConfig,
                        help="bidirectional steered generation into DPO preference pairs"),
    "calibrate": Command(run_commands.calibrate_args, run_commands.calibrate_command, config=PairsConfig,
                         skip=("gamma_pos", "gamma_neg", "do_sample", "temperature", "top_p", "engine", "batch_size"),
                         help="sweep gamma+ / gamma- and pick them by the paper's rule"),
    "train": Command(stage_commands.train_args, stage_commands.train_command, config=TrainConfig,
                     make_config=stage_commands.train_config,
                     help="DPO or SimPO on preference pairs with TRL; saves a model folder load_model opens"),
    "controls": Command(stage_commands.controls_args, stage_commands.controls_command, config=ControlsConfig,
                        help="train control models beside real pairs: swapped pairs, random-direction pairs"),
    "evaluate": Command(stage_commands.evaluate_args, stage_commands.evaluate_command, config=EvaluateConfig,
                        help="base vs trained (and controls) on held-out preference pairs, judge-free; answers, "
                             "judge and self-probe on held-out instructions"),
    "compare": Command(method_commands.compare_args, method_commands.compare_command, config=CompareConfig,
                       help="Icon2 and the competing methods on one instruction pool: pairs, costs, one trained "
                            "model each, held-out quality with intervals and controls, report.md"),
    "baseline": Command(method_commands.baseline_args, method_commands.baseline_command, uses_model=False,
                        make_config=method_commands.baseline_config,
                        help="pairs from a competing method (system_prompts, sampling_ranking, ...) on the same "
                             "seam, batch runner and cost accounting as Icon2"),
    "distill": Command(distill_commands.distill_args, distill_commands.distill_command, uses_model=False,
                       make_config=distill_commands.distill_config,
                       help="Mind's Mirror: teacher rationales and self-evaluations (data), a student (train), or "
                            "everything with three students and their test accuracy (run)"),
    "run": Command(run_commands.run_args, run_commands.run_command, uses_model=False,
                   help="the whole method, resumable: extract, layers, synthesize, score, generate, train, controls, "
                        "evaluate "
                        "(default: the demo size on the embedded model)"),
    "merge": Command(run_commands.merge_args, run_commands.merge_command, config=ScoreConfig, uses_model=False,
                     exclusive=_RULES,
                     skip=("layers", "standardize", "render", "batch_size", "min_separation", "allow_invalid"),
                     help="merge the shard folders of a sharded synthesize/score/generate run (--shard i/n)"),
    "export": Command(run_commands.export_args, run_commands.export_command, uses_model=False,
                      help="write a criterion's steering vectors as a llama.cpp control-vector GGUF and print the "
                           "llama.cpp command line"),
    "serve": Command(run_commands.serve_args, run_commands.serve_command,
                     help="an OpenAI-compatible chat-completions server for the model (GET /v1/models, POST "
                          "/v1/chat/completions), e.g. a judge endpoint for ChatEndpointJudge"),
}
