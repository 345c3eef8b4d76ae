"""The ``icon2-lens`` command line: one subcommand per registered stage, plus calibrate, run and merge.

    icon2-lens extract --out runs/directions --stability   # embedded model, default criteria, built-in feature set
    icon2-lens layers --directions runs/directions
    icon2-lens run                                          # the whole method, resumable

Each stage command's settings are options generated from the stage's config dataclass (the one source of
defaults, shared with the library and the pipeline); see `icon2_lens.cli.options`.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import public_path
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
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    missing = [s for s in STAGES if s not in COMMANDS]
    if missing:  # pragma: no cover - a registered stage without a command is a programming error
        raise RuntimeError(f"Stages {missing} have no command in icon2_lens.cli.commands.COMMANDS.")
    order = [*STAGES, *(c for c in COMMANDS if c not in STAGES)]
    for name in order:
        cmd = COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help or (STAGES[name].help if name in STAGES else None))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback")
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


#: Errors a user can fix (bad options, missing or corrupt files): exit code 2 with the message.
_USER_ERRORS = (ValueError, OSError, KeyError, TypeError)
#: What to do when the OS refuses a write: a full disk, a read-only folder (the message names the file).
_OS_TODO = {errno.ENOSPC: "free disk space or choose another --out folder, then rerun the same command",
            errno.EDQUOT: "free disk space or choose another --out folder, then rerun the same command",
            errno.EROFS: "the folder is read-only: choose a writable --out folder",
            errno.EACCES: "check its permissions, or choose another --out folder",
            errno.EPERM: "check its permissions, or choose another --out folder"}


def _rows_kept(out: object) -> int:
    """Complete rows in the JSONL files under a command's output folder (what an interrupted run keeps)."""
    if not isinstance(out, Path) or not out.is_dir():
        return 0
    n = 0
    for f in out.rglob("*.jsonl"):
        if not any(part.startswith(".") for part in f.relative_to(out).parts):
            with f.open("rb") as fh:
                n += sum(1 for line in fh if line.endswith(b"\n"))
    return n


def _quiet_libraries() -> None:
    """``--no-progress``: also silence the progress bars of transformers and datasets (this process only)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icon2-lens``. Returns the exit code.

    0: done; 2: bad input (the message says what was wrong and what to do); 130: interrupted (Ctrl-C; the rows
    written so far are kept and a rerun of the same command resumes); 1: an unexpected error (a bug: the
    message says to rerun with ``--debug`` for the traceback). No traceback is printed unless ``--debug``.
    """
    args = build_parser().parse_args(argv)
    cmd = args.command_obj
    where = f"icon2-lens {args.command}"
    if getattr(args, "no_progress", False):
        _quiet_libraries()
    try:
        written = cmd.run(args, cmd.build_config(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        out = getattr(args, "out", None)
        kept = f"{_rows_kept(out)} rows kept in {out}" if isinstance(out, Path) else "nothing written"
        print(f"\n{where}: interrupted; {kept}; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        user = isinstance(exc, _USER_ERRORS)
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        text = public_path(" ".join(str(msg).split()))
        if isinstance(exc, OSError) and not isinstance(exc, ValueError) and exc.errno in _OS_TODO:
            # a full disk or a read-only folder: the file, the OS's words, then what to do
            name = f"{public_path(str(exc.filename))}: " if exc.filename else ""
            text = f"{name}{exc.strerror or text}; {_OS_TODO[exc.errno]}."
        if user:
            print(f"{where}: error: {text}", file=sys.stderr)
            return 2
        print(f"{where}: error: unexpected {type(exc).__name__}: {text} (a bug: rerun with --debug for the "
              "traceback, and report it)", file=sys.stderr)
        return 1
    if written:
        print("\nwrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
