"""Scorers for responses and degeneration metrics (used by gamma calibration and pair reports).

Scorers are callables ``scorer(instructions, responses, criteria) -> list[float]`` (higher is
better), so any of them plugs into `icon2_lens.calibrate_gamma`:

* `ProbeScorer` (default, offline, works on the embedded model): the model reads the response to
  the instruction (chat template, no system prompt of our own) and the last token's residual is
  projected on the criterion's direction at the steering layers, standardised with the feature-set
  statistics and averaged: the response-reading of the layer report's measure (c). **Limits:** it
  measures how much the *model itself* reads the answer as e.g. helpful, along the same direction
  that steering pushes, so it is not an independent judge: it rewards text that moves the probe
  and knows nothing about correctness. The layer report shows where it can be trusted: (c) was
  0.8-0.9 for *helpful*/*general* at the suggested layers on SmolLM2, but *below chance* for
  *harmless*. Use a reward model or a judge for claims about quality.
* `RewardModelScorer`: any HF sequence-classification reward model (``logits[:, 0]``).
* `PairwiseJudge`: a chat model asked which of two responses is better, both orders; a verdict
  that flips with the order counts as a tie (0.5).

The text metrics (`distinct_n`, `is_degenerate`, `degeneration_stats`, `parse_verdict`) live in
`icon2_lens.math.text` and the probe in `icon2_lens.math.probe`; they are importable from here too.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

import torch

from .activations import LastTokenReader, tokenize_texts
from .directions import DirectionSet
from .math.probe import probe_scores
from .math.text import degeneration_stats, distinct_n, is_degenerate, parse_verdict
from .gen import engine
from .models import LoadedModel
from .prompts import render_chat

__all__ = [
    "Scorer",
    "ProbeScorer",
    "RewardModelScorer",
    "PairwiseJudge",
    "distinct_n",
    "is_degenerate",
    "pair_report",
    "parse_verdict",
    "degeneration_stats",
    "probe_means",
    "evaluate",
]


class Scorer(Protocol):
    """Scores responses: higher is better. ``criteria[i]`` is the criterion response ``i`` was steered along."""

    name: str

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        ...


class ProbeScorer:
    """The model's own reading of a response along the criterion's direction (see the module docs).

    Args:
        model: the model that reads (the one the directions come from).
        directions: the probes.
        layers: layers to average (default: the directions' suggested layers, else all).
        batch_size: prompts per forward pass.

    Examples:
        >>> scorer = ProbeScorer(model, dirs)  # doctest: +SKIP
        >>> scorer(["Name a river."], ["The Nile."], ["helpful"])  # doctest: +SKIP
        [0.83]
    """

    name = "probe"

    def __init__(self, model: LoadedModel, directions: DirectionSet, *, layers: Sequence[int] | None = None,
                 batch_size: int = 16) -> None:
        directions.check_compatible(model)
        self.model, self.directions, self.batch_size = model, directions, batch_size
        self.layers = list(layers or directions.suggested_layers or directions.layers)
        missing = [x for x in self.layers if x not in directions.layers]
        if missing:
            raise ValueError(f"Layers {missing} are not in the directions (which have {list(directions.layers)}).")

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        if not len(instructions) == len(responses) == len(criteria):
            raise ValueError("instructions, responses and criteria must have the same length.")
        d = self.directions
        cols = [d.layers.index(x) for x in self.layers]
        tok = self.model.tokenizer
        texts = [render_chat(tok, q, assistant=r if r.strip() else " ") for q, r in zip(instructions, responses)]
        ids = tokenize_texts(self.model, texts)
        ci = torch.tensor([d.index(c) for c in criteria])
        out = torch.empty(len(texts))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with LastTokenReader(self.model, hook=d.hook, layers=self.layers) as reader:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                h = reader.read([ids[i] for i in rows])
                z = probe_scores(h, d.vectors[:, cols], mean=d.stats["proj_mean"][:, cols],
                                 std=d.stats["proj_std"][:, cols])  # [b, criterion]
                out[rows] = z[torch.arange(len(rows)), ci[rows]]
        return out.tolist()


class RewardModelScorer:
    """An HF sequence-classification reward model; the score is ``logits[:, 0]``.

    The (instruction, response) pair is rendered with the reward model's chat template when it has
    one, else as ``"instruction\\n\\nresponse"``. Offline by default (``local_files_only=True``).

    Examples:
        >>> scorer = RewardModelScorer("path/to/reward-model")  # doctest: +SKIP
    """

    name = "reward_model"

    def __init__(self, source: str | os.PathLike[str], *, device: str | None = None, batch_size: int = 8,
                 local_files_only: bool = True) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(source),
                                                                            local_files_only=local_files_only)
        except OSError as exc:
            raise FileNotFoundError(f"Cannot load a reward model from {source!r} ({exc}); pass a local folder of an HF "
                                    "sequence-classification model (or allow downloads).") from exc
        self.model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.name = f"reward_model:{source}"

    def _text(self, q: str, r: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": r}], tokenize=False)
        return f"{q}\n\n{r}"

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        texts = [self._text(q, r) for q, r in zip(instructions, responses)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, add_special_tokens=not getattr(self.tokenizer, "chat_template", None))
            with torch.inference_mode():
                logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.extend(logits[:, 0].float().tolist())
        return out


class PairwiseJudge:
    """A chat model asked which of two responses is better, in both orders.

    ``judge(instructions, a, b)`` returns, per item, 1.0 if ``a`` wins in both orders, 0.0 if ``b``
    wins in both, 0.5 if the verdict flips with the order (position bias: a tie). The verdict is
    the comparison of the next-token logits of "A" and "B" after the question.

    Examples:
        >>> judge = PairwiseJudge(model)  # doctest: +SKIP
        >>> judge.compare(["Name a river."], ["The Nile."], ["Banana."])  # doctest: +SKIP
        [1.0]
    """

    name = "pairwise_judge"
    PROMPT = ("Which response answers the user's request better (more relevant, accurate, complete and clear)?\n\n"
              "Request: {q}\n\nResponse A: {a}\n\nResponse B: {b}\n\nAnswer with the single letter A or B.")

    def __init__(self, model: LoadedModel, *, batch_size: int = 8) -> None:
        self.model, self.batch_size = model, batch_size
        tok = model.tokenizer
        self._a = tok("A", add_special_tokens=False)["input_ids"][0]
        self._b = tok("B", add_special_tokens=False)["input_ids"][0]

    def _prefers_first(self, qs: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[bool]:
        tok = self.model.tokenizer
        texts = [render_chat(tok, self.PROMPT.format(q=q, a=a, b=b)) for q, a, b in zip(qs, firsts, seconds)]
        logits = engine(self.model).next_token_logits(texts, batch_size=self.batch_size)
        return (logits[:, self._a] > logits[:, self._b]).tolist()

    def orders(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[list[bool], list[bool]]:
        """The raw verdicts: whether the judge picks the first response with ``a`` first, and with ``b`` first.

        A judge that always picks the same position, whatever the content, gives ``x == y`` everywhere.
        """
        return self._prefers_first(instructions, a, b), self._prefers_first(instructions, b, a)

    def compare(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """1.0 / 0.0 / 0.5 per item: ``a`` better in both orders / ``b`` better / inconsistent."""
        return _verdicts(*self.orders(instructions, a, b))

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        raise TypeError("PairwiseJudge compares two responses; use judge.compare(...) or calibrate_gamma(scorer=judge).")


def _verdicts(ab: Sequence[bool], ba: Sequence[bool]) -> list[float]:
    return [1.0 if x and not y else 0.0 if y and not x else 0.5 for x, y in zip(ab, ba)]


def _is_pairwise(scorer: Any) -> bool:
    return hasattr(scorer, "compare")


def pair_report(pairs: Any, *, scorer: Any | None = None, n_examples: int = 5) -> dict[str, Any]:
    """Figures of a preference-pair dataset (`icon2_lens.generate_pairs` output).

    ``identical_share`` (chosen == rejected), per side: mean distinct-2 per response, corpus
    distinct-2 (over all responses of the side), ``degenerate_share``, ``finished_share``, mean
    words; with a ``scorer``: ``win_share`` (chosen scores above rejected and neither degenerates)
    and mean scores; and the first ``n_examples`` pairs.

    Examples:
        >>> pair_report(pairs, scorer=ProbeScorer(model, dirs))["win_share"]  # doctest: +SKIP
        0.94
    """
    rows = [dict(r) for r in pairs]
    if not rows:
        raise ValueError("No pairs to report on.")
    qs = [r["instruction"] for r in rows]
    crits = [r["criterion"] for r in rows]
    side = {s: [r[s][0]["content"] for r in rows] for s in ("chosen", "rejected")}
    out: dict[str, Any] = {"n_pairs": len(rows),
                           "identical_share": sum(a == b for a, b in zip(side["chosen"], side["rejected"])) / len(rows)}
    for s, texts in side.items():
        corpus = " ".join(t.replace("\n", " ") for t in texts)
        out[s] = {"distinct2_mean": sum(distinct_n(t, 2) for t in texts) / len(texts),
                  "distinct2_corpus": distinct_n(corpus, 2),
                  "degenerate_share": sum(is_degenerate(t) for t in texts) / len(texts),
                  "finished_share": sum(bool(r.get(f"{s}_finished", True)) for r in rows) / len(rows),
                  "mean_words": sum(len(t.split()) for t in texts) / len(texts)}
    if scorer is not None:
        if _is_pairwise(scorer):
            verdict = scorer.compare(qs, side["chosen"], side["rejected"])
            wins = [v == 1.0 for v in verdict]
        else:
            sc, sr = scorer(qs, side["chosen"], crits), scorer(qs, side["rejected"], crits)
            wins = [a > b for a, b in zip(sc, sr)]
            out["chosen"]["mean_score"], out["rejected"]["mean_score"] = sum(sc) / len(sc), sum(sr) / len(sr)
        ok = [w and not is_degenerate(a) and not is_degenerate(b)
              for w, a, b in zip(wins, side["chosen"], side["rejected"])]
        out["win_share"] = sum(ok) / len(ok)
        out["scorer"] = getattr(scorer, "name", type(scorer).__name__)
    out["examples"] = [{"instruction": q, "criterion": c, "chosen": a, "rejected": b}
                       for q, c, a, b in list(zip(qs, crits, side["chosen"], side["rejected"]))[:n_examples]]
    return out


def _answers(model: LoadedModel, instructions: Sequence[str], *, max_new_tokens: int, batch_size: int,
             progress: bool, desc: str) -> list[str]:
    from tqdm.auto import tqdm

    from .pairs import generate_steered

    out: list[str] = []
    with tqdm(total=len(instructions), desc=desc, unit="answer", disable=not progress) as bar:
        for start in range(0, len(instructions), batch_size):
            chunk = instructions[start:start + batch_size]
            rows = generate_steered(model, [render_chat(model.tokenizer, q) for q in chunk],
                                    max_new_tokens=max_new_tokens, repetition_penalty=1.1)
            out.extend(r["text"] for r in rows)
            bar.update(len(chunk))
    return out


def probe_means(model: LoadedModel, directions: DirectionSet, instructions: Sequence[str], *,
                layers: Sequence[int] | None = None, batch_size: int = 16) -> dict[str, float]:
    """Mean standardised projection of the model's last-token residual (instruction as the user
    turn, no system prompt of our own) on each criterion's direction, averaged over ``layers``.

    Examples:
        >>> probe_means(trained, base_dirs, heldout)["helpful"]  # doctest: +SKIP
        0.12
    """
    from .activations import read_last_token
    from .prompts import scoring_texts

    directions.check_compatible(model)
    layer_ids = list(layers or directions.suggested_layers or directions.layers)
    cols = [directions.layers.index(x) for x in layer_ids]
    h = read_last_token(model, scoring_texts(model.tokenizer, instructions), hook=directions.hook, layers=layer_ids,
                        batch_size=batch_size, progress=False)
    z = probe_scores(h, directions.vectors[:, cols], mean=directions.stats["proj_mean"][:, cols],
                     std=directions.stats["proj_std"][:, cols]).mean(0)
    return {c: float(z[i]) for i, c in enumerate(directions.criteria)}


def evaluate(
    base: LoadedModel,
    trained: LoadedModel,
    directions: DirectionSet,
    instructions: Sequence[str],
    *,
    judge: Any | None = None,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    training_instructions: Sequence[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Base vs trained model on held-out instructions: probe shift, pairwise judge, degeneration.

    Args:
        base: the model before training (its directions are the probes).
        trained: the trained model (same shape: `DirectionSet.check_compatible` must pass).
        directions: the base model's `DirectionSet`.
        instructions: held-out instructions (not trained on).
        judge: a `PairwiseJudge` (default: the base model judging, both orders, flips are ties).
        layers: probe layers (default: the suggested range).
        max_new_tokens: answer budget (greedy, repetition penalty 1.1).
        batch_size: answers per generation batch.
        training_instructions: if given, a warning names the overlap with ``instructions``.
        out: a folder for ``metrics.json``, ``report.md``, ``probe_shift.png`` and the AlpacaEval-format
            ``alpaca_eval_base.json`` / ``alpaca_eval_trained.json`` (written atomically).
        overwrite: replace an existing ``out``.
        progress: progress bars.

    Returns:
        The metrics: ``probe`` (per criterion: base, trained, shift), ``judge`` (win, tie, loss rates of
        trained vs base), ``degeneration`` (per model), ``n``.

    Examples:
        >>> m = il.evaluate(base, trained, dirs, heldout, out="runs/eval")  # doctest: +SKIP
    """
    import json as _json
    import warnings

    from .runs.io import atomic_folder, check_output_folder

    instructions = list(instructions)
    if not instructions:
        raise ValueError("No held-out instructions to evaluate on.")
    if out is not None:
        check_output_folder(out, overwrite=overwrite)
    directions.check_compatible(base)
    directions.check_compatible(trained)
    if training_instructions is not None:
        overlap = set(instructions) & set(training_instructions)
        if overlap:
            warnings.warn(f"{len(overlap)} of the {len(instructions)} evaluation instructions were trained on "
                          f"(e.g. {sorted(overlap)[0]!r}); the evaluation is not held out.", stacklevel=2)
    ans_base = _answers(base, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                        desc="base answers")
    ans_trained = _answers(trained, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc="trained answers")
    pb = probe_means(base, directions, instructions, layers=layers)
    pt = probe_means(trained, directions, instructions, layers=layers)
    judge = judge if judge is not None else PairwiseJudge(base)
    first_share = None
    if hasattr(judge, "orders"):  # keep the raw verdicts: how often the judge simply picks the first position
        ab, ba = judge.orders(instructions, ans_trained, ans_base)
        verdict = _verdicts(ab, ba)
        first_share = (sum(ab) + sum(ba)) / (2 * len(ab))
    else:
        verdict = judge.compare(instructions, ans_trained, ans_base)
    n = len(instructions)
    metrics: dict[str, Any] = {
        "n": n,
        "probe": {c: {"base": pb[c], "trained": pt[c], "shift": pt[c] - pb[c]} for c in directions.criteria},
        "judge": {"name": getattr(judge, "name", type(judge).__name__),
                  "win": sum(v == 1.0 for v in verdict) / n, "tie": sum(v == 0.5 for v in verdict) / n,
                  "loss": sum(v == 0.0 for v in verdict) / n, "first_position_share": first_share},
        "degeneration": {"base": degeneration_stats(ans_base), "trained": degeneration_stats(ans_trained)},
        "models": {"base": base.info.model_id, "trained": trained.info.model_id},
    }
    if out is not None:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "metrics.json").write_text(_json.dumps(metrics, indent=2))
            for name, model, answers in (("base", base, ans_base), ("trained", trained, ans_trained)):
                rows = [{"instruction": q, "output": a, "generator": model.info.model_id}
                        for q, a in zip(instructions, answers)]
                (tmp / f"alpaca_eval_{name}.json").write_text(_json.dumps(rows, indent=2))
            (tmp / "report.md").write_text(_report_md(metrics))
            _probe_figure(metrics).savefig(tmp / "probe_shift.png", dpi=110)
    return metrics


