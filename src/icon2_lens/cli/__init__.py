"""The ``icon2-lens`` command line: one subcommand per registered stage, plus calibrate, run and merge.

    icon2-lens extract --out runs/directions --stability   # embedded model, default criteria, built-in feature set
    icon2-lens layers --directions runs/directions
    icon2-lens run                                          # the whole method, resumable

Each stage command's settings are options generated from the stage's config dataclass (the one source of
defaults, shared with the library and the pipeline); see `icon2_lens.cli.options`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..pipeline.stages import STAGES
from .commands import COMMANDS, add_model_args
from .options import add_config_options

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``icon2-lens`` (exposed for docs and tests).

    Examples:
        >>> build_parser().parse_args(["generate", "--directions", "d", "--instructions", "i", "--out", "o"]).gamma_pos
    """
    parser = argparse.ArgumentParser(
        prog="icon2-lens",
        description="Preference data from a model's own residual stream (Icon2) on TransformerLens hook points.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    missing = [s for s in STAGES if s not in COMMANDS]
    if missing:  # pragma: no cover - a registered stage without a command is a programming error
        raise RuntimeError(f"Stages {missing} have no command in icon2_lens.cli.commands.COMMANDS.")
    order = [*STAGES, *(c for c in COMMANDS if c not in STAGES)]
    for name in order:
        cmd = COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help or (STAGES[name].help if name in STAGES else None))
        if cmd.uses_model:
            add_model_args(p)
        cmd.add_args(p)
        if cmd.config is not None:
            add_config_options(p, cmd.config, skip=cmd.skip, exclusive=cmd.exclusive)
        if name == "calibrate":
            import inspect

            from ..calibration import calibrate_gamma

            default = inspect.signature(calibrate_gamma).parameters["batch_size"].default
            p.add_argument("--batch-size", type=int, default=default,
                           help=f"rows per generation batch (default {default})")
        p.set_defaults(command_obj=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icon2-lens``. Returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    cmd = args.command_obj
    try:
        written = cmd.run(args, cmd.build_config(args))
    except (ValueError, OSError, KeyError, TypeError) as exc:  # OSError: missing files, bad model folders
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"icon2-lens {args.command}: error: {msg}", file=sys.stderr)
        return 2
    if written:
        print("\nwrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
