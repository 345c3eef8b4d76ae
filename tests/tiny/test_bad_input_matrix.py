"""The bad-input matrix (issue 14, item 5): one table of bad inputs, each fed through the CLI and the Python API.

Every case says what is wrong, how to make it in a temp folder, the command line, the Python call, the typed
exception, the exit code, and the words the message must hold: the culprit (a file's path or an option) and
what to do. Through the CLI (``icon2_lens.cli.main`` in-process): a non-zero exit, one line on stderr, no
traceback. Through the API: the typed exception with the same words. Both ways, every file that was there
before (the inputs and an earlier output folder, hidden files included) is byte-identical afterwards.

The second half sends a real SIGINT to ``icon2-lens`` subprocesses in the middle of each long stage: exit 130,
one line, the rows already written intact (valid JSONL, no torn line, no duplicate), an earlier output of an
all-at-once stage untouched, and for ``generate`` a rerun of the same command resumes to the same pairs as an
uninterrupted run.

``python benchmarks/bad_input_table.py`` runs the same cases and writes the table to docs/bad-input.md.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest's model builders, also when imported by benchmarks/bad_input_table.py

from conftest import INSTRUCTIONS, build_model_folder, write_bert_gguf  # noqa: E402

LONG = "Tell me about " + "the sea and the sky, " * 120  # about 800 tokens: over the tiny model's 256


# ---- the work folder: models, directions, inputs (made once) ------------------------------------------------


@dataclass
class Work:
    """Shared inputs: the tiny model folders, its loaded model, directions of it and of another model."""

    root: Path
    tiny: Path
    base: Path
    model: Any
    dirs: Path
    odirs: Path
    instr: Path
    table: Path
    pairs: Path


def make_work(root: Path, tiny: Path | None = None, base: Path | None = None, model: Any = None,
              other: Any = None) -> Work:
    import icon2_lens as il

    root.mkdir(parents=True, exist_ok=True)
    tiny = tiny or build_model_folder(root / "tiny-llama")
    base = base or build_model_folder(root / "tiny-base", chat_template=None)
    model = model or il.load_model(tiny, device="cpu")
    if other is None:
        other = il.load_model(build_model_folder(root / "tiny-other", hidden_size=32, num_hidden_layers=3, seed=1),
                              device="cpu")
    il.extract_directions(model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False).save(
        root / "dirs")
    il.extract_directions(other, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False).save(
        root / "odirs")
    (root / "instr.txt").write_text("\n".join(INSTRUCTIONS[:4]) + "\n")
    (root / "table.jsonl").write_text("".join(json.dumps({"instruction": q, "criterion": "helpful"}) + "\n"
                                              for q in INSTRUCTIONS[:3]))
    pair = {"prompt": [{"role": "user", "content": "Question?"}],
            "chosen": [{"role": "assistant", "content": "A clear answer."}],
            "rejected": [{"role": "assistant", "content": "bad"}]}
    (root / "pairs.jsonl").write_text((json.dumps(pair) + "\n") * 4)
    return Work(root, tiny, base, model, root / "dirs", root / "odirs", root / "instr.txt", root / "table.jsonl",
                root / "pairs.jsonl")


@dataclass
class Ctx:
    """One case's folder: ``inp`` for its bad input, ``out`` an earlier output it must leave byte-identical."""

    w: Work
    tmp: Path
    inp: Path
    out: Path

    def model_args(self, model: Path | str | None = None) -> list[str]:
        return ["--model", str(model or self.w.tiny), "--device", "cpu", "--no-progress"]


# ---- ways to make bad inputs ------------------------------------------------------------------------------


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _model_copy(c: Ctx) -> Path:
    return Path(shutil.copytree(c.w.tiny, c.inp / "model"))