def _report_md(m: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {m['models']['trained']} vs {m['models']['base']} ({m['n']} held-out instructions)", "",
             "## Probe shift (mean standardised projection on the base model's directions)", "",
             "| criterion | base | trained | shift |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['base']:.3f} | {v['trained']:.3f} | {v['shift']:+.3f} |" for c, v in m["probe"].items()]
    j = m["judge"]
    lines += ["", f"## Pairwise judge ({j['name']}, both orders; a flip is a tie)", "",
              "| win | tie | loss |", "|---|---|---|", f"| {j['win']:.2f} | {j['tie']:.2f} | {j['loss']:.2f} |", ""]
    if j.get("first_position_share") is not None:
        lines += [f"The judge picked the response shown first in {j['first_position_share']:.2f} of its "
                  f"{2 * m['n']} verdicts (0.5 would be no position bias; 0 or 1 means it reads the position, "
                  "not the answers).", ""]
    lines += ["## Degeneration", "", "| model | distinct-1 | distinct-2 | repetition | degenerate | mean words |",
              "|---|---|---|---|---|---|"]
    for name, d in m["degeneration"].items():
        lines.append(f"| {name} | {d['distinct1']:.2f} | {d['distinct2']:.2f} | {d['repetition_rate']:.2f} | "
                     f"{d['degenerate_share']:.2f} | {d['mean_words']:.0f} |")
    return "\n".join(lines) + "\n"


def _probe_figure(m: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    crits = list(m["probe"])
    xs = range(len(crits))
    ax.bar([x - 0.2 for x in xs], [m["probe"][c]["base"] for c in crits], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [m["probe"][c]["trained"] for c in crits], width=0.4, label="trained")
    ax.set_xticks(list(xs), crits)
    ax.set_ylabel("mean standardised projection")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.legend()
    fig.tight_layout()
    return fig
