#!/usr/bin/env python
"""Extraction benchmark: icon2_lens against a plain HF forward pass and two peer libraries.

One run, same stimuli for everyone: criteria x {positive, negative} x instructions, rendered with
``icon2_lens.prompts.stimulus_texts`` (default: 4 criteria x 32 built-in instructions = 256
prompts) on the embedded model ``il.load_model()``. It prints and writes (``--json``):

1. ``il.extract_directions`` time / one plain HF forward pass with ``output_hidden_states=True``
   over the same batches (same length-sorted, left-padded pos+neg batches, last-token reads at every
   layer, same direction math). Goal <= 0.6 (issue 14: the shared system-prompt prefix is computed
   once per batch). Also shown: the same without prefix reuse (``reuse_prefix=False``, the bridge),
   and the ratio against HF's base model without lm_head (``hf.model(...)``).
2. extraction time / the faster of steering-vectors' ``train_steering_vector`` and repeng's
   ``ControlVector.train`` on the same prompt strings. Goal <= 1.0.
3. peak RSS increase of an extraction on 4x the instructions with the default storage / with the
   ``d_model x d_model`` Gram accumulator (``storage="gram"``), each in a fresh subprocess
   (``--memory-child N``). Goal <= 1.0 (issue 14: never more than the Gram form). Also shown: 4x / 1x
   for both (the Gram form is flat in the instructions; the default keeps the rows, 2 x n x layers x
   d_model floats per criterion, while n < d_model, so it grows until it would reach the Gram form;
   the goal was 4x / 1x <= 1.2 before issue 14).
4. ``--synthetic`` (no model, issue 14): peak RSS increase of streaming random activations of a
   Llama-3-8B shape (L 32, d 4096, n 1,024 pairs, 4 criteria) through the contrast accumulators and
   finishing the directions / the bytes of the pair differences themselves. Goal <= 2. The Gram
   form is computed at that shape and measured beside the rows form at a smaller one.

The figures are ratios measured side by side in one process; absolute seconds depend on the machine.

Peers (benchmark only, not library dependencies)::

    pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0 && pip install scikit-learn

Run::

    python benchmarks/extraction.py                     # full default (a few minutes on 2 CPU cores)
    python benchmarks/extraction.py --n 4 --repeats 1   # smoke test
    python benchmarks/extraction.py --synthetic         # accumulator memory, no model (several minutes)
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # peers draw progress bars; read by tqdm at import

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import icon2_lens as il
from icon2_lens.prompts import stimulus_texts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, left_pad, peak_rss_of, run_child, timed, write_result  # noqa: E402

_PACKAGES = ("icon2-lens", "torch", "transformers", "transformer-lens", "steering-vectors", "repeng", "scikit-learn",
             "numpy")

GOALS = {"vs_hf": 0.6, "vs_peer": 1.0, "memory": 1.0}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "extraction.json"


# ---------------------------------------------------------------------------------------------
# stimuli
# ---------------------------------------------------------------------------------------------
def build_stimuli(tokenizer: Any, criteria: Sequence[il.Criterion], instructions: Sequence[str]) -> list[dict]:
    """Per criterion: rendered positive and negative prompts (same order as ``instructions``)."""
    return [
        {
            "name": c.name,
            "pos": stimulus_texts(tokenizer, c.positive, instructions),
            "neg": stimulus_texts(tokenizer, c.negative, instructions),
        }
        for c in criteria
    ]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def _directions(diffs: torch.Tensor, method: str) -> torch.Tensor:
    """``diffs`` [n, L, d] -> unit directions [L, d] (mean difference or uncentred PCA)."""
    mean = diffs.double().mean(0)
    if method == "mean_diff":
        return _unit(mean).float()
    # uncentred PCA: top right-singular vector of the differences, per layer (batched SVD)
    _, _, vh = torch.linalg.svd(diffs.transpose(0, 1).double(), full_matrices=False)
    v = vh[:, 0, :]
    sign = torch.sign((v * mean).sum(-1, keepdim=True))
    return (v * sign).float()


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------
def run_icon2(model: il.LoadedModel, criteria, instructions, batch_size: int, method: str,
              reuse_prefix: bool = True) -> torch.Tensor:
    dirs = il.extract_directions(model, criteria, list(instructions), batch_size=batch_size, method=method,
                                 progress=False, reuse_prefix=reuse_prefix)
    return dirs.vectors


def run_hf(forward: Callable[..., Any], tokenizer: Any, stimuli: list[dict], n_layers: int, batch_size: int,
           method: str) -> torch.Tensor:
    """The yardstick: plain HF forward passes over icon2_lens's batches, plus the direction math.

    For each criterion: instructions sorted by tokenised length, chunks of ``batch_size // 2``,
    positive and negative prompts in one left-padded batch with attention mask (and the matching
    position ids), ``hidden_states[l + 1][:, -1]`` for every layer.
    """
    pairs = max(1, batch_size // 2)
    pad_id = int(tokenizer.pad_token_id)
    out = []
    for s in stimuli:
        pos = tokenizer(s["pos"], add_special_tokens=False)["input_ids"]
        neg = tokenizer(s["neg"], add_special_tokens=False)["input_ids"]
        order = sorted(range(len(pos)), key=lambda i: len(pos[i]) + len(neg[i]))
        diffs: torch.Tensor | None = None
        for start in range(0, len(order), pairs):
            idx = order[start:start + pairs]
            input_ids, mask = left_pad([pos[i] for i in idx] + [neg[i] for i in idx], pad_id)
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.inference_mode():
                res = forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                              output_hidden_states=True)
            h = torch.stack([res.hidden_states[layer + 1][:, -1] for layer in range(n_layers)], 1).float()
            if diffs is None:
                diffs = torch.empty(len(pos), n_layers, h.shape[-1])
            k = len(idx)
            diffs[idx] = h[:k] - h[k:]
            del res
        out.append(_directions(diffs, method))
    return torch.stack(out)


def run_steering_vectors(hf: Any, tokenizer: Any, stimuli: list[dict], batch_size: int, method: str) -> torch.Tensor:
    from steering_vectors import train_steering_vector
    from steering_vectors.aggregators import mean_aggregator, pca_aggregator

    agg = pca_aggregator() if method.startswith("pca") else mean_aggregator()
    out = []
    for s in stimuli:
        sv = train_steering_vector(hf, tokenizer, list(zip(s["pos"], s["neg"])), layers=None,
                                   read_token_index=-1, batch_size=batch_size, aggregator=agg,
                                   show_progress=False)
        out.append(_unit(torch.stack([sv.layer_activations[k] for k in sorted(sv.layer_activations)])))
    return torch.stack(out)


def run_repeng(hf: Any, tokenizer: Any, stimuli: list[dict], n_layers: int, batch_size: int) -> torch.Tensor:
    import numpy

    if not hasattr(numpy, "float_"):
        numpy.float_ = numpy.float64  # repeng 0.4.0 uses the NumPy-1 alias
    from repeng import ControlVector, DatasetEntry

    out = []
    for s in stimuli:
        data = [DatasetEntry(positive=p, negative=n) for p, n in zip(s["pos"], s["neg"])]
        cv = ControlVector.train(hf, tokenizer, data, hidden_layers=list(range(n_layers)), batch_size=batch_size,
                                 method="pca_diff")
        out.append(_unit(torch.stack([torch.from_numpy(cv.directions[k]) for k in range(n_layers)])))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# memory child
# ---------------------------------------------------------------------------------------------
def memory_child(n: int, batch_size: int, method: str, storage: str = "auto") -> None:
    """Load the model, then report the peak RSS of one extraction on ``n`` instructions (JSON line)."""
    model = il.load_model()
    instructions = il.instructions.builtin_instructions()[:n]
    if len(instructions) < n:
        raise SystemExit(f"only {len(instructions)} built-in instructions; asked for {n}")
    res = peak_rss_of(lambda: il.extract_directions(model, il.DEFAULT_CRITERIA, instructions, batch_size=batch_size,
                                                     method=method, progress=False, storage=storage))
    print("MEMORY_RESULT " + json.dumps({"n_instructions": n, "storage": storage, **res}), flush=True)


def measure_memory(n: int, batch_size: int, method: str, storage: str = "auto") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n), "--batch-size", str(batch_size),
           "--method", method, "--memory-storage", storage]
    return run_child(cmd)


# ---------------------------------------------------------------------------------------------
# synthetic accumulator memory (issue 14 item 4): no model, random activations at a given shape
# ---------------------------------------------------------------------------------------------
SYNTHETIC_GOAL = 2.0  # peak RSS increase / bytes of the pair differences themselves (n x L x d float32 x criteria)
DEFAULT_SYNTHETIC_JSON = Path(__file__).resolve().parent / "results" / "extraction_synthetic.json"


def synthetic_child(storage: str, n_layers: int, d_model: int, n: int, n_criteria: int, batch: int, method: str,
                    save: str | None, dtype: str = "float32") -> None:
    """Stream random pairs through one accumulator per criterion, finish the directions, report peak RSS (JSON)."""
    from icon2_lens.math.contrast import ContrastAccumulator, finish_directions

    gen = torch.Generator().manual_seed(0)
    planted = torch.nn.functional.normalize(torch.randn(n_criteria, n_layers, d_model, generator=gen), dim=-1)
    out: dict[str, Any] = {}

    act_dtype = getattr(torch, dtype)  # the dtype a model computed the activations in (bfloat16: an 8B model on GPU)

    def work() -> None:
        accs = [ContrastAccumulator(n_layers, d_model, capacity=n, storage=storage, rows_dtype=act_dtype)
                for _ in range(n_criteria)]
        t0 = time.perf_counter()
        for s in range(0, n, batch):  # every batch goes to every criterion, so all four grow together
            b = min(batch, n - s)
            for c, acc in enumerate(accs):
                neg = torch.randn(b, n_layers, d_model, generator=gen)
                pos = neg + (2 + torch.rand(b, 1, 1, generator=gen)) * planted[c] \
                    + 0.5 * torch.randn(b, n_layers, d_model, generator=gen)
                if act_dtype != torch.float32:  # values a 16-bit model produces (the readers pass them as float32)
                    pos, neg = pos.to(act_dtype).float(), neg.to(act_dtype).float()
                acc.update(pos, neg)
                del pos, neg
        out["stream_seconds"] = time.perf_counter() - t0
        out["forms"] = [a.form for a in accs]
        out["state_bytes"] = sum(a.nbytes() for a in accs)
        t0 = time.perf_counter()
        vecs, _ = finish_directions(accs, method)
        out["finish_seconds"] = time.perf_counter() - t0
        out["planted_cos_min"] = float((vecs * planted).sum(-1).abs().min())
        if save:
            torch.save(vecs, save)

    res = peak_rss_of(work)
    print("MEMORY_RESULT " + json.dumps({**res, **out}), flush=True)


def _synthetic_run(storage: str, n_layers: int, d_model: int, n: int, n_criteria: int, batch: int, method: str,
                   save: Path | None, dtype: str = "float32") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--synthetic-child", storage,
           "--synthetic-layers", str(n_layers), "--synthetic-d", str(d_model), "--synthetic-n", str(n),
           "--synthetic-criteria", str(n_criteria), "--synthetic-batch", str(batch), "--method", method,
           "--synthetic-dtype", dtype]
    if save is not None:
        cmd += ["--synthetic-save", str(save)]
    print(f"  running storage={storage} L={n_layers} d={d_model} n={n} in a fresh subprocess ...", flush=True)
    res = run_child(cmd)
    diffs = n * n_layers * d_model * 4 * n_criteria
    res.update({"storage": storage, "activation_dtype": dtype, "n_layers": n_layers, "d_model": d_model, "n": n, "criteria": n_criteria,
                "differences_bytes": diffs, "peak_over_differences": res["peak_delta"] / diffs,
                "state_over_differences": res["state_bytes"] / diffs, "measured": True})
    return res


def run_synthetic(args: argparse.Namespace) -> int:
    """The ``--synthetic`` benchmark: accumulator memory at a large shape against the differences themselves."""
    import tempfile

    from icon2_lens.hardware import cpu_name

    L, d, n, C, B = (args.synthetic_layers, args.synthetic_d, args.synthetic_n, args.synthetic_criteria,
                     args.synthetic_batch)
    yL, yd = args.yardstick_layers, args.yardstick_d
    mib = 1024 ** 2
    print(f"synthetic accumulator memory (random activations, no model): L={L} d={d} n={n} pairs, {C} criteria, "
          f"batch {B} pairs, method {args.method}, activations computed in {args.synthetic_dtype}", flush=True)
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; load avg {os.getloadavg()}", flush=True)
    t_start = time.perf_counter()
    runs = [_synthetic_run("auto", L, d, n, C, B, args.method, None, args.synthetic_dtype)]
    diffs_full = n * L * d * 4 * C
    gram_full_state = C * (2 * L * d * d * 4 + 2 * L * d * 8 + 2 * L * 8)  # two float32 Grams + float64 sums
    computed = {"storage": "gram", "n_layers": L, "d_model": d, "n": n, "criteria": C, "measured": False,
                "state_bytes": gram_full_state, "state_over_differences": gram_full_state / diffs_full,
                "differences_bytes": diffs_full}
    cos_min = None
    if not args.skip_yardstick:
        with tempfile.TemporaryDirectory() as tmp:
            rows_y = _synthetic_run("rows", yL, yd, n, C, B, args.method, Path(tmp) / "rows.pt")
            gram_y = _synthetic_run("gram", yL, yd, n, C, B, args.method, Path(tmp) / "gram.pt")
            a, b = torch.load(Path(tmp) / "rows.pt"), torch.load(Path(tmp) / "gram.pt")
            cos_min = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
        runs += [rows_y, gram_y]
    total = time.perf_counter() - t_start

    print()
    print(f"{'storage':<8s} {'shape':<14s} {'form':<5s} {'state MiB':>10s} {'x diffs':>8s} {'peak RSS +MiB':>14s} "
          f"{'x diffs':>8s} {'seconds':>8s}  how")
    print("-" * 96)
    for r in runs:
        form = r["forms"][0]
        print(f"{r['storage']:<8s} L{r['n_layers']} d{r['d_model']:<7d} {form:<5s} {r['state_bytes'] / mib:10.1f} "
              f"{r['state_over_differences']:8.3f} {r['peak_delta'] / mib:14.1f} {r['peak_over_differences']:8.3f} "
              f"{r['seconds']:8.1f}  measured (fresh subprocess, RSS sampled every 5 ms)")
    print(f"{'gram':<8s} L{L} d{d:<7d} {'gram':<5s} {gram_full_state / mib:10.1f} "
          f"{computed['state_over_differences']:8.3f} {'-':>14s} {'-':>8s} {'-':>8s}  computed (2 x L x d^2 float32 "
          f"+ sums, x {C}), not run at this shape")
    print(f"\ndifferences themselves at L={L} d={d}: n x L x d x 4 B x {C} criteria = {diffs_full / mib:.1f} MiB")
    if cos_min is not None:
        print(f"rows vs gram directions at the yardstick shape L={yL} d={yd}: min cosine {cos_min:.7f}")
    main_run = runs[0]
    ok = main_run["peak_over_differences"] <= SYNTHETIC_GOAL
    print(f"\n{'ratio':<64s} {'value':>7s} {'goal':>7s}  met")
    print("-" * 84)
    label = f"peak RSS increase / differences (storage auto, L{L} d{d} n{n})"
    print(f"{label:<64s} "
          f"{main_run['peak_over_differences']:7.3f} {'<= ' + str(SYNTHETIC_GOAL):>7s}  {'yes' if ok else 'NO'}")
    print(f"{'   accumulator state / differences [transparency]':<64s} {main_run['state_over_differences']:7.3f}")
    print(f"{'   gram state / differences, computed [yardstick]':<64s} {computed['state_over_differences']:7.3f}")
    print(f"\ntotal {total:.0f} s; load avg at end {os.getloadavg()}")
    result = {
        "benchmark": "extraction_synthetic",
        "config": {"n_layers": L, "d_model": d, "n_pairs": n, "criteria": C, "batch_pairs": B, "method": args.method,
                   "activation_dtype": args.synthetic_dtype,
                   "yardstick_layers": yL, "yardstick_d": yd},
        "ratios": [{"ratio": "peak RSS increase / differences (storage auto)",
                    "value": main_run["peak_over_differences"], "goal": SYNTHETIC_GOAL, "met": ok},
                   {"ratio": "accumulator state / differences", "value": main_run["state_over_differences"],
                    "goal": None, "met": None},
                   {"ratio": "gram state / differences (computed)", "value": computed["state_over_differences"],
                    "goal": None, "met": None}],
        "runs": runs,
        "gram_full_shape_computed": computed,
        "rows_vs_gram_min_cosine_at_yardstick": cos_min,
        "notes": [
            "Random activations (a planted direction per criterion plus noise), no model: only the accumulators.",
            "Each run in a fresh subprocess; peak RSS increase over the RSS after imports, before any allocation, "
            "sampled every 5 ms; includes the random batches and the finishing (directions and statistics).",
            f"The Gram form at L={L} d={d} ({gram_full_state / 2**30:.1f} GiB for {C} criteria) is computed, not run; "
            f"both forms are measured side by side at the yardstick shape L={yL} d={yd}.",
        ],
        "environment": {**environment(("icon2-lens", "torch")), "cpu": cpu_name(), "load_avg_end": os.getloadavg()},
        "total_seconds": total,
    }
    write_result(args.synthetic_json, result)
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cosine| per criterion and layer (sign conventions of peers may differ)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).abs()


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="instructions per criterion (default 32 -> 256 prompts)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    ap.add_argument("--method", choices=["pca", "mean_diff"], default="pca", help="direction method (default pca)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the median is used")
    ap.add_argument("--mem-n", type=int, default=64, help="1x instructions for the memory test (4x = 4 * this)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--skip-peers", action="store_true", help="skip steering-vectors and repeng")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-storage", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--synthetic", action="store_true",
                    help="only the synthetic accumulator-memory run (random activations, no model)")
    ap.add_argument("--synthetic-layers", type=int, default=32, help="synthetic: layers (default 32)")
    ap.add_argument("--synthetic-d", type=int, default=4096, help="synthetic: d_model (default 4096)")
    ap.add_argument("--synthetic-n", type=int, default=1024, help="synthetic: pairs per criterion (default 1024)")
    ap.add_argument("--synthetic-criteria", type=int, default=4, help="synthetic: criteria (default 4)")
    ap.add_argument("--synthetic-batch", type=int, default=16, help="synthetic: pairs per update (default 16)")
    ap.add_argument("--yardstick-layers", type=int, default=8, help="synthetic: layers of the rows-vs-gram run (8)")
    ap.add_argument("--yardstick-d", type=int, default=2048, help="synthetic: d_model of the rows-vs-gram run (2048)")
    ap.add_argument("--skip-yardstick", action="store_true", help="synthetic: skip the rows-vs-gram run")
    ap.add_argument("--synthetic-json", type=Path, default=DEFAULT_SYNTHETIC_JSON,
                    help=f"synthetic result file (default {DEFAULT_SYNTHETIC_JSON})")
    ap.add_argument("--synthetic-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="synthetic: the dtype the activations were computed in (bfloat16: an 8B model on a GPU; "
                         "the rows form keeps the positives in it, losslessly); default float32")
    ap.add_argument("--synthetic-child", choices=["auto", "rows", "gram"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic-save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_child is not None:
        memory_child(args.memory_child, args.batch_size, args.method, args.memory_storage)
        return 0
    if args.synthetic_child is not None:
        synthetic_child(args.synthetic_child, args.synthetic_layers, args.synthetic_d, args.synthetic_n,
                        args.synthetic_criteria, args.synthetic_batch, args.method, args.synthetic_save,
                        args.synthetic_dtype)
        return 0
    if args.synthetic:
        return run_synthetic(args)

    t_start = time.perf_counter()
    load_at_start = os.getloadavg()
    print(f"torch threads={torch.get_num_threads()}  cpus={os.cpu_count()}  load avg={load_at_start}", flush=True)
    model = il.load_model()
    hf = model.hf_model()
    hf.eval()
    tok = model.tokenizer
    criteria = list(il.DEFAULT_CRITERIA)
    instructions = il.instructions.builtin_instructions()[: args.n]
    stimuli = build_stimuli(tok, criteria, instructions)
    warm_stimuli = build_stimuli(tok, criteria[:1], instructions[:2])
    L = model.n_layers
    B = args.batch_size
    sv_batch = max(1, B // 2)  # pairs per call: one pos pass + one neg pass of B//2 prompts each
    n_prompts = 2 * len(criteria) * len(instructions)
    print(f"model={model.info.model_id} layers={L} d_model={model.d_model}  criteria={len(criteria)} "
          f"instructions={len(instructions)} prompts={n_prompts} batch={B} method={args.method} "
          f"repeats={args.repeats}", flush=True)

    methods: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "icon2_lens": (lambda: run_icon2(model, criteria, instructions, B, args.method),
                       lambda: run_icon2(model, criteria[:1], instructions[:2], B, args.method)),
        "icon2_lens_full": (lambda: run_icon2(model, criteria, instructions, B, args.method, reuse_prefix=False),
                            lambda: run_icon2(model, criteria[:1], instructions[:2], B, args.method,
                                              reuse_prefix=False)),
        "hf_causallm": (lambda: run_hf(hf, tok, stimuli, L, B, args.method),
                        lambda: run_hf(hf, tok, warm_stimuli, L, B, args.method)),
        "hf_base": (lambda: run_hf(hf.model, tok, stimuli, L, B, args.method),
                    lambda: run_hf(hf.model, tok, warm_stimuli, L, B, args.method)),
    }
    if not args.skip_peers:
        methods["steering_vectors"] = (lambda: run_steering_vectors(hf, tok, stimuli, sv_batch, args.method),
                                       lambda: run_steering_vectors(hf, tok, warm_stimuli, sv_batch, args.method))
        methods["repeng"] = (lambda: run_repeng(hf, tok, stimuli, L, B),
                             lambda: run_repeng(hf, tok, warm_stimuli, L, B))

    errors: dict[str, str] = {}
    for name, (_, warm) in list(methods.items()):
        try:
            warm()
        except Exception as exc:  # a peer that does not run on this stack
            if name in ("icon2_lens", "icon2_lens_full", "hf_causallm", "hf_base"):
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] failed in warm-up, left out: {errors[name]}", flush=True)
            traceback.print_exc(limit=3)
            del methods[name]

    times: dict[str, list[float]] = {k: [] for k in methods}
    vectors: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
        for name, (fn, _) in methods.items():
            if name in errors:
                continue
            try:
                secs, vecs = timed(fn)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                print(f"[{name}] failed, left out: {errors[name]}", flush=True)
                continue
            times[name].append(secs)
            vectors[name] = vecs
            print(f"  repeat {r + 1}/{args.repeats}  {name:<17s} {secs:7.2f} s", flush=True)
    times = {k: v for k, v in times.items() if v and k not in errors}
    med = {k: statistics.median(v) for k, v in times.items()}

    # agreement with icon2_lens (|cosine|, mean over criteria, layers 0..L-2: HF's last hidden state is post-norm)
    agree = {}
    for name, vecs in vectors.items():
        if name != "icon2_lens" and vecs.shape == vectors["icon2_lens"].shape:
            c = _cos(vectors["icon2_lens"], vecs)[:, : L - 1]
            agree[name] = {"mean_cos": round(float(c.mean()), 4), "min_cos": round(float(c.min()), 4)}

    t_icon = med["icon2_lens"]
    r_hf = t_icon / med["hf_causallm"]
    r_base = t_icon / med["hf_base"]
    r_full = med["icon2_lens_full"] / med["hf_causallm"]
    r_reuse = t_icon / med["icon2_lens_full"]
    peers = {k: med[k] for k in ("steering_vectors", "repeng") if k in med}
    best_peer = min(peers, key=peers.get) if peers else None
    r_peer = t_icon / peers[best_peer] if best_peer else None

    mem: dict[str, Any] = {}
    if not args.skip_memory:
        print(f"memory: fresh subprocesses with {args.mem_n} and {4 * args.mem_n} instructions ...", flush=True)
        m1 = measure_memory(args.mem_n, B, args.method)
        m4 = measure_memory(4 * args.mem_n, B, args.method)
        g1 = measure_memory(args.mem_n, B, args.method, "gram")
        g4 = measure_memory(4 * args.mem_n, B, args.method, "gram")
        mem = {"1x": m1, "4x": m4, "gram_1x": g1, "gram_4x": g4,
               "auto_over_gram_4x": m4["peak_delta"] / g4["peak_delta"],
               "delta_ratio": m4["peak_delta"] / m1["peak_delta"],
               "gram_delta_ratio": g4["peak_delta"] / g1["peak_delta"],
               "total_ratio": m4["peak_rss"] / m1["peak_rss"]}

    # ---- table ----
    mib = 1024 ** 2
    rows = [
        ("1. icon2_lens (prefix reuse) / HF forward over the full prompts", r_hf, GOALS["vs_hf"]),
        ("   icon2_lens / HF base model (no lm_head) [transparency]", r_base, None),
        ("   icon2_lens without prefix reuse (bridge) / HF forward [transparency]", r_full, None),
        ("   icon2_lens prefix reuse / without [transparency]", r_reuse, None),
        (f"2. icon2_lens / fastest peer ({best_peer})", r_peer, GOALS["vs_peer"]),
    ]
    if mem:
        rows.append((f"3. peak RSS increase at {4 * args.mem_n} instructions, default / storage='gram'",
                     mem["auto_over_gram_4x"], GOALS["memory"]))
        rows.append((f"   peak RSS increase {4 * args.mem_n} / {args.mem_n}, default (rows) [transparency]",
                     mem["delta_ratio"], None))
        rows.append((f"   peak RSS increase {4 * args.mem_n} / {args.mem_n}, storage='gram' [transparency]",
                     mem["gram_delta_ratio"], None))
        rows.append(("   total peak RSS ratio 4x / 1x, default [transparency]", mem["total_ratio"], None))
    print()
    print(f"{'median seconds over ' + str(len(times['icon2_lens'])) + ' repeats':<62s}")
    for k, v in med.items():
        extra = f"  (all: {', '.join(f'{x:.2f}' for x in times[k])})"
        print(f"  {k:<20s} {v:8.2f} s{extra}")
    for name, msg in errors.items():
        print(f"  {name:<20s} FAILED: {msg}")
    if agree:
        print("agreement with icon2_lens directions (|cos|, layers 0..L-2):",
              ", ".join(f"{k} mean {v['mean_cos']:.3f} min {v['min_cos']:.3f}" for k, v in agree.items()))
    if mem:
        for key in ("1x", "4x", "gram_1x", "gram_4x"):
            m = mem[key]
            print(f"  memory {key}: n={m['n_instructions']:4d}  baseline {m['baseline_rss'] / mib:7.1f} MiB  "
                  f"peak {m['peak_rss'] / mib:7.1f} MiB  delta {m['peak_delta'] / mib:7.1f} MiB  "
                  f"({m['seconds']:.1f} s)")
    print()
    print(f"{'ratio':<64s} {'value':>7s} {'goal':>7s}  met")
    print("-" * 84)
    results_rows = []
    for label, val, goal in rows:
        ok = None if goal is None or val is None else val <= goal
        print(f"{label:<64s} {_fmt_ratio(val):>7s} {('<= ' + str(goal)) if goal else '':>7s}  "
              f"{'' if ok is None else ('yes' if ok else 'NO')}")
        results_rows.append({"ratio": label.strip(), "value": val, "goal": goal, "met": ok})
    total = time.perf_counter() - t_start
    print(f"\ntotal benchmark time {total:.0f} s; load avg at start {load_at_start}, at end {os.getloadavg()}")

    notes = [
        "Ratios are the figure; seconds depend on the machine.",
        "HF yardstick: model.hf_model() (sdpa attention), icon2_lens's batches (length-sorted, B//2 pairs, pos+neg "
        "in one left-padded batch, position ids from the mask), hidden_states[l+1][:, -1], batched SVD (pca) or "
        "mean (mean_diff). Texts are rendered once beforehand; tokenisation is timed.",
        "icon2_lens timing includes chat rendering, tokenisation, and its streaming statistics.",
        "icon2_lens (default) reuses each batch's shared prefix (the criterion's system prompt and the chat "
        "template's head): it is run once for one row and its KV cache is repeated for the batch "
        "(icon2_lens.gen.prefix.PrefixReader, the plain HF model sharing the bridge's weights); positive and "
        "negative prompts run as two passes of B//2 rows. icon2_lens_full: reuse_prefix=False, full prompts "
        "through the bridge's hook points, pos+neg in one batch (the previous default).",
        f"steering-vectors: batch_size={sv_batch} pairs (a positive and a negative forward pass of {sv_batch} "
        "prompts each per batch), tokenizer padding side as loaded (right), read_token_index=-1 = last non-pad "
        "token (adjust_read_indices_for_padding), output of each decoder block, "
        f"{'pca_aggregator' if args.method.startswith('pca') else 'mean_aggregator'}; full CausalLM forward (logits).",
        f"repeng: batch_size={B} prompts (pos/neg interleaved), hidden_layers=all {L}, method=pca_diff "
        "(sklearn PCA, centred), last non-pad token, full CausalLM forward with output_hidden_states.",
        "Memory: fresh subprocess per size, RSS sampled every 5 ms in a thread, delta over post-load RSS.",
    ]
    result = {
        "benchmark": "extraction",
        "config": {"n_instructions": len(instructions), "criteria": [c.name for c in criteria],
                   "n_prompts": n_prompts, "batch_size": B, "method": args.method, "repeats": args.repeats,
                   "mem_n_1x": args.mem_n, "mem_n_4x": 4 * args.mem_n, "steering_vectors_batch_size": sv_batch,
                   "repeng_batch_size": B},
        "ratios": results_rows,
        "ratio_values": {"icon2_over_hf_causallm": r_hf, "icon2_over_hf_base": r_base,
                         "icon2_full_prompts_over_hf_causallm": r_full, "prefix_reuse_over_full": r_reuse,
                         "icon2_over_best_peer": r_peer, "best_peer": best_peer,
                         "memory_delta_4x_over_1x": mem.get("delta_ratio"),
                         "memory_total_4x_over_1x": mem.get("total_ratio")},
        "goals": GOALS,
        "median_seconds": med,
        "all_seconds": times,
        "errors": errors,
        "agreement_with_icon2": agree,
        "memory": mem,
        "notes": notes,
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_avg_start": load_at_start, "load_avg_end": os.getloadavg(),
                        "versions": environment(_PACKAGES)["versions"]},
        "total_seconds": total,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