def _nan_model(c: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _model_copy(c)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    tensors[name][:] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _corrupt_model(c: Ctx) -> Path:
    folder = _model_copy(c)
    _truncate(folder / "model.safetensors")
    return folder


def _bert_gguf(c: Ctx) -> Path:
    """A GGUF file of an encoder (bert), not a causal LM."""
    return write_bert_gguf(c.inp / "encoder.gguf")


def _corrupt_dirs(c: Ctx) -> Path:
    folder = Path(shutil.copytree(c.w.dirs, c.inp / "dirs"))
    _truncate(folder / "directions.safetensors", keep=50)
    return folder


def _other_run(c: Ctx) -> Path:
    """A run folder written by the default config; the new config changes gamma_pos."""
    import yaml

    from icon2_lens.pipeline.config import load_config

    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / "config.yaml").write_text(yaml.safe_dump(load_config(None).to_dict(), sort_keys=False))
    (c.out / "manifest.json").write_text(json.dumps({"stages": {"extract": {"status": "done"}}}))
    shutil.copytree(c.w.dirs, c.out / "extract" / "directions")
    return _write(c.inp / "config.yaml", "generate:\n  gamma_pos: 0.2\n")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the table ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One kind of bad input.

    Attributes:
        id: a short name (the pytest id).
        wrong: what is wrong, in words (the table's first column).
        argv: the command line, given the case folder (``--out c.out --overwrite`` where the command has them).
        api: the Python call that must raise.
        exc: the typed exception it raises (the API).
        says: what the message must name, given the case folder: the culprit (a path or an option) and what to do.
        make: writes the bad input into the case folder; returns what the argv and api use (``c.made``).
        earlier: the earlier output in ``c.out``: ``"dirs"`` (an extract), ``"generate"``, ``"synthesize"``,
            ``"run"`` (made by ``make``) or ``None``.
        code: the CLI's exit code.
        env: environment variables set for both.
        fs_errno: the OS refuses every write under the case folder with this errno (a read-only or full disk).
    """

    id: str
    wrong: str
    argv: Callable[[Ctx, Any], list[str]]
    api: Callable[[Ctx, Any], object]
    exc: type[BaseException]
    says: Callable[[Ctx, Any], list[str]]
    make: Callable[[Ctx], Any] = lambda c: None
    earlier: str | None = "dirs"
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    fs_errno: int | None = None


def _il():
    import icon2_lens as il

    return il


def _extract(c: Ctx, *extra: str, model: Path | str | None = None, criteria: str = "helpful") -> list[str]:
    return ["extract", *c.model_args(model), "--criteria", criteria, "--instructions", str(c.w.instr),
            "--out", str(c.out), "--overwrite", *extra]


def _score(c: Ctx, dirs: Path, instr: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["score", *c.model_args(model), "--directions", str(dirs), "--instructions", str(instr), "--out", str(c.out),
            "--overwrite", *extra]


def _generate(c: Ctx, *extra: str, dirs: Path | None = None) -> list[str]:
    return ["generate", *c.model_args(), "--directions", str(dirs or c.w.dirs), "--instructions", str(c.w.table),
            "--out", str(c.out), "--overwrite", "--max-new-tokens", "2", *extra]


def _evaluate(c: Ctx, *extra: str) -> list[str]:
    return ["evaluate", *c.model_args(), "--trained", str(c.w.tiny), "--directions", str(c.w.dirs), "--instructions",
            str(c.w.instr), "--n", "2", "--max-new-tokens", "2", "--out", str(c.out), "--overwrite", *extra]


def _train(c: Ctx, pairs: Path) -> list[str]:
    return ["train", *c.model_args(), "--pairs", str(pairs), "--max-steps", "1", "--precision", "fp32",
            "--out", str(c.out), "--overwrite"]


def _api_train(c: Ctx, pairs: Path) -> object:
    from icon2_lens.training import TrainConfig, train

    return train(pairs, config=TrainConfig(max_steps=1, precision="fp32"), model_source=c.w.tiny, output_dir=c.out,
                 device="cpu", progress=False, overwrite=True)


def _api_save(c: Ctx) -> object:
    return _il().DirectionSet.load(c.w.dirs).save(c.out, overwrite=True)


CASES: list[Case] = [
    Case("missing-model", "a model path that does not exist",
         make=lambda c: c.inp / "no-such-model",
         argv=lambda c, m: _extract(c, model=m), api=lambda c, m: _il().load_model(m, device="cpu"),
         exc=FileNotFoundError, says=lambda c, m: [str(m), "does not exist", "pass"]),
    Case("corrupt-gguf", "a truncated .gguf model file",
         make=lambda c: _write(c.inp / "model.gguf", b"GGUF\x03\x00\x00\x00\x01"),
         argv=lambda c, m: _extract(c, model=m), api=lambda c, m: _il().load_model(m, device="cpu"),
         exc=Exception,
         says=lambda c, m: [str(m), "GGUF", "copy or download it again"]),
    Case("corrupt-model-weights", "a model folder whose model.safetensors is truncated",
         make=_corrupt_model, argv=lambda c, m: _extract(c, model=m),
         api=lambda c, m: _il().load_model(m, device="cpu"),
         exc=Exception, says=lambda c, m: [str(m / "model.safetensors"), "truncated or corrupt", "copy or download"]),
    Case("gguf-not-causal-lm", "a GGUF file of an encoder (bert), not a causal LM",
         make=_bert_gguf, argv=lambda c, m: _extract(c, model=m), api=lambda c, m: _il().load_model(m, device="cpu"),
         exc=Exception, says=lambda c, m: [str(m), "causal language model", "--model"]),
    Case("no-chat-template", "a tokenizer without a chat template (a base model)",
         argv=lambda c, m: _extract(c, model=c.w.base),
         api=lambda c, m: _il().extract_directions(_il().load_model(c.w.base, device="cpu"), ["helpful"],
                                                   INSTRUCTIONS[:2], progress=False),
         exc=ValueError, says=lambda c, m: [str(c.w.base), "no chat template", "--chat-template"]),
    Case("hf-id-offline", "an HF model id not in the local cache, offline",
         env={"HF_HUB_OFFLINE": "1"}, make=lambda c: os.environ.__setitem__("HF_HOME", str(c.tmp / "hf")),
         argv=lambda c, m: _extract(c, model="nobody/not-a-model-xyz"),
         api=lambda c, m: _il().load_model("nobody/not-a-model-xyz", device="cpu"),
         exc=FileNotFoundError, says=lambda c, m: ["nobody/not-a-model-xyz", "not in the local HF cache",
                                                   "--allow-download"]),
    Case("nan-weights", "NaN in the activations: a model folder whose weights hold NaN",
         make=_nan_model, argv=lambda c, m: _score(c, c.w.dirs, c.w.instr, model=m),
         api=lambda c, m: _il().load_model(m, device="cpu"),
         exc=Exception, says=lambda c, m: [str(m), "NaN or infinite weights", "copy or download the model again"]),
    Case("layer-out-of-range", "--layers 99 on a 4-layer model",
         argv=lambda c, m: _generate(c, "--layers", "99"), earlier="generate",
         api=lambda c, m: _il().generate_pairs(c.w.model, _il().DirectionSet.load(c.w.dirs), str(c.w.table),
                                               layers=[99], out=c.out, progress=False),
         exc=ValueError, says=lambda c, m: ["99", "which have [0, 1, 2, 3]", "--layers"]),
    Case("empty-criterion", "an empty criterion name in a list (helpful,,honest)",
         argv=lambda c, m: _extract(c, criteria="helpful,,honest"),
         api=lambda c, m: _il().extract_directions(c.w.model, "helpful,,honest", INSTRUCTIONS[:2], progress=False),
         exc=Exception, says=lambda c, m: ["'helpful,,honest'", "empty name", "without empty items"]),
    Case("duplicate-criterion", "a criterion named twice (helpful,helpful)",
         argv=lambda c, m: _extract(c, criteria="helpful,helpful"),
         api=lambda c, m: _il().extract_directions(c.w.model, ["helpful", "helpful"], INSTRUCTIONS[:2],
                                                   progress=False),
         exc=Exception, says=lambda c, m: ["repeated: ['helpful']", "must be unique"]),
    Case("criteria-yaml-types", "a criteria YAML whose positive prompt is a number",
         make=lambda c: _write(c.inp / "criteria.yaml", "- {name: brief, positive: 42, negative: You ramble.}\n"),
         argv=lambda c, m: _extract(c, criteria=str(m)),
         api=lambda c, m: _il().load_criteria(m),
         exc=Exception, says=lambda c, m: [str(m), "positive is a number", "quote it"]),
    Case("directions-of-another-model", "directions extracted from a model of another shape",
         argv=lambda c, m: _generate(c, dirs=c.w.odirs), earlier="generate",
         api=lambda c, m: _il().score_instructions(c.w.model, _il().DirectionSet.load(c.w.odirs), INSTRUCTIONS[:2],
                                                   progress=False),
         exc=ValueError, says=lambda c, m: ["extracted from 'tiny-other'", "d_model=32", "icon2-lens extract"]),
    Case("corrupt-directions", "a truncated directions.safetensors",
         make=_corrupt_dirs, argv=lambda c, m: _score(c, m, c.w.instr),
         api=lambda c, m: _il().DirectionSet.load(m),
         exc=Exception, says=lambda c, m: [str(m / "directions.safetensors"), "icon2-lens extract"]),
    Case("empty-instruction-file", "an empty instruction file",
         make=lambda c: _write(c.inp / "instructions.txt", b""),
         argv=lambda c, m: _score(c, c.w.dirs, m), api=lambda c, m: _il().load_instructions(m),
         exc=Exception, says=lambda c, m: [str(m), "No instructions found", "one instruction per line"]),
    Case("jsonl-torn-line", "an instructions JSONL with a torn line",
         make=lambda c: _write(c.inp / "instructions.jsonl", b'{"instruction": "Hi"}\n{"instruction": "He\n'),
         argv=lambda c, m: _score(c, c.w.dirs, m), api=lambda c, m: _il().load_instructions(m),
         exc=Exception, says=lambda c, m: [str(m), "line 2 is not valid JSON", "fix or delete that line"]),
    Case("jsonl-non-object-line", "an instructions JSONL with a line that is a list",
         make=lambda c: _write(c.inp / "instructions.jsonl", b'{"instruction": "Hi"}\n[1, 2]\n'),
         argv=lambda c, m: _score(c, c.w.dirs, m), api=lambda c, m: _il().load_instructions(m),
         exc=Exception, says=lambda c, m: [str(m), "line 2 is a list", "Give each row an 'instruction' field"]),
    Case("instruction-too-long", "an instruction longer than the model's context",
         make=lambda c: _write(c.inp / "long.txt", INSTRUCTIONS[0] + "\n" + LONG + "\n"),
         argv=lambda c, m: _score(c, c.w.dirs, m),
         api=lambda c, m: _il().score_instructions(c.w.model, _il().DirectionSet.load(c.w.dirs), [LONG],
                                                   progress=False),
         exc=Exception, says=lambda c, m: ["longer than the context", "256 tokens", "Shorten or drop them"]),
    Case("gamma-pos-not-above-gamma-neg", "gamma_pos <= gamma_neg",
         argv=lambda c, m: _generate(c, "--gamma-pos", "0.1", "--gamma-neg", "0.1"), earlier="generate",
         api=lambda c, m: _il().generate_pairs(c.w.model, _il().DirectionSet.load(c.w.dirs), str(c.w.table),
                                               gamma_pos=0.1, gamma_neg=0.1, out=c.out, progress=False),
         exc=Exception, says=lambda c, m: ["gamma-neg", "must be below", "gamma-pos"]),
    Case("max-new-tokens-zero", "max_new_tokens <= 0",
         argv=lambda c, m: _generate(c, "--max-new-tokens", "0"), earlier="generate",
         api=lambda c, m: _il().PairsConfig(max_new_tokens=0),
         exc=Exception, says=lambda c, m: ["max-new-tokens", "must be positive, got 0"]),
    Case("unknown-method", "an unknown direction method",
         argv=lambda c, m: _extract(c, "--method", "banana"),
         api=lambda c, m: _il().extract_directions(c.w.model, ["helpful"], INSTRUCTIONS[:2], method="banana",
                                                   progress=False),
         exc=ValueError, says=lambda c, m: ["'banana'", "use one of", "pca"]),
    Case("unknown-judge", "an unknown judge",
         argv=lambda c, m: _evaluate(c, "--judge", "banana"),
         api=lambda c, m: __import__("icon2_lens.judges", fromlist=["x"]).make_judge("banana", device="cpu"),
         exc=Exception, says=lambda c, m: ["'banana'", "--judge", "OpenAI-compatible"]),
    Case("unreachable-judge-url", "a judge URL where nothing listens",
         make=lambda c: f"http://127.0.0.1:{_free_port()}/v1",
         argv=lambda c, m: _evaluate(c, "--judge", m),
         api=lambda c, m: __import__("icon2_lens.judges", fromlist=["x"]).make_judge(m).compare(["Q?"], ["a"], ["b"]),
         exc=OSError, says=lambda c, m: [m, "Nothing is listening", "must be running there"]),
    Case("pairs-without-chosen-rejected", "a pairs file whose rows lack chosen/rejected",
         make=lambda c: _write(c.inp / "pairs.jsonl", json.dumps({"prompt": "q", "answer": "a"}) + "\n"),
         argv=lambda c, m: _train(c, m), api=lambda c, m: _api_train(c, m),
         exc=Exception, says=lambda c, m: [str(m), "lacks 'chosen', 'rejected'", "as `icon2-lens generate` writes"]),
    Case("run-folder-of-another-config", "a run folder written by another config",
         make=_other_run, earlier="run",
         argv=lambda c, m: ["run", "--config", str(m), "--out", str(c.out), "--no-progress"],
         api=lambda c, m: _il().run_pipeline(m, out=c.out, log=None, progress=False),
         exc=ValueError, says=lambda c, m: [str(c.out), "written by a different config", "gamma_pos", "--update"]),
    Case("shard-out-of-range", "a shard spec 3/2",
         argv=lambda c, m: ["synthesize", *c.model_args(), "--n", "4", "--out", str(c.out), "--overwrite",
                            "--shard", "3/2"], earlier="synthesize",
         api=lambda c, m: _il().synthesize_instructions(c.w.model, 4, shard=(3, 2), out=c.out, progress=False),
         exc=ValueError, says=lambda c, m: ["shard 3/2 is out of range", "numbered from 0"]),
    Case("read-only-output-folder", "an output folder on a read-only disk (EROFS on every write)",
         fs_errno=errno.EROFS, argv=lambda c, m: _extract(c), api=lambda c, m: _api_save(c),
         exc=OSError, says=lambda c, m: [str(c.out), "Read-only file system", "choose a writable --out folder"]),
    Case("full-disk", "a full disk (ENOSPC on every write)",
         fs_errno=errno.ENOSPC, argv=lambda c, m: _extract(c), api=lambda c, m: _api_save(c),
         exc=OSError, says=lambda c, m: [str(c.out), "No space left on device", "free disk space"]),
    Case("config-unknown-key", "a run config YAML with an unknown key",
         make=lambda c: _write(c.inp / "config.yaml", "generate:\n  gamma_poz: 0.1\n"), earlier=None,
         argv=lambda c, m: ["run", "--config", str(m), "--out", str(c.out), "--no-progress"],
         api=lambda c, m: _il().run_pipeline(m, out=c.out, log=None, progress=False),
         exc=ValueError, says=lambda c, m: [str(m), "unknown key 'generate.gamma_poz'", "icon2-lens run --help"]),
    Case("nan-option", "a NaN threshold",
         argv=lambda c, m: _score(c, c.w.dirs, c.w.instr, "--threshold", "nan"),
         api=lambda c, m: __import__("icon2_lens.scoring", fromlist=["x"]).ScoreConfig(threshold=float("nan")),
         exc=Exception, says=lambda c, m: ["threshold", "nan is not a finite number", "give a number"]),
    Case("missing-gammas-file", "a --gammas file that does not exist",
         make=lambda c: c.inp / "gammas.yaml", earlier="generate",
         argv=lambda c, m: _generate(c, "--gammas", str(m)),
         api=lambda c, m: __import__("icon2_lens.calibration", fromlist=["x"]).load_gammas(m),
         exc=FileNotFoundError, says=lambda c, m: [str(m), "icon2-lens calibrate"]),
]


def _typed() -> None:
    """The exception types of the cases above that need the package (set here to keep the table readable)."""
    from icon2_lens.errors import BadFileError, BadInputError

    want = {"corrupt-gguf": BadFileError, "corrupt-model-weights": BadFileError, "gguf-not-causal-lm": BadFileError,
            "nan-weights": BadFileError, "empty-criterion": BadInputError, "duplicate-criterion": BadInputError,
            "criteria-yaml-types": BadFileError, "corrupt-directions": BadFileError,
            "empty-instruction-file": BadFileError, "jsonl-torn-line": BadFileError,
            "jsonl-non-object-line": BadFileError, "instruction-too-long": BadInputError,
            "gamma-pos-not-above-gamma-neg": BadInputError, "max-new-tokens-zero": BadInputError,
            "unknown-judge": BadInputError, "pairs-without-chosen-rejected": BadFileError,
            "nan-option": BadInputError}
    for case in CASES:
        case.exc = want.get(case.id, case.exc)


_typed()


# ---- running a case ---------------------------------------------------------------------------------------


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones too) and every folder under ``folders``."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _earlier(c: Ctx, kind: str | None) -> None:
    """The earlier output in ``c.out``, as the stage would have written it."""
    if kind == "dirs":
        shutil.copytree(c.w.dirs, c.out)
    elif kind == "generate":
        _write(c.out / "generation.json", json.dumps({"seed": 0, "max_new_tokens": 2}))
        _write(c.out / "pairs.jsonl", json.dumps({"index": 0, "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    elif kind == "synthesize":
        _write(c.out / "synthesis.json", json.dumps({"seed": 0, "n": 4}))
        _write(c.out / "raw.jsonl", json.dumps({"index": 0, "raw": "Write a poem."}) + "\n")


@contextmanager
def fs_refuses(root: Path, err: int) -> Iterator[None]:
    """Every write under ``root`` fails with ``err`` (reads work): a read-only disk (EROFS: folders cannot be made
    either) or a full one (ENOSPC: folders can be made, files cannot be written). Works as root, where a chmod'ed
    folder would still be writable."""
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    root = root.resolve()

    def under(p: Any) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and Path(os.fsdecode(p)).resolve().is_relative_to(root)

    def refuse(p: Any) -> None:
        raise OSError(err, os.strerror(err), os.fsdecode(p))

    def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if any(m in mode for m in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path: Any, *a: Any, **k: Any) -> None:
        if err == errno.EROFS and under(path):
            refuse(path)
        real_mkdir(path, *a, **k)

    patches = [(builtins, "open", fake_open), (io, "open", fake_open), (os, "open", fake_os_open),
               (os, "mkdir", fake_mkdir)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fake in patches:
            setattr(mod, name, fake)
        yield
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)


@contextmanager
def case_env(case: Case, tmp: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in [*case.env, "HF_HOME", "ICON2_LENS_CACHE"]}
    os.environ.update(case.env)
    os.environ["ICON2_LENS_CACHE"] = str(tmp / "cache")  # a GGUF is dequantised here (nothing half-written)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare(case: Case, w: Work, tmp: Path) -> tuple[Ctx, Any, dict[str, str]]:
    c = Ctx(w, tmp, tmp / "in", tmp / "out")
    c.inp.mkdir(parents=True, exist_ok=True)
    _earlier(c, case.earlier)
    made = case.make(c)
    return c, made, snapshot(tmp, w.root)


def run_cli(case: Case, c: Ctx, made: Any) -> tuple[int, str]:
    """``main(argv)`` in-process; returns the exit code and stderr."""
    from icon2_lens.cli import main

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out), \
            (fs_refuses(c.tmp, case.fs_errno) if case.fs_errno else _nothing()):
        try:
            rc = main(case.argv(c, made))
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
    return rc, err.getvalue()


def run_api(case: Case, c: Ctx, made: Any) -> BaseException | None:
    with fs_refuses(c.tmp, case.fs_errno) if case.fs_errno else _nothing():
        try:
            case.api(c, made)
        except Exception as exc:  # the test checks its type
            return exc
    return None


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def error_line(err: str) -> str:
    """The one line a refused command prints (warnings of libraries aside)."""
    lines = [x for x in err.splitlines() if ": error: " in x]
    return lines[0] if len(lines) == 1 else ""


# ---- the tests ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir, tiny_model_no_template_dir, tiny_model, other_tiny_model) -> Work:
    return make_work(tmp_path_factory.mktemp("matrix"), tiny_model_dir, tiny_model_no_template_dir, tiny_model,
                     other_tiny_model)


def test_the_matrix_covers_enough_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli(case: Case, work: Work, tmp_path: Path):
    with case_env(case, tmp_path):
        c, made, before = prepare(case, work, tmp_path)
        rc, err = run_cli(case, c, made)
    assert rc == case.code, err[-2000:]
    assert "Traceback" not in err, err
    line = error_line(err)
    assert line, f"not one error line: {err!r}"
    argv = case.argv(c, made)
    assert line.startswith(f"icon2-lens {argv[0]}: error: ") and "unexpected" not in line, line
    for said in case.says(c, made):
        assert said.replace("_", "-") in line or said in line, (said, line)
    assert snapshot(tmp_path, work.root) == before  # inputs and the earlier output byte-identical, nothing left


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api(case: Case, work: Work, tmp_path: Path):
    from icon2_lens.errors import public_path

    with case_env(case, tmp_path):
        c, made, before = prepare(case, work, tmp_path)
        exc = run_api(case, c, made)
    assert isinstance(exc, case.exc), repr(exc)
    msg = str(exc)
    assert "\n" not in msg.strip(), msg
    for said in case.says(c, made):
        if case.fs_errno is not None and said in ("choose a writable --out folder", "free disk space"):
            continue  # the OS's own OSError with its errno and file; what to do is said by the CLI
        python = said.lstrip("-").replace("-", "_")  # the API may name an option in Python's words
        assert said in public_path(msg) or python in msg, (said, msg)
    if case.fs_errno is not None:
        assert isinstance(exc, OSError) and exc.errno == case.fs_errno
    assert snapshot(tmp_path, work.root) == before


# ---- Ctrl-C in the middle of each long stage ------------------------------------------------------------------

#: Run the CLI with a global forward hook: at the first forward pass it writes a marker file (the stage is under
#: way), and from then on each module call sleeps a little, so the stage is still running when the signal lands.
_WRAPPER = """
import os, sys, time, torch
marker = os.environ["BIM_MARKER"]
def hook(mod, args, out):
    if not os.path.exists(marker):
        open(marker, "w").close()
    time.sleep(0.002)
torch.nn.modules.module.register_module_forward_hook(hook)
from icon2_lens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _rows(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"torn last line in {path}"
    return [json.loads(x) for x in data.splitlines()]


def _interrupt_argv(stage: str, w: Work, out: Path, tmp: Path) -> tuple[list[str], str | None]:
    """The command line of a long run of ``stage`` and the rows file it appends to (None: written at the end)."""
    m = ["--model", str(w.tiny), "--device", "cpu", "--no-progress"]
    many = tmp / "many.txt"
    many.write_text("".join(f"{q} ({i})\n" for i in range(10) for q in INSTRUCTIONS))
    table = tmp / "many_table.jsonl"
    table.write_text("".join(json.dumps({"instruction": f"{q} ({i})", "criterion": "helpful"}) + "\n"
                             for i in range(4) for q in INSTRUCTIONS))
    return {
        "extract": (["extract", *m, "--criteria", "helpful,honest", "--instructions", str(many), "--batch-size", "2",
                     "--out", str(out), "--overwrite"], None),
        "layers": (["layers", "--model", str(w.tiny), "--device", "cpu", "--directions", str(tmp / "dirs"),
                    "--n-heldout", "32", "--batch-size", "2", "--out", str(out)], None),
        "score": (["score", *m, "--directions", str(w.dirs), "--instructions", str(many), "--batch-size", "2",
                   "--out", str(out), "--overwrite"], None),
        "synthesize": (["synthesize", *m, "--n", "40", "--batch-size", "2", "--max-new-tokens", "8", "--out",
                        str(out), "--seed", "0"], "raw.jsonl"),
        "generate": (["generate", *m, "--directions", str(w.dirs), "--instructions", str(table), "--batch-size", "2",
                      "--max-new-tokens", "6", "--gamma-pos", "0.5", "--gamma-neg", "-0.5", "--scale", "relative",
                      "--layers", "1,2", "--out", str(out)], "pairs.jsonl"),
        "baseline": (["baseline", "system_prompts", *m, "--instructions", str(table), "--batch-size", "2",
                      "--max-new-tokens", "6", "--out", str(out)], "pairs.jsonl"),
        "train": (["train", *m, "--pairs", str(w.pairs), "--max-steps", "400", "--batch-size", "1", "--precision",
                   "fp32", "--out", str(out), "--overwrite"], None),
        "evaluate": (["evaluate", *m, "--trained", str(w.tiny), "--directions", str(w.dirs), "--instructions",
                      str(many), "--n", "40", "--max-new-tokens", "8", "--batch-size", "1", "--n-boot", "10",
                      "--out", str(out), "--overwrite"], None),
    }[stage]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def interrupt(argv: list[str], out: Path, rows_file: str | None, marker: Path, *, min_rows: int = 2
              ) -> tuple[int, str]:
    """Start the CLI, wait until its first rows are on disk (or its first forward pass), send SIGINT."""
    env = {**_env(), "BIM_MARKER": str(marker)}
    # SIGINT back to its default in the child: a shell's background job (pytest run with &) inherits it ignored
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180

    def started() -> bool:
        if rows_file is None:
            return marker.exists()
        f = out / rows_file
        return f.is_file() and f.read_bytes().count(b"\n") >= min_rows

    while time.time() < deadline and proc.poll() is None and not started():
        time.sleep(0.02)
    assert proc.poll() is None, f"{argv[0]} ended before it could be interrupted: {proc.communicate()[1][-800:]!r}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err.decode()


LONG_STAGES = ["extract", "layers", "score", "synthesize", "generate", "baseline", "train", "evaluate"]


@pytest.mark.parametrize("stage", LONG_STAGES)
def test_sigint_in_the_middle_of_a_long_stage(stage: str, work: Work, tmp_path: Path):
    out = tmp_path / "out"
    shutil.copytree(work.dirs, tmp_path / "dirs")  # layers writes its report into the directions folder
    argv, rows_file = _interrupt_argv(stage, work, out, tmp_path)
    if rows_file is None and stage != "layers":  # an all-at-once stage: an earlier output it must not touch
        shutil.copytree(work.dirs, out)
    before = snapshot(tmp_path / "dirs", work.root) | (snapshot(out) if rows_file is None else {})
    rc, err = interrupt(argv, out, rows_file, tmp_path / "started")
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    name = argv[0]
    assert last.startswith(f"icon2-lens {name}: interrupted;") and last.endswith("rerun the same command to resume."), \
        last
    if rows_file is None:
        assert (snapshot(tmp_path / "dirs", work.root) | snapshot(out)) == before  # the earlier output untouched
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    else:
        rows = _rows(out / rows_file)
        assert len(rows) >= 2 and f"{len(rows)} rows kept in {out}" in last
        idx = [r["index"] for r in rows]
        assert len(idx) == len(set(idx)), "duplicate rows"
        assert snapshot(tmp_path / "dirs", work.root) == before


def test_sigint_then_rerun_resumes_to_the_uninterrupted_pairs(work: Work, tmp_path: Path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    argv, rows_file = _interrupt_argv("generate", work, cut, tmp_path)
    assert rows_file is not None
    rc, err = interrupt(argv, cut, rows_file, tmp_path / "started", min_rows=4)
    assert rc == 130, err[-2000:]
    kept = _rows(cut / rows_file)
    again = subprocess.run([sys.executable, "-c", _WRAPPER.replace("time.sleep(0.002)", "pass"), *argv],
                           capture_output=True, env={**_env(), "BIM_MARKER": str(tmp_path / "m2")}, timeout=300)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    whole = [a if a != str(cut) else str(full) for a in argv]
    done = subprocess.run([sys.executable, "-c", _WRAPPER.replace("time.sleep(0.002)", "pass"), *whole],
                          capture_output=True, env={**_env(), "BIM_MARKER": str(tmp_path / "m3")}, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed, reference = _rows(cut / rows_file), _rows(full / rows_file)
    assert resumed[: len(kept)] == kept  # the rows kept at the interrupt were not rewritten
    drop = ("seconds", "time", "cost")

    def same(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if not any(d in k for d in drop)}

    assert sorted(map(json.dumps, map(same, resumed))) == sorted(map(json.dumps, map(same, reference)))
    assert len({r["index"] for r in resumed}) == len(resumed) == len(reference)


# ---- the table as Markdown (docs/bad-input.md) ------------------------------------------------------------------


def markdown_table(root: Path) -> str:
    """Run every case through the CLI and the API and return the bad-input table (measured, not typed)."""
    w = make_work(root / "work")
    rows = ["| # | case | the CLI prints (stderr) | exit | Python raises | outputs intact |",
            "|---|---|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        tmp = root / f"case{i}"
        with case_env(case, tmp):
            c, made, before = prepare(case, w, tmp)
            rc, err = run_cli(case, c, made)
            intact_cli = snapshot(tmp, w.root) == before
            shutil.rmtree(tmp)
            c, made, before = prepare(case, w, tmp)
            exc = run_api(case, c, made)
            intact_api = snapshot(tmp, w.root) == before
        line = error_line(err) or err.strip().replace("\n", " / ")
        line = line.replace(str(tmp) + "/", "").replace(str(root) + "/", "").replace("|", "\\|")
        kind = type(exc).__name__ if exc is not None else "nothing"
        intact = "yes" if intact_cli and intact_api else f"NO (cli {intact_cli}, api {intact_api})"
        rows.append(f"| {i} | {case.wrong} | `` {line} `` | {rc} | `{kind}` | {intact} |")
    return "\n".join(rows) + "\n"
