"""The command line's one place for errors: exit codes, one-line messages, Ctrl-C, --debug, --no-progress.

Issue 17 items 4 and 5: Ctrl-C prints one line ("interrupted; N rows kept in DIR; rerun the same command to
resume"), exits 130 without a traceback, and the partial output resumes; an unexpected error is one line with a
hint (exit 1) unless ``--debug``; messages never show this library's temp names; ``--no-progress`` silences the
bars of transformers and datasets too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icon2_lens.cli import build_parser, main
from icon2_lens.cli.commands import COMMANDS
from icon2_lens.errors import BadFileError, BadInputError, public_path

#: A minimal valid command line per command (never run: the command's run() is replaced).
_ARGV = {
    "extract": ["--out", "OUT"],
    "layers": ["--directions", "D"],
    "synthesize": ["--n", "4", "--out", "OUT"],
    "score": ["--directions", "D", "--instructions", "I", "--out", "OUT"],
    "generate": ["--directions", "D", "--instructions", "I", "--out", "OUT"],
    "calibrate": ["--directions", "D", "--instructions", "I", "--out", "OUT"],
    "train": ["--pairs", "P", "--out", "OUT"],
    "controls": ["--pairs", "P", "--directions", "D", "--out", "OUT"],
    "evaluate": ["--trained", "T", "--directions", "D", "--out", "OUT"],
    "compare": ["--out", "OUT"],
    "baseline": ["system_prompts", "--instructions", "I", "--out", "OUT"],
    "distill": ["run", "--out", "OUT"],
    "run": ["--out", "OUT"],
    "merge": ["synthesize", "S0", "S1", "--out", "OUT"],
    "serve": [],
    "export": ["--directions", "D", "--criterion", "helpful", "--out", "OUT"],
}


def _argv(name: str, out: Path) -> list[str] | None:
    argv = [name, *(str(out) if a == "OUT" else a for a in _ARGV.get(name, []))]
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return None
    return argv


def _patched(monkeypatch, name: str, exc: BaseException, out: Path | None = None):
    def boom(args, cfg):
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "rows.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3')  # two complete rows, one torn
        raise exc

    monkeypatch.setattr(COMMANDS[name], "run", boom)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_ctrl_c_is_one_line_exit_130_for_every_command(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = _argv(name, out)
    if argv is None:
        pytest.fail(f"_ARGV has no valid command line for {name!r}; add one")
    _patched(monkeypatch, name, KeyboardInterrupt(), out)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"icon2-lens {name}: interrupted;") and err.endswith("rerun the same command to resume.")
    if "--out" in argv:
        assert f"2 rows kept in {out}" in err


def test_ctrl_c_with_debug_shows_the_traceback(tmp_path, monkeypatch):
    _patched(monkeypatch, "synthesize", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        main(["synthesize", "--debug", "--n", "4", "--out", str(tmp_path / "o")])
    with pytest.raises(KeyboardInterrupt):  # also before the subcommand
        main(["--debug", "synthesize", "--n", "4", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("exc", [BadInputError("--threshold nan is not a finite number; give a number."),
                                 BadFileError("x/criteria.yaml", "is not YAML", "Fix it."),
                                 FileNotFoundError("no such file: x"), KeyError("unknown criterion 'x'")])
def test_bad_input_is_one_line_exit_2(exc, tmp_path, monkeypatch, capsys):
    _patched(monkeypatch, "synthesize", exc)
    assert main(["synthesize", "--n", "4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("icon2-lens synthesize: error: ") and len(err.splitlines()) == 1
    assert "Traceback" not in err and "'" not in err.split("error: ")[1][:1]  # a KeyError's message is not quoted


def test_unexpected_error_is_one_line_exit_1_with_a_hint(tmp_path, monkeypatch, capsys):
    _patched(monkeypatch, "synthesize", ZeroDivisionError("division by zero"))
    assert main(["synthesize", "--n", "4", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "unexpected ZeroDivisionError: division by zero" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["synthesize", "--n", "4", "--out", str(tmp_path / "o"), "--debug"])


def test_messages_never_show_internal_temp_names(tmp_path, monkeypatch, capsys):
    leak = OSError(f"[Errno 28] No space left on device: '{tmp_path}/.icon2_out.zkxa99lx.tmp/x' and "
                   "'.c60_immutable.w7pasd50.old/x'")
    _patched(monkeypatch, "synthesize", leak)
    assert main(["synthesize", "--n", "4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert ".tmp" not in err and ".old" not in err and f"{tmp_path}/icon2_out/x" in err
    assert public_path("'.c60_immutable.w7pasd50.old/x'") == "'c60_immutable/x'"


def test_no_progress_silences_transformers_and_datasets(tmp_path, monkeypatch):
    import datasets
    import transformers

    monkeypatch.setattr(COMMANDS["synthesize"], "run", lambda args, cfg: [])
    try:
        assert main(["synthesize", "--no-progress", "--n", "4", "--out", str(tmp_path / "o")]) == 0
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert datasets.is_progress_bar_enabled() is False
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()


def _count_rows(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n"))


def test_sigint_in_the_middle_of_synthesize_then_resume(tiny_model_dir, tmp_path):
    """A real Ctrl-C (SIGINT) in a running ``synthesize``: one line, exit 130, the rows kept resume to the full
    count without duplicates."""
    out = tmp_path / "synth"
    cmd = [sys.executable, "-c", "import sys; from icon2_lens.cli import main; sys.exit(main())", "synthesize", "--model", str(tiny_model_dir), "--device", "cpu",
           "--n", "40", "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out), "--seed", "0",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited as ignored
    raw = out / "raw.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (not raw.is_file() or _count_rows(raw) < 4):
        time.sleep(0.05)
    assert proc.poll() is None, f"synthesize ended before it could be interrupted: {proc.communicate()[1][-500:]}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("icon2-lens synthesize: interrupted;") and "rerun the same command to resume" in last
    kept = _count_rows(raw)
    assert 0 < kept < 40
    settings = json.loads((out / "synthesis.json").read_text())
    done = subprocess.run([*cmd[:-1]], capture_output=True, env=env, timeout=600)  # progress on: also fine
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = [json.loads(x) for x in raw.read_text().splitlines()]
    assert len(rows) == 40 and len({r["index"] for r in rows}) == 40  # nothing lost, nothing duplicated
    assert json.loads((out / "synthesis.json").read_text()) == settings


@pytest.mark.parametrize("device", ["banana", "cuda:99"])
def test_a_device_this_machine_lacks_is_an_error_before_loading(device, tmp_path, capsys, monkeypatch):
    import icon2_lens as il
    import icon2_lens.models as models

    def no_loading(*a, **k):
        raise AssertionError("the model was being loaded before the device was checked")

    monkeypatch.setattr(models, "resolve_source", no_loading)
    with pytest.raises(BadInputError, match="device") as info:
        il.load_model(None, device=device)
    assert info.value.option == "device"
    out = tmp_path / "d"
    assert main(["extract", "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and repr(device) in err and "Traceback" not in err and not out.exists()


def test_extract_checks_criteria_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import icon2_lens.cli.stage_commands as sc

    monkeypatch.setattr(sc, "load", lambda args: pytest.fail("the model was loaded before --criteria was checked"))
    bad = tmp_path / "crit.yaml"
    bad.write_text("- name: brief\n  positive: [You are brief.]\n  negative: You ramble.\n")
    for crit in ("helpful,nosuch", str(bad)):
        assert main(["extract", "--criteria", crit, "--out", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err
        assert ("nosuch" in err or "crit.yaml" in err) and "Traceback" not in err
