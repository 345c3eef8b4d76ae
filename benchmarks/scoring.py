#!/usr/bin/env python
"""Scoring benchmark: ``il.score_instructions`` against one plain HF forward pass over the same batches.

One run on the embedded model, same instructions for both (default: the 320 built-in instructions,
all of them unseen by the directions, which are extracted from 8 others beforehand, untimed):

1. scoring throughput (instructions/s) of icon2_lens / that of a plain HF forward pass
   (``AutoModelForCausalLM`` with sdpa attention, ``output_hidden_states=True``) over the same
   rendered texts in the same length-sorted, left-padded batches, followed by the same projection
   math (mean over layers of the standardised ``h . u``, the default, max over criteria). Goal >= 0.95.
   icon2_lens reuses each batch's shared prefix (the chat template's head and default system prompt:
   `icon2_lens.gen.prefix.PrefixReader`); the ratio without it (``reuse_prefix=False``) is shown too.
2. peak RSS increase of scoring 4x the instructions / 1x, each in a fresh subprocess after a
   warm-up batch, with the same length distribution at both sizes (the first 256 built-in
   instructions, repeated). Goal <= 1.1 (scoring streams: memory must not grow with the number of
   instructions).

The figures are ratios measured side by side in one process; absolute seconds depend on the machine.

Run::

    python benchmarks/scoring.py                      # a few minutes on 2 CPU cores
    python benchmarks/scoring.py --n 32 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

import icon2_lens as il
from icon2_lens.prompts import scoring_texts
from icon2_lens.scoring import assign_criteria, consistency_scores, project

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, left_pad, peak_rss_of, run_child, timed, write_result  # noqa: E402

GOALS = {"throughput_vs_hf": 0.95, "memory": 1.1}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "scoring.json"
_PACKAGES = ("icon2-lens", "torch", "transformers", "transformer-lens", "datasets")


def instructions_for(n: int) -> list[str]:
    """``n`` distinct instructions: the built-in ones, then numbered variants of them."""
    base = il.instructions.builtin_instructions("all")
    return [base[i % len(base)] if i < len(base) else f"{base[i % len(base)]} (variant {i // len(base)})"
            for i in range(n)]


def directions_for(model: il.LoadedModel) -> il.DirectionSet:
    """Directions from 8 instructions that are not among the scored ones (distinct by construction)."""
    own = ["Describe a quiet morning in a small town.", "List three uses of a paperclip.",
           "Explain what a prime number is.", "Suggest a name for a bakery.", "How do I boil an egg?",
           "Write a limerick about a cat.", "What causes the seasons?", "Give me a tip for saving money."]
    return il.extract_directions(model, il.DEFAULT_CRITERIA, own, progress=False)


def run_hf(hf, tokenizer, texts: Sequence[str], dirs: il.DirectionSet, batch_size: int) -> torch.Tensor:
    """The yardstick: HF forward passes with output_hidden_states, then the same (standardised) projection math."""
    vectors = dirs.vectors
    n_layers = vectors.shape[1]
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = torch.empty(len(ids), vectors.shape[0])
    # HF's last hidden state has the final norm applied; blocks.{L-1}.hook_resid_post is the block output
    # before it, so the last block's output is taken with a forward hook (same cost).
    last: dict[str, torch.Tensor] = {}
    handle = hf.model.layers[n_layers - 1].register_forward_hook(
        lambda _m, _a, o: last.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[:, -1]))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, mask = left_pad([ids[i] for i in rows], int(tokenizer.pad_token_id))
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.inference_mode():
                out = hf(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         output_hidden_states=True)
            h = torch.stack([out.hidden_states[layer + 1][:, -1] for layer in range(n_layers - 1)] + [last["h"]],
                            1).float()
            scores[rows] = consistency_scores(project(h, vectors), mean=dirs.stats["proj_mean"],
                                              std=dirs.stats["proj_std"])
            del out
    finally:
        handle.remove()
    return scores


def memory_child(n: int, batch_size: int) -> None:
    """Peak RSS increase of scoring ``n`` instructions, after a warm-up that primes the allocator.

    The instructions are the first 256 built-in ones repeated, so 1x and 4x have the same length
    distribution (longer prompts would need more activation memory per batch, which is not what is
    measured here); the warm-up scores one batch of the longest of them, so the baseline already
    holds the allocator's per-batch working set and the delta shows what grows with ``n``.
    """
    model = il.load_model()
    dirs = directions_for(model)
    base = il.instructions.builtin_instructions("all")[:256]
    instr = (base * (n // len(base) + 1))[:n]
    longest = sorted(base, key=len)[-batch_size:]
    il.score_instructions(model, dirs, longest, batch_size=batch_size, progress=False)
    res = peak_rss_of(lambda: il.score_instructions(model, dirs, instr, batch_size=batch_size, progress=False))
    print("MEMORY_RESULT " + json.dumps({"n_instructions": n, **res}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=320, help="instructions scored for the throughput ratio")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (median)")
    ap.add_argument("--mem-n", type=int, default=256, help="instructions at 1x for the memory ratio (4x is 4 times)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.batch_size)
        return 0

    env_start = environment(_PACKAGES)
    model = il.load_model()
    hf = model.hf_model()  # separate plain HF model, sdpa attention
    hf.eval()
    dirs = directions_for(model)
    instr = instructions_for(args.n)
    texts = scoring_texts(model.tokenizer, instr)  # the same rendering icon2_lens uses by default

    def ours():
        return il.score_instructions(model, dirs, instr, batch_size=args.batch_size, progress=False)

    def theirs():
        return run_hf(hf, model.tokenizer, texts, dirs, args.batch_size)

    def ours_full():  # without prefix reuse: full prompts through the bridge's hook points
        return il.score_instructions(model, dirs, instr, batch_size=args.batch_size, progress=False,
                                     reuse_prefix=False)

    secs = {"icon2_lens": [], "hf_forward": [], "icon2_lens_full": []}
    table = hf_scores = None
    for _ in range(args.repeats):  # interleaved, so background load hits all alike
        s, table = timed(ours)
        secs["icon2_lens"].append(s)
        s, hf_scores = timed(theirs)
        secs["hf_forward"].append(s)
        s, _ = timed(ours_full)
        secs["icon2_lens_full"].append(s)
    med = {k: statistics.median(v) for k, v in secs.items()}
    ours_scores = torch.tensor([table[f"score_{c}"] for c in dirs.criteria]).T
    agree = {
        "max_abs_score_diff": float((ours_scores - hf_scores).abs().max()),
        "criterion_agreement": float((assign_criteria(ours_scores)[1] == assign_criteria(hf_scores)[1]).float().mean()),
    }
    throughput_ratio = (args.n / med["icon2_lens"]) / (args.n / med["hf_forward"])
    full_ratio = med["hf_forward"] / med["icon2_lens_full"]
    result = {
        "benchmark": "scoring",
        "config": {"n_instructions": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
                   "criteria": list(dirs.criteria), "layers": "all", "render": "chat", "standardize": True,
                   "mem_n_1x": args.mem_n, "mem_n_4x": 4 * args.mem_n},
        "median_seconds": med,
        "all_seconds": secs,
        "instructions_per_second": {k: args.n / v for k, v in med.items()},
        "throughput_ratio": throughput_ratio,
        "throughput_ratio_without_prefix_reuse": full_ratio,
        "agreement": agree,
        "goals": GOALS,
    }
    print(f"scoring {args.n} instructions, batch {args.batch_size}, median of {args.repeats}")
    print(f"  icon2_lens  {med['icon2_lens']:7.2f} s  {args.n / med['icon2_lens']:6.1f} instr/s")
    print(f"  HF forward  {med['hf_forward']:7.2f} s  {args.n / med['hf_forward']:6.1f} instr/s")
    print(f"  1. throughput icon2_lens / HF forward: {throughput_ratio:.3f} (goal >= {GOALS['throughput_vs_hf']}) "
          f"{'met' if throughput_ratio >= GOALS['throughput_vs_hf'] else 'NOT met'}")
    print(f"     without prefix reuse (reuse_prefix=False, the bridge) / HF forward: {full_ratio:.3f} [transparency]")
    print(f"     agreement: max |score diff| {agree['max_abs_score_diff']:.2e}, "
          f"same criterion {agree['criterion_agreement']:.3f}")
    if not args.skip_memory:
        script = str(Path(__file__).resolve())
        m1 = run_child([sys.executable, script, "--memory-child", str(args.mem_n), "--batch-size", str(args.batch_size)])
        m4 = run_child([sys.executable, script, "--memory-child", str(4 * args.mem_n), "--batch-size",
                        str(args.batch_size)])
        ratio = m4["peak_delta"] / m1["peak_delta"]
        result["memory"] = {"1x": m1, "4x": m4, "delta_ratio": ratio, "total_ratio": m4["peak_rss"] / m1["peak_rss"]}
        mib = 2 ** 20
        for key, m in (("1x", m1), ("4x", m4)):
            print(f"  memory {key}: n={m['n_instructions']:5d}  peak delta {m['peak_delta'] / mib:7.1f} MiB  "
                  f"({m['seconds']:.1f} s)")
        print(f"  2. peak RSS increase 4x / 1x: {ratio:.3f} (goal <= {GOALS['memory']}) "
              f"{'met' if ratio <= GOALS['memory'] else 'NOT met'}")
        print(f"     total peak RSS 4x / 1x (model included): {m4['peak_rss'] / m1['peak_rss']:.3f}")
    result["environment"] = {**env_start, "load_avg_end": environment(())["load_avg"]}
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
