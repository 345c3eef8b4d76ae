"""Helpers shared by the benchmark scripts (timing, padding, peak RSS in a child process, versions)."""

from __future__ import annotations

import gc
import json
import platform
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Sequence

import torch


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for a batch of token-id lists."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds taken by ``fn()`` (after a garbage collection) and its result."""
    gc.collect()
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_of(fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` while sampling RSS every 5 ms in a thread; baseline, peak, delta and seconds."""
    gc.collect()
    time.sleep(0.2)
    baseline = rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            stop.wait(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        secs = time.perf_counter() - t0
        stop.set()
        t.join()
    peak = max(peak, rss())
    return {"baseline_rss": baseline, "peak_rss": peak, "peak_delta": peak - baseline, "seconds": secs}


def run_child(cmd: list[str], tag: str = "MEMORY_RESULT") -> dict:
    """Run a child process and parse its ``<tag> {json}`` line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"child {cmd[2:]} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def environment(packages: Sequence[str]) -> dict[str, Any]:
    """Python, platform, CPU count, torch threads, load average and package versions."""
    import os

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg": list(os.getloadavg()), "versions": out,
            "argv": sys.argv[1:]}


def write_result(path: Any, result: dict) -> None:
    """Write the benchmark's JSON result (creating the folder) and say where."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
