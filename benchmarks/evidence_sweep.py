#!/usr/bin/env python
"""Choose the demo's generation defaults by the judge-free held-out measure, not by a self-probe.

For each setting (steering scale and strengths, token budget, the validity gate, number of pairs) this
script generates Icon2 pairs from one finished run's directions and scored instructions, trains the
demo's DPO on them, and measures the trained model on the shipped preference set's ``dev`` split (20
human-written pairs per criterion, never used for reporting): the length-normalised log-likelihood margin
shift against the base model, with a paired 90% bootstrap interval, plus the share of finished pairs and
the tokens generated. The setting with the highest margin shift becomes the default of ``icon2-lens run``;
the figures reported in the docs come from the ``test`` split with controls (`icon2-lens run` itself).

Every setting's folder is resumable (pairs batch by batch, the trained model once), so an interrupted
sweep continues where it stopped. The CPU is printed beside the timings.

Run::

    icon2-lens run --out runs/demo --stop-after score             # directions, layers, scored instructions
    python benchmarks/evidence_sweep.py --run runs/demo --out runs/sweep
    python benchmarks/evidence_sweep.py --run runs/demo --out runs/sweep --only relative-0.07 --split dev
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import icon2_lens as il
from icon2_lens.hardware import cpu_name
from icon2_lens.pairs import PairsConfig
from icon2_lens.preference import evaluate_preferences, load_preference_set
from icon2_lens.runs import names
from icon2_lens.runs.io import atomic_write_text
from icon2_lens.scoring import save_scores, score_instructions
from icon2_lens.training import TrainConfig, train

#: name -> (PairsConfig overrides, number of pairs, validity gate on, finished_only; with it, unfinished responses
#: are trimmed to their last sentence (TrainConfig.trim_unfinished), as the demo does)
SETTINGS: dict[str, tuple[dict[str, Any], int, bool, bool]] = {
    "relative-0.07-128tok-cut": ({"max_new_tokens": 128}, 24, True, False),  # the old default, trained on cut pairs
    "contrast-1": ({"scale": "contrast", "gamma_pos": 1.0, "gamma_neg": -1.0, "max_new_tokens": 256}, 24, True, True),
    "contrast-3": ({"scale": "contrast", "gamma_pos": 3.0, "gamma_neg": -3.0, "max_new_tokens": 256}, 24, True, True),
    "relative-0.07": ({"max_new_tokens": 256}, 24, True, True),
    "contrast-1-nogate": ({"scale": "contrast", "gamma_pos": 1.0, "gamma_neg": -1.0, "max_new_tokens": 256}, 24,
                          False, True),
    "contrast-1-48pairs": ({"scale": "contrast", "gamma_pos": 1.0, "gamma_neg": -1.0, "max_new_tokens": 256}, 48,
                           True, True),
}


def _table(run: Path, out: Path, model: il.LoadedModel, *, gate: bool, top_k: int) -> Path:
    folder = out / f"score-{'gate' if gate else 'nogate'}-{top_k}"
    if not (folder / names.SELECTED).is_file():
        dirs = il.DirectionSet.load(run / "layers" / names.DIRECTIONS)
        table = score_instructions(model, dirs, run / "synthesize", allow_invalid=not gate, progress=False)
        save_scores(table, folder, top_k=top_k, overwrite=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory with layers/ and synthesize/ finished")
    ap.add_argument("--out", type=Path, required=True, help="sweep folder (resumable)")
    ap.add_argument("--only", nargs="*", default=None, help="settings to run (default: all)")
    ap.add_argument("--split", default="dev", choices=["dev", "test", "all"], help="preference split to measure on")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = il.load_model()
    dirs = il.DirectionSet.load(run_dirs := args.run / "layers" / names.DIRECTIONS)
    pref = load_preference_set(split=args.split)
    train_cfg = TrainConfig(seed=0)
    print(f"CPU: {cpu_name()}; directions {run_dirs}; preference split {args.split} (n = {len(pref)})")
    results_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, (over, top_k, gate, finished_only) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        folder = args.out / name
        t0 = time.perf_counter()
        table = _table(args.run, args.out, model, gate=gate, top_k=top_k)
        cfg = dataclasses.replace(PairsConfig(), **over)
        pairs = il.generate_pairs(model, dirs, table, cfg, seed=0, out=folder / "generate", progress=False)
        t_gen = time.perf_counter() - t0
        rows = [dict(r) for r in pairs]
        finished = [r["chosen_finished"] and r["rejected_finished"] for r in rows]
        model_dir = folder / "model"
        if not (model_dir / "config.json").is_file():
            train(rows, config=dataclasses.replace(train_cfg, finished_only=finished_only,
                                                   trim_unfinished=finished_only), output_dir=model_dir,
                  overwrite=True, progress=False, log=lambda s: None)
        t_train = time.perf_counter() - t0 - t_gen
        trained = il.load_model(model_dir)
        m = evaluate_preferences({"base": model, "trained": trained}, pref, n_boot=args.n_boot)
        cells = m["models"]["trained"]
        results[name] = {
            "settings": {**over, "top_k": top_k, "gate": gate, "finished_only": finished_only},
            "criteria": {c: sum(r["criterion"] == c for r in rows) for c in sorted({r["criterion"] for r in rows})},
            "n_pairs": len(rows), "finished_both_share": sum(finished) / len(rows),
            "chosen_finished_share": sum(r["chosen_finished"] for r in rows) / len(rows),
            "rejected_finished_share": sum(r["rejected_finished"] for r in rows) / len(rows),
            "generated_tokens": sum(r["chosen_tokens"] + r["rejected_tokens"] for r in rows),
            "trained_pairs": json.loads((model_dir / "train_config.json").read_text())["n_pairs"],
            "trimmed_pairs": json.loads((model_dir / "train_config.json").read_text()).get("n_unfinished_trimmed", 0),
            "preference": {c: {k: v for k, v in cell.items() if k.startswith(("margin_shift", "implicit", "n"))}
                           for c, cell in cells.items()},
            "seconds": {"generate": round(t_gen), "train_and_eval": round(time.perf_counter() - t0 - t_gen)},
            "split": args.split, "cpu": cpu_name(),
        }
        atomic_write_text(results_path, json.dumps(results, indent=2))
        a = cells["all"]
        print(f"{name}: shift {a['margin_shift_mean']:+.4f} [{a['margin_shift_ci_low']:+.4f}, "
              f"{a['margin_shift_ci_high']:+.4f}], finished both {results[name]['finished_both_share']:.2f}, "
              f"trained on {results[name]['trained_pairs']}, {t_gen:.0f}+{t_train:.0f} s", flush=True)
    print("\n| setting | criteria | finished (both) | trained pairs | tokens | shift all [90% CI] | helpful | honest | "
          "harmless |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p = r["preference"]

        def cell(c: str, p: dict[str, Any] = p) -> str:
            return "-" if c not in p else f"{p[c]['margin_shift_mean']:+.4f}"

        a = p["all"]
        print(f"| {name} | {r['criteria']} | {r['finished_both_share']:.2f} | {r['trained_pairs']} | "
              f"{r['generated_tokens']} | {a['margin_shift_mean']:+.4f} [{a['margin_shift_ci_low']:+.4f}, "
              f"{a['margin_shift_ci_high']:+.4f}] | {cell('helpful')} | {cell('honest')} | {cell('harmless')} |")


if __name__ == "__main__":
    main()
