"""The ``icon2-lens`` command line: one subcommand per stage.

    icon2-lens extract --out runs/directions --stability   # embedded model, default criteria, built-in feature set
    icon2-lens layers --directions runs/directions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model source: omit for the embedded SmolLM2-135M-Instruct; an HF folder, a .gguf file or an HF id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--allow-download", action="store_true", help="let transformers download an HF id (offline otherwise)")
    p.add_argument("--chat-template", default=None, type=Path,
                   help="file with a Jinja chat template, for models whose tokenizer has none")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from .models import load_model

    template = None
    if args.chat_template is not None:
        if not args.chat_template.is_file():
            raise FileNotFoundError(f"--chat-template {args.chat_template} does not exist; pass a file with a Jinja template.")
        template = args.chat_template.read_text(encoding="utf-8")
    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                      local_files_only=not args.allow_download, chat_template=template)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``icon2-lens`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="icon2-lens",
        description="Preference data from a model's own residual stream (Icon2) on TransformerLens hook points.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract criterion direction vectors into a DirectionSet folder")
    _add_model_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (directions.safetensors + directions.json)")
    p.add_argument("--criteria", default=None,
                   help="comma-separated default criteria (general,helpful,honest,harmless) or a YAML file; default: all four")
    p.add_argument("--instructions", default="default",
                   help="feature set: 'default' (built-in, 256), a .txt file (one per line) or a .jsonl file")
    p.add_argument("--n-instructions", type=int, default=None,
                   help="use only the first N instructions (default: all of --instructions; 'default' is 256)")
    p.add_argument("--method", default="pca", choices=["pca", "mean_diff", "pca_centered"])
    p.add_argument("--hook", default="resid_post", help="residual hook: resid_pre, resid_mid or resid_post")
    p.add_argument("--stability", action="store_true",
                   help="also measure split-half stability in the same pass (stored with the directions)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("layers", help="per-layer separation report and suggested steering range")
    _add_model_args(p)
    p.add_argument("--directions", required=True, type=Path, help="a DirectionSet folder from `extract`")
    p.add_argument("--heldout", default=None, help="held-out instructions (.txt/.jsonl); default: unused built-in ones")
    p.add_argument("--n-heldout", type=int, default=64)
    p.add_argument("--n-paraphrase-instructions", type=int, default=16)
    p.add_argument("--width", type=int, default=None, help="size of the suggested layer window (default: a third)")
    p.add_argument("--stability", action="store_true",
                   help="also compute split-half stability (a second extraction pass); not needed when the "
                        "directions were extracted with --stability, whose values the report shows anyway")
    p.add_argument("--instructions", default="default", help="feature set for --stability (default: built-in)")
    p.add_argument("--n-instructions", type=int, default=None, help="first N feature instructions for --stability")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for layer_report.{md,json,png} (default: the directions folder)")
    p.set_defaults(func=_cmd_layers)
    return parser


def _cmd_extract(args: argparse.Namespace) -> list[Path]:
    from .directions import extract_directions
    from .files import check_output_folder
    from .instructions import load_instructions

    check_output_folder(args.out, overwrite=args.overwrite)  # fail before the slow part
    instructions = load_instructions(args.instructions, limit=args.n_instructions)
    model = _load(args)
    dirs = extract_directions(model, args.criteria, instructions, method=args.method, hook=args.hook,
                              batch_size=args.batch_size, stability=args.stability, progress=not args.no_progress)
    dirs.save(args.out, overwrite=args.overwrite)
    print(dirs)
    return [args.out / "directions.safetensors", args.out / "directions.json"]


def _cmd_layers(args: argparse.Namespace) -> list[Path]:
    from .directions import DirectionSet
    from .instructions import load_instructions
    from .layers import layer_report, split_half_stability

    dirs = DirectionSet.load(args.directions)  # fail early on a bad folder
    model = _load(args)
    dirs.check_compatible(model)
    stability = None
    if args.stability and "stability" not in dirs.stats:
        stability = split_half_stability(model, dirs, load_instructions(args.instructions, limit=args.n_instructions),
                                         batch_size=args.batch_size, progress=not args.no_progress)
    report = layer_report(model, dirs, heldout=args.heldout, n_heldout=args.n_heldout,
                          n_paraphrase_instructions=args.n_paraphrase_instructions, width=args.width,
                          batch_size=args.batch_size, stability=stability, progress=not args.no_progress)
    print(report.table())
    meta_path = report.apply(dirs).update_meta_on_disk(args.directions)  # records suggested_layers
    written = report.save(args.out or args.directions)
    return [*written.values(), meta_path]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icon2-lens``. Returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        written = args.func(args)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # OSError: missing files, bad model folders
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"icon2-lens {args.command}: error: {msg}", file=sys.stderr)
        return 2
    print("\nwrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
