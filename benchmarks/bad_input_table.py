"""Write docs/bad-input.md: the bad-input matrix of tests/tiny/test_bad_input_matrix.py, run and measured.

Every case is fed through the CLI (in-process) and the Python API on a tiny random Llama built in a temp folder;
the table shows the exact line the CLI printed, its exit code, the exception Python raised, and whether every
file that was there before was byte-identical afterwards. The second table sends a real SIGINT to each long
stage. About 3 minutes on two cores.

    python benchmarks/bad_input_table.py            # writes docs/bad-input.md
    python benchmarks/bad_input_table.py -          # prints it instead
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "tiny"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import test_bad_input_matrix as m  # noqa: E402

HEAD = """# Bad input: what each mistake prints

Every problem a user can fix is refused with **one line** on stderr that names the culprit (the file by its
path, or the option in its CLI spelling) and says what to do, **exit code 2**, no traceback; in Python the same
problem raises a typed exception (`icon2_lens.errors.BadInputError` / `BadFileError`, both `ValueError`s; a
missing file is also a `FileNotFoundError`; an unreachable judge a `JudgeEndpointError`, an `OSError`).
Nothing that was there before is changed: the inputs and an earlier output folder (given with `--overwrite`
where the command has it) stay byte-identical, and no temp file is left behind. Ctrl-C exits 130 with
`interrupted; N rows kept in DIR; rerun the same command to resume`.

The tables below are generated, not typed: `python benchmarks/bad_input_table.py` runs each case of
`tests/tiny/test_bad_input_matrix.py` (which checks the same things on every test run) on a tiny random Llama
(4 layers, d_model 64, context 256) and writes this page. Paths are shown relative to the case's temp folder:
`in/` holds the bad input, `out/` the earlier output, `work/` the shared inputs.

A read-only and a full disk are simulated (the tests run as root, where a `chmod 0o555` folder stays
writable): every write under the case folder fails with `EROFS` or `ENOSPC`. In Python these surface as the
OS's own `OSError` (its `errno` and file); the command line adds what to do.

## Bad input: the CLI and the Python API
"""

SIGINT_HEAD = """
## Ctrl-C in the middle of each long stage

A real SIGINT is sent to `icon2-lens STAGE` (a subprocess) once its first rows are on disk (`synthesize`,
`generate`, `baseline` append rows batch by batch) or once its first forward pass ran (the other stages write
their output in one go, atomically, so an interrupted run leaves the earlier output as it was). "Rows intact":
the rows file is valid JSONL with no torn line and no duplicate `index`; "earlier output intact": every file
that was there before is byte-identical and no temp folder is left. The test also checks that rerunning the
interrupted `generate` resumes to the same pairs as an uninterrupted run.
"""


def sigint_table(root: Path, w: m.Work) -> str:
    rows = ["| stage | exit | the last line on stderr | rows kept | rows intact | earlier output intact |",
            "|---|---|---|---|---|---|"]
    for stage in m.LONG_STAGES:
        tmp = root / f"sigint-{stage}"
        tmp.mkdir()
        out = tmp / "out"
        shutil.copytree(w.dirs, tmp / "dirs")
        argv, rows_file = m._interrupt_argv(stage, w, out, tmp)
        if rows_file is None and stage != "layers":
            shutil.copytree(w.dirs, out)
        before = m.snapshot(tmp / "dirs", w.root) | (m.snapshot(out) if rows_file is None else {})
        rc, err = m.interrupt(argv, out, rows_file, tmp / "started")
        last = err.strip().splitlines()[-1] if err.strip() else ""
        last = last.replace(str(tmp) + "/", "")
        if rows_file is None:
            intact = (m.snapshot(tmp / "dirs", w.root) | m.snapshot(out)) == before and not [
                p for p in tmp.iterdir() if p.name.startswith(".")]
            kept, good = "-", "-"
        else:
            data = (out / rows_file).read_bytes()
            lines = data.splitlines()
            try:
                idx = [m.json.loads(x)["index"] for x in lines]
                good = "yes" if data.endswith(b"\n") and len(idx) == len(set(idx)) else "NO"
            except ValueError:
                good = "NO"
            kept = str(len(lines))
            intact = m.snapshot(tmp / "dirs", w.root) == before
        name = stage if stage != "baseline" else "baseline system_prompts"
        rows.append(f"| {name} | {rc} | `` {last} `` | {kept} | {good} | {'yes' if intact else 'NO'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bad-input-") as d:
        root = Path(d)
        table = m.markdown_table(root)
        w = m.make_work(root / "sigint-work")
        sig = sigint_table(root, w)
    took = time.time() - t0
    text = (HEAD + "\n" + table + SIGINT_HEAD + "\n" + sig
            + f"\nGenerated on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"in {took:.0f} s.\n")
    if sys.argv[1:] == ["-"]:
        print(text, end="")
    else:
        (ROOT / "docs" / "bad-input.md").write_text(text)
        print(f"wrote docs/bad-input.md ({len(m.CASES)} cases, {took:.0f} s)")


if __name__ == "__main__":
    main()
