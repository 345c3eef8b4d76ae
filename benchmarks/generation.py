#!/usr/bin/env python
"""Steered-generation benchmark: the fast path against plain HF ``generate``, pair fusion, and the bridge.

One run on the embedded model, the same rendered prompts (built-in instructions, chat template,
no system prompt) for every side, greedy decoding, KV cache, and a fixed number of new tokens per
row (``min_new_tokens = max_new_tokens``, so every side produces the same number of tokens):

1. steered tokens/s (the fast path: HF ``generate`` on ``il.gen.hf_model(model)`` with
   ``il.steer(..., path="hf")`` hooks at the 10 suggested layers, a per-row gamma) / plain HF
   ``generate`` tokens/s (a separate ``model.hf_model()``, default sdpa attention, no hooks), same
   batch. Goal >= 0.95.
2. pairs/s of one fused batch (chosen and rejected rows of ``k`` instructions together, per-row
   gamma, ``il.pairs.generate_steered``) / pairs/s of two sequential passes (``k`` chosen rows, then ``k``
   rejected rows). Goal >= 1.7.
3. tokens/s of the TransformerBridge path (``bridge.generate`` with TransformerLens hooks) / the
   fast path. Reported (the fast path is the default for bulk generation).

Ratios are measured side by side (interleaved repeats, median); absolute seconds depend on the machine.

Run::

    python benchmarks/generation.py                        # a few minutes on 2 CPU cores
    python benchmarks/generation.py --tokens 8 --repeats 1 # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

import icon2_lens as il
from icon2_lens.prompts import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, left_pad, timed, write_result  # noqa: E402

GOALS = {"steered_vs_hf": 0.95, "fused_vs_sequential": 1.7}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "generation.json"
_PACKAGES = ("icon2-lens", "torch", "transformers", "transformer-lens")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="rows per batch for ratios 1 and 3; instructions k for 2")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gamma", type=float, default=0.1, help="relative steering strength")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    env = environment(_PACKAGES)

    model = il.load_model()
    tok = model.tokenizer
    # directions: a small extraction (not timed); steering layers 15-24, the suggested range on SmolLM2
    dirs = il.extract_directions(model, il.DEFAULT_CRITERIA, il.instructions.builtin_instructions()[:16], progress=False)
    layers = list(range(15, 25))
    instr = il.instructions.builtin_instructions("heldout")[: args.batch]
    prompts = [render_chat(tok, q) for q in instr]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    input_ids, mask = left_pad(ids, int(tok.pad_token_id))
    plain = model.hf_model()
    plain.eval()
    fast = il.gen.hf_model(model)
    gen_kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  pad_token_id=int(tok.pad_token_id))
    gammas = [args.gamma if i % 2 == 0 else -args.gamma for i in range(len(ids))]
    crits = [dirs.criteria[i % len(dirs.criteria)] for i in range(len(ids))]

    def run_plain():
        with torch.inference_mode():
            return plain.generate(input_ids, attention_mask=mask, **gen_kw)

    def run_steered():
        with torch.inference_mode(), il.steer(model, dirs, crits, gammas, layers=layers, path="hf"):
            return fast.generate(input_ids, attention_mask=mask, **gen_kw)

    def run_bridge():
        with torch.inference_mode(), il.steer(model, dirs, crits, gammas, layers=layers, path="bridge"):
            return model.bridge.generate(input_ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False,
                                         stop_at_eos=False, use_past_kv_cache=True, return_type="tokens",
                                         verbose=False, prepend_bos=False)

    k = args.batch
    pair_prompts = [render_chat(tok, q) for q in il.instructions.builtin_instructions("heldout")[:k]]
    pcrits = [dirs.criteria[i % len(dirs.criteria)] for i in range(k)]
    common = dict(directions=dirs, layers=layers, max_new_tokens=args.tokens, repetition_penalty=1.1)

    def run_fused():
        return il.pairs.generate_steered(model, pair_prompts + pair_prompts, criteria=pcrits + pcrits,
                                   gammas=[args.gamma] * k + [-args.gamma / 2] * k, **common)

    def run_sequential():
        a = il.pairs.generate_steered(model, pair_prompts, criteria=pcrits, gammas=[args.gamma] * k, **common)
        b = il.pairs.generate_steered(model, pair_prompts, criteria=pcrits, gammas=[-args.gamma / 2] * k, **common)
        return a + b

    sides = {"plain_hf": run_plain, "steered_fast": run_steered, "steered_bridge": run_bridge,
             "fused_pairs": run_fused, "sequential_pairs": run_sequential}
    secs: dict[str, list[float]] = {s: [] for s in sides}
    outs = {}
    run_plain()  # warm-up (first-call allocations)
    for _ in range(args.repeats):
        for name, fn in sides.items():
            s, outs[name] = timed(fn)
            secs[name].append(s)
    med = {k_: statistics.median(v) for k_, v in secs.items()}
    n_tok = len(ids) * args.tokens
    tps = {s: n_tok / med[s] for s in ("plain_hf", "steered_fast", "steered_bridge")}
    pps = {s: k / med[s] for s in ("fused_pairs", "sequential_pairs")}
    # checks that the sides did the same work
    fast_new = outs["steered_fast"][:, input_ids.shape[1]:]
    bridge_new = outs["steered_bridge"][:, input_ids.shape[1]:]
    same_tokens = bool(torch.equal(fast_new.cpu(), bridge_new.cpu()))
    same_pairs = [r["text"] for r in outs["fused_pairs"]] == [r["text"] for r in outs["sequential_pairs"]]
    ratios = {
        "steered_vs_plain_hf": tps["steered_fast"] / tps["plain_hf"],
        "fused_vs_sequential_pairs": pps["fused_pairs"] / pps["sequential_pairs"],
        "bridge_vs_fast": tps["steered_bridge"] / tps["steered_fast"],
    }
    print(f"{len(ids)} rows x {args.tokens} new tokens (greedy, KV cache), steering layers {layers[0]}-{layers[-1]}, "
          f"median of {args.repeats}")
    for s in ("plain_hf", "steered_fast", "steered_bridge"):
        print(f"  {s:18s} {med[s]:7.2f} s  {tps[s]:7.1f} tokens/s")
    for s in ("fused_pairs", "sequential_pairs"):
        print(f"  {s:18s} {med[s]:7.2f} s  {pps[s]:7.2f} pairs/s  ({k} instructions)")
    g1, g2 = GOALS["steered_vs_hf"], GOALS["fused_vs_sequential"]
    r1, r2, r3 = ratios["steered_vs_plain_hf"], ratios["fused_vs_sequential_pairs"], ratios["bridge_vs_fast"]
    print(f"  1. steered fast path / plain HF generate, tokens/s: {r1:.3f} (goal >= {g1}) {'met' if r1 >= g1 else 'NOT met'}")
    print(f"  2. fused pair batch / two sequential passes, pairs/s: {r2:.3f} (goal >= {g2}) {'met' if r2 >= g2 else 'NOT met'}")
    print(f"  3. TransformerBridge hook path / fast path, tokens/s: {r3:.3f}")
    print(f"     fast and bridge paths gave identical tokens: {same_tokens}; fused == sequential texts: {same_pairs}")
    result = {"benchmark": "generation",
              "config": {"rows": len(ids), "new_tokens": args.tokens, "repeats": args.repeats, "gamma": args.gamma,
                         "layers": layers, "pair_instructions": k},
              "median_seconds": med, "all_seconds": secs, "tokens_per_second": tps, "pairs_per_second": pps,
              "ratios": ratios, "goals": GOALS, "fast_equals_bridge_tokens": same_tokens,
              "fused_equals_sequential_texts": same_pairs,
              "environment": {**env, "load_avg_end": environment(())["load_avg"]}}
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
