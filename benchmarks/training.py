#!/usr/bin/env python
"""Training benchmark: seconds per DPO step of ``il.train_dpo`` against a hand-written fp32 DPO step.

One run on the embedded SmolLM2-135M-Instruct (`il.load_model()`; the trainer loads the HF folder
``model.info.hf_path``), with the demo's pair shape: ``--pairs`` (default 24) conversational pairs
built from ``src/icon2_lens/data/response_pairs.jsonl`` (a user question; chosen and rejected
answers of ``--response-tokens`` tokens each, default 128, the demo's ``max_new_tokens``: the
answers of the same criterion strung together and cut), ``max_length`` 384, batch 2, demo preset.

1. seconds per optimizer step of ``il.train_dpo`` with the automatic precision (`choose_precision`)
   / that of the yardstick: a plain-torch fp32 DPO step on the same pairs, tokenized as TRL does
   (chat template, prompt + completion, chosen and rejected concatenated into one right-padded
   batch of 4): policy forward + backward, reference forward under ``no_grad``, the sigmoid DPO
   loss on summed completion log-probabilities, gradient clipping at 1.0 (the Trainer's default)
   and an AdamW step. Goal <= 1.5.
2. On a CPU with native bf16 (``avx512_bf16`` / ``amx_bf16``): ``train_dpo`` in fp32 and in bf16
   explicitly, each against the fp32 yardstick, bf16 / fp32 of ``train_dpo``, and the yardstick
   under bf16 autocast / fp32. Printed whichever way it comes out: if bf16 is slower than fp32 on
   this CPU, the output says so. Without native bf16, bf16 is skipped (emulated; ``--with-bf16``
   measures it anyway).

Each side takes ``--warmup`` untimed steps, then ``--steps`` timed ones. The ratios use the fastest
timed step of each side (``--stat min``, the default: on a shared machine other processes stretch
single steps by up to 7x, seen on 2 cores, and the fastest step is the least disturbed estimate of
the step's own cost); ``--stat median`` uses the median. Both are printed and saved.
``train_dpo``'s steps are timed from the ``elapsed_s`` of its ``train_log.jsonl`` (wall time since
training began, written at each step); its one-time costs (loading two models, tokenizing,
saving) are printed apart. The yardstick cycles over the same pairs in dataset order; TRL draws
them shuffled: all answers have the same token count, so the batches differ only by the prompt.

Run::

    python benchmarks/training.py                          # a few minutes on 2 CPU cores
    python benchmarks/training.py --steps 2 --warmup 1     # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

import icon2_lens as il
from icon2_lens.hardware import choose_precision, cpu_bf16_flags
from icon2_lens.training import PRESETS, train_dpo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_result  # noqa: E402

GOALS = {"step_time_vs_plain_torch": 1.5}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "training.json"
_PACKAGES = ("icon2-lens", "torch", "transformers", "trl", "accelerate", "datasets")
_PAIRS_FILE = Path(il.__file__).resolve().parent / "data" / "response_pairs.jsonl"


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (else ``/proc/cpuinfo``, else `platform`)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_pairs(tokenizer: Any, n: int, response_tokens: int) -> list[dict[str, Any]]:
    """``n`` conversational pairs: a question, chosen/rejected answers of exactly ``response_tokens`` tokens."""
    rows = [json.loads(x) for x in _PAIRS_FILE.read_text(encoding="utf-8").splitlines() if x.strip()]
    by_criterion: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_criterion.setdefault(r["criterion"], []).append(r)

    def answer(first: dict[str, Any], key: str) -> str:
        same = by_criterion[first["criterion"]]
        start = same.index(first)
        ids: list[int] = []
        k = 0
        while len(ids) < response_tokens:  # string answers of the same criterion together, cut at the token count
            ids += tokenizer((" " if ids else "") + same[(start + k) % len(same)][key], add_special_tokens=False)[
                "input_ids"]
            k += 1
        return tokenizer.decode(ids[:response_tokens])

    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "chosen": [{"role": "assistant", "content": answer(r, "positive")}],
             "rejected": [{"role": "assistant", "content": answer(r, "negative")}]}
            for r in (rows[i % len(rows)] for i in range(n))]


def tokenize_like_trl(tokenizer: Any, pair: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """prompt / chosen / rejected token ids as TRL's DPOTrainer makes them (chat template, keep_start)."""
    def ids(messages: list[dict[str, str]], **kw: Any) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    chosen = ids(pair["prompt"] + pair["chosen"])
    rejected = ids(pair["prompt"] + pair["rejected"])
    n = 0
    while n < min(len(prompt), len(chosen), len(rejected)) and prompt[n] == chosen[n] == rejected[n]:
        n += 1
    return {"prompt": prompt[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected sequences, truncated to ``max_length``, right-padded (TRL's DataCollatorForPreference)."""
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            seqs.append((r["prompt"] + r[side])[:max_length])
            masks.append(([0] * len(r["prompt"]) + [1] * len(r[side]))[:max_length])
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        completion[i, :len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of the completion tokens of each sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    token = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(-1)


def plain_torch(hf_path: str, batches: list[dict[str, torch.Tensor]], *, beta: float, lr: float, warmup: int,
                steps: int, precision: Literal["fp32", "bf16"]) -> list[float]:
    """The yardstick: seconds of each timed hand-written DPO step (policy fwd+bwd, reference fwd, AdamW)."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True, dtype=torch.float32)
    policy.train()
    ref.eval()
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    secs = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        with cast():
            logps = sequence_logps(policy, batch)
        with torch.no_grad(), cast():
            ref_logps = sequence_logps(ref, batch)
        pc, pr = logps.chunk(2)
        rc, rr = ref_logps.chunk(2)
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            secs.append(time.perf_counter() - t0)
    del policy, ref, opt
    return secs


def trl_run(pairs: list[dict[str, Any]], *, warmup: int, steps: int, max_length: int,
            batch_size: int, precision: Literal["auto", "fp32", "bf16"]) -> dict[str, Any]:
    """Seconds of each timed ``train_dpo`` step (from ``elapsed_s``), the total and the precision line."""
    tmp = Path(tempfile.mkdtemp(prefix="icon2-bench-train."))
    lines: list[str] = []
    try:
        t0 = time.perf_counter()
        res = train_dpo(pairs, model_source=None, output_dir=tmp / "out", max_steps=warmup + steps,
                        max_length=max_length, batch_size=batch_size, device="cpu", progress=False,
                        precision=precision, log=lines.append)
        total = time.perf_counter() - t0
        elapsed = [0.0] + [r["elapsed_s"] for r in res.history]
        per_step = [b - a for a, b in zip(elapsed, elapsed[1:])]
        cfg = json.loads((res.output_dir / "train_config.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"precision": cfg["precision"], "log": lines, "step_seconds": per_step[warmup:],
            "warmup_seconds": per_step[:warmup], "total_seconds": total, "training_seconds": elapsed[-1],
            "one_time_seconds": total - elapsed[-1]}


def ratios_of(plain: dict[str, float], trl: dict[str, float]) -> dict[str, float]:
    """The benchmark's ratios from per-step seconds of the plain-torch and train_dpo sides."""
    out = {"auto_vs_plain_fp32": trl["auto"] / plain["fp32"], "fp32_vs_plain_fp32": trl["fp32"] / plain["fp32"]}
    if "bf16" in trl:
        out["bf16_vs_plain_fp32"] = trl["bf16"] / plain["fp32"]
        out["train_dpo_bf16_vs_fp32"] = trl["bf16"] / trl["fp32"]
    if "bf16" in plain:
        out["plain_bf16_vs_fp32"] = plain["bf16"] / plain["fp32"]
        if "bf16" in trl:
            out["bf16_vs_plain_bf16"] = trl["bf16"] / plain["bf16"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=24, help="pairs (the demo's count)")
    ap.add_argument("--response-tokens", type=int, default=128, help="tokens of each chosen/rejected answer")
    ap.add_argument("--max-length", type=int, default=PRESETS["demo"]["max_length"])
    ap.add_argument("--batch-size", type=int, default=PRESETS["demo"]["batch_size"])
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--stat", choices=["min", "median"], default="min", help="per-step figure the ratios use")
    ap.add_argument("--with-bf16", action="store_true", help="measure bf16 even on a CPU without native bf16")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)

    env_start = environment(_PACKAGES)
    cpu = cpu_model()
    flags = cpu_bf16_flags()
    auto, reason = choose_precision("cpu")
    model = il.load_model(device="cpu")
    hf_path = model.info.hf_path
    tokenizer = model.tokenizer
    del model
    pairs = build_pairs(tokenizer, args.pairs, args.response_tokens)
    rows = [tokenize_like_trl(tokenizer, p, args.max_length) for p in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [collate(rows[i:i + args.batch_size], pad_id, args.max_length)
               for i in range(0, len(rows), args.batch_size)]
    seq_tokens = [len(r["prompt"]) + len(r["chosen"]) for r in rows]
    demo = PRESETS["demo"]
    print(f"CPU: {cpu} ({env_start['cpus']} CPUs, torch threads {env_start['torch_threads']}); native bf16 flags: "
          f"{', '.join(flags) if flags else 'none'}")
    print(f"auto precision on this CPU: {auto} ({reason})")
    print(f"{args.pairs} pairs, {args.response_tokens} tokens per answer, sequences of {min(seq_tokens)}-"
          f"{max(seq_tokens)} tokens, max_length {args.max_length}, batch {args.batch_size}; "
          f"warm-up {args.warmup}, timed {args.steps} steps ({args.stat} counts)")

    measure_bf16 = bool(flags) or auto == "bf16" or args.with_bf16
    runs: dict[str, dict[str, Any]] = {}
    plain: dict[str, list[float]] = {}
    plain["fp32"] = plain_torch(hf_path, batches, beta=demo["beta"], lr=demo["learning_rate"], warmup=args.warmup,
                                steps=args.steps, precision="fp32")
    runs["auto"] = trl_run(pairs, warmup=args.warmup, steps=args.steps, max_length=args.max_length,
                           batch_size=args.batch_size, precision="auto")
    other = "fp32" if runs["auto"]["precision"] == "bf16" else "bf16"
    if other == "fp32" or measure_bf16:
        runs[other] = trl_run(pairs, warmup=args.warmup, steps=args.steps, max_length=args.max_length,
                              batch_size=args.batch_size, precision=other)
    runs[runs["auto"]["precision"]] = runs["auto"]
    if measure_bf16:
        plain["bf16"] = plain_torch(hf_path, batches, beta=demo["beta"], lr=demo["learning_rate"],
                                    warmup=args.warmup, steps=args.steps, precision="bf16")

    stats = {"min": min, "median": statistics.median}
    per_step = {name: {"plain_torch": {k: f(v) for k, v in plain.items()},
                       "train_dpo": {k: f(runs[k]["step_seconds"]) for k in ("auto", "fp32", "bf16") if k in runs}}
                for name, f in stats.items()}
    all_ratios = {name: ratios_of(v["plain_torch"], v["train_dpo"]) for name, v in per_step.items()}
    ratios = all_ratios[args.stat]
    med_plain = per_step[args.stat]["plain_torch"]
    med_trl = per_step[args.stat]["train_dpo"]
    other_stat = "median" if args.stat == "min" else "min"

    print(runs["auto"]["log"][0] if runs["auto"]["log"] else "")
    alt = per_step[other_stat]
    print(f"  s/step ({args.stat}; {other_stat} in brackets)")
    print(f"  plain torch fp32          {med_plain['fp32']:7.2f}  ({alt['plain_torch']['fp32']:.2f})")
    if "bf16" in med_plain:
        print(f"  plain torch bf16 autocast {med_plain['bf16']:7.2f}  ({alt['plain_torch']['bf16']:.2f})")
    for k in ("fp32", "bf16"):
        if k in runs:
            r = runs[k]
            print(f"  train_dpo {k}{' (auto)' if r is runs['auto'] else '       '}    {med_trl[k]:7.2f}  "
                  f"({alt['train_dpo'][k]:.2f})  + {r['one_time_seconds']:.1f} s once: load, tokenize, save")
    goal = GOALS["step_time_vs_plain_torch"]
    met = ratios["auto_vs_plain_fp32"] <= goal
    print(f"  1. train_dpo (auto = {runs['auto']['precision']}) / plain torch fp32: "
          f"{ratios['auto_vs_plain_fp32']:.2f} (goal <= {goal}) {'met' if met else 'NOT met'}")
    print(f"     with the {other_stat}: {all_ratios[other_stat]['auto_vs_plain_fp32']:.2f}")
    print(f"     train_dpo fp32 / plain torch fp32: {ratios['fp32_vs_plain_fp32']:.2f}")
    verdict = None
    if "train_dpo_bf16_vs_fp32" in ratios:
        print(f"  2. train_dpo bf16 / plain torch fp32: {ratios['bf16_vs_plain_fp32']:.2f}")
        r = ratios["train_dpo_bf16_vs_fp32"]
        verdict = (f"bf16 is SLOWER than fp32 on this CPU ({cpu}): train_dpo bf16 / fp32 = {r:.2f}" if r > 1 else
                   f"bf16 is faster than fp32 on this CPU ({cpu}): train_dpo bf16 / fp32 = {r:.2f}")
        print(f"     {verdict}")
    if "plain_bf16_vs_fp32" in ratios:
        print(f"     plain torch bf16 autocast / fp32: {ratios['plain_bf16_vs_fp32']:.2f}")
    if not measure_bf16:
        print("  2. bf16 not measured: this CPU has no native bf16 (emulated; --with-bf16 measures it anyway)")

    result = {
        "benchmark": "training",
        "cpu_model": cpu,
        "native_bf16_flags": flags,
        "auto_precision": {"precision": auto, "reason": reason},
        "config": {"pairs": args.pairs, "response_tokens": args.response_tokens, "max_length": args.max_length,
                   "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "stat": args.stat,
                   "preset": "demo",
                   "sequence_tokens": [min(seq_tokens), max(seq_tokens)], "model": "embedded SmolLM2-135M-Instruct"},
        "stat": args.stat,
        "step_seconds": per_step,
        "plain_torch_seconds": plain,
        "train_dpo_runs": {k: v for k, v in runs.items() if k != runs["auto"]["precision"]},
        "ratios": ratios,
        "ratios_by_stat": all_ratios,
        "goal_met": met,
        "bf16_verdict": verdict,
        "goals": GOALS,
    }
    result["environment"] = {**env_start, "load_avg_end": environment(())["load_avg"]}
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
