"""Judge-free preference evaluation on held-out human-written pairs (EVIDENCE.md, RewardBench style).

A **preference set** is a list of (prompt, better answer, worse answer) triples, each with an
optional criterion. For every model and pair the model reads each answer after the chat-rendered
prompt and we record the summed log-probability and the token count of both answers. From these:

* **length-normalised log-likelihood margin**: ``log p(chosen|q)/|chosen| - log p(rejected|q)/|rejected|``
  (nats per token); **preference accuracy** is the share of pairs with a positive margin;
* **margin shift** against a reference (the base model): per pair, the model's margin minus the
  reference's, with a paired bootstrap interval: did training move the model toward the better
  answers, and by more than its controls?
* **DPO implicit reward accuracy** against the reference: the share of pairs with
  ``[log pi(chosen) - log pi_ref(chosen)] > [log pi(rejected) - log pi_ref(rejected)]`` (summed log-probs).

The margins use none of the steering directions, so they can tell good preference data from bad
without reading the data's own signal. The package ships a set written for this project
(`load_preference_set`: 60 pairs per criterion for helpful, honest and harmless, answers of similar
length and register on both sides, split into ``dev`` (20 per criterion, for choosing settings) and
``test`` (40 per criterion, for reporting)), disjoint from the layer report's response pairs and the
instruction pools (checked by hash in the tests). Users pass their own set as a JSONL file with
``prompt``, ``chosen``, ``rejected`` and an optional ``criterion`` per line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import BadFileError, BadInputError, read_text
from .gen import engine
from .math.bootstrap import DEFAULT_LEVEL, DEFAULT_N_BOOT, bootstrap_mean, paired_difference
from .models import LoadedModel
from .prompts import render_chat

__all__ = [
    "PreferencePair",
    "PairLogprobs",
    "Split",
    "load_preference_set",
    "preference_set_sha256",
    "first_per_criterion",
    "pair_logprobs",
    "preference_metrics",
    "model_contrasts",
    "evaluate_preferences",
    "check_held_out",
    "MIN_PAIRS_FOR_INTERVAL",
]

#: Which part of the shipped set: ``"test"`` (report), ``"dev"`` (choose settings) or ``"all"``.
Split = Literal["test", "dev", "all"]
_SHIPPED = ("helpful", "honest", "harmless")
#: Below this many pairs a bootstrap interval is too rough to call two models distinguishable.
MIN_PAIRS_FOR_INTERVAL = 8


@dataclass(frozen=True)
class PreferencePair:
    """One held-out preference pair.

    Attributes:
        prompt: the user's request.
        chosen: the better answer.
        rejected: the worse answer.
        criterion: what makes ``chosen`` better (``"all"`` when the set gives none).
        split: ``"dev"``, ``"test"`` or ``""`` (a user's set).
    """

    prompt: str
    chosen: str
    rejected: str
    criterion: str = "all"
    split: str = ""


_LINE_TODO = ("Write one JSON object per line with 'prompt', 'chosen', 'rejected' (non-empty plain strings) and an "
              "optional 'criterion'.")


def _bad(where: str, path: Path | None, problem: str, todo: str = _LINE_TODO) -> ValueError:
    """The error for a bad line: a `BadFileError` naming the file when there is one."""
    if path is not None:
        return BadFileError(path, problem, todo)
    return BadInputError(f"{where}, {problem}; {todo[0].lower()}{todo[1:]}", option="preference_set")


def _parse(lines: Sequence[str], where: str, path: Path | None = None) -> list[PreferencePair]:
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(where, path, f"line {i}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise _bad(where, path, f"line {i}: expected an object with 'prompt', 'chosen', 'rejected', got "
                       f"{type(row).__name__}")
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise _bad(where, path, f"line {i}: missing {', '.join(missing)}")
        bad = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row[k], str) or not row[k].strip()]
        if bad:
            raise _bad(where, path, f"line {i}: {', '.join(bad)} must be non-empty plain strings")
        crit = row.get("criterion") or "all"
        if not isinstance(crit, str):
            raise _bad(where, path, f"line {i}: 'criterion' must be a string, got {crit!r}")
        if row["chosen"].strip() == row["rejected"].strip():
            raise _bad(where, path, f"line {i}: 'chosen' and 'rejected' are the same text",
                       "Give a better and a worse answer that differ.")
        out.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], crit, str(row.get("split") or "")))
    return out


def load_preference_set(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None, *,
                        split: Split = "test") -> list[PreferencePair]:
    """The shipped held-out preference set (``source=None``), or a user's JSONL file or list of dicts.

    Args:
        source: ``None`` (the shipped set), a ``.jsonl`` file (one object per line: ``prompt``,
            ``chosen``, ``rejected``, optional ``criterion``), or a list of such dicts.
        split: for the shipped set (and user files that have a ``split`` field): ``"test"`` (default:
            for reporting), ``"dev"`` (for choosing settings) or ``"all"``.

    Examples:
        >>> pairs = load_preference_set()
        >>> len(pairs), sorted({p.criterion for p in pairs})
        (120, ['harmless', 'helpful', 'honest'])
    """
    if split not in ("test", "dev", "all"):
        raise ValueError(f"Unknown split {split!r}; use 'test', 'dev' or 'all'.")
    if source is None:
        folder = resources.files("icon2_lens").joinpath("data").joinpath("preference_eval")
        pairs = [p for c in _SHIPPED
                 for p in _parse(folder.joinpath(f"{c}.jsonl").read_text("utf-8").splitlines(), f"shipped {c}.jsonl")]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Preference set {path} does not exist; pass a JSONL file with one object per "
                                    "line ('prompt', 'chosen', 'rejected', optional 'criterion').")
        text = read_text(path, what="a preference set (JSONL)", todo=_LINE_TODO)
        pairs = _parse(text.splitlines(), str(path), path)
        if not pairs:
            raise BadFileError(path, "holds no pairs (it is empty)", _LINE_TODO)
    else:
        pairs = _parse([json.dumps(dict(r)) for r in source], "the given preference rows")
    if split != "all" and any(p.split for p in pairs):
        pairs = [p for p in pairs if p.split == split]
    if not pairs:
        raise ValueError(f"The preference set has no pairs (split {split!r}).")
    return pairs


def first_per_criterion(pairs: Sequence[PreferencePair], n: int | None) -> list[PreferencePair]:
    """The first ``n`` pairs of each criterion, in the set's order (``None``: all).

    Examples:
        >>> len(first_per_criterion(load_preference_set(), 4))
        12
    """
    if n is None:
        return list(pairs)
    if n < 1:
        raise ValueError(f"n must be positive (or None for all pairs), got {n}.")
    count: dict[str, int] = {}
    out = []
    for p in pairs:
        count[p.criterion] = count.get(p.criterion, 0) + 1
        if count[p.criterion] <= n:
            out.append(p)
    return out


def preference_set_sha256(pairs: Sequence[PreferencePair]) -> str:
    """A hash of the set's content (prompt, chosen, rejected, criterion of every pair, in order).

    Examples:
        >>> len(preference_set_sha256(load_preference_set()))
        64
    """
    blob = json.dumps([[p.prompt, p.chosen, p.rejected, p.criterion] for p in pairs])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_held_out(pairs: Sequence[PreferencePair], used: Sequence[str]) -> list[str]:
    """The preference prompts that also occur in ``used`` (instructions trained on or used to choose
    layers or gammas), compared by normalised SHA-256 (case and surrounding space ignored).

    Examples:
        >>> check_held_out([PreferencePair("Hi", "a", "b")], ["hi ", "Bye"])
        ['Hi']
    """
    def key(t: str) -> str:
        return hashlib.sha256(" ".join(t.lower().split()).encode("utf-8")).hexdigest()

    seen = {key(u) for u in used}
    return [p.prompt for p in pairs if key(p.prompt) in seen]


@dataclass(frozen=True)
class PairLogprobs:
    """Summed log-probabilities and token counts of both answers of each pair, under one model.

    Attributes:
        chosen: ``[pair]`` summed log p(chosen | prompt).
        rejected: ``[pair]`` summed log p(rejected | prompt).
        chosen_tokens: ``[pair]`` token counts of the chosen answers.
        rejected_tokens: ``[pair]`` token counts of the rejected answers.
    """

    chosen: Float[Tensor, " pair"]
    rejected: Float[Tensor, " pair"]
    chosen_tokens: Float[Tensor, " pair"]
    rejected_tokens: Float[Tensor, " pair"]

    @property
    def margin(self) -> Float[Tensor, " pair"]:
        """Length-normalised log-likelihood margin per pair (nats per token)."""
        return self.chosen / self.chosen_tokens - self.rejected / self.rejected_tokens


def pair_logprobs(model: LoadedModel, pairs: Sequence[PreferencePair], *, batch_size: int = 8) -> PairLogprobs:
    """Read both answers of every pair after its chat-rendered prompt (no system prompt of our own).

    Examples:
        >>> lp = pair_logprobs(model, load_preference_set()[:4])  # doctest: +SKIP
        >>> lp.margin.shape  # doctest: +SKIP
        torch.Size([4])
    """
    if not pairs:
        raise ValueError("No preference pairs to read.")
    prompts = [render_chat(model.tokenizer, p.prompt) for p in pairs]
    eng = engine(model)
    both = eng.continuation_logprobs(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                                     batch_size=batch_size)
    sums = torch.tensor([float(x.double().sum()) for x in both], dtype=torch.float64)
    counts = torch.tensor([float(len(x)) for x in both], dtype=torch.float64)
    k = len(pairs)
    return PairLogprobs(chosen=sums[:k], rejected=sums[k:], chosen_tokens=counts[:k], rejected_tokens=counts[k:])


def _groups(pairs: Sequence[PreferencePair]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"all": list(range(len(pairs)))}
    for i, p in enumerate(pairs):
        if p.criterion != "all":
            out.setdefault(p.criterion, []).append(i)
    return out


def preference_metrics(logprobs: Mapping[str, PairLogprobs], pairs: Sequence[PreferencePair], *,
                       reference: str | None = "base", n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                       seed: int = 0) -> dict[str, Any]:
    """Per model and per criterion (and ``all``): accuracy, margin with interval, shift and implicit reward.

    Args:
        logprobs: model name -> its `PairLogprobs` on ``pairs``.
        pairs: the preference pairs (for criteria and word counts).
        reference: the model the others are compared with (margin shift, implicit reward); ``None``: none.
        n_boot: bootstrap resamples.
        level: interval coverage (0.9: a 90% interval).
        seed: bootstrap seed.

    Returns:
        ``{"models": {name: {criterion: {...}}}, "level", "n_boot", "reference"}``; each cell has ``n``,
        ``preference_accuracy``, ``margin_mean``, ``margin_ci_low``, ``margin_ci_high``,
        ``chosen_tokens_mean``, ``rejected_tokens_mean``, ``chosen_words_mean``, ``rejected_words_mean`` and, for
        models other than the reference, ``margin_shift_mean`` / ``_ci_low`` / ``_ci_high``,
        ``margin_rose_share`` and ``implicit_reward_accuracy`` (``None`` for the reference itself).

    Examples:
        >>> t = torch.tensor
        >>> lp = {"base": PairLogprobs(t([-4.0, -6.0]), t([-6.0, -4.0]), t([2.0, 2.0]), t([2.0, 2.0]))}
        >>> preference_metrics(lp, [PreferencePair("q", "a", "b")] * 2, n_boot=10)["models"]["base"]["all"]["n"]
        2
    """
    if reference is not None and reference not in logprobs:
        raise ValueError(f"Reference model {reference!r} is not among {sorted(logprobs)}.")
    words_c = torch.tensor([len(p.chosen.split()) for p in pairs], dtype=torch.float64)
    words_r = torch.tensor([len(p.rejected.split()) for p in pairs], dtype=torch.float64)
    models: dict[str, dict[str, Any]] = {}
    for name, lp in logprobs.items():
        if lp.chosen.numel() != len(pairs):
            raise ValueError(f"Model {name!r} has log-probs of {lp.chosen.numel()} pairs, the set has {len(pairs)}.")
        cells: dict[str, Any] = {}
        for crit, idx in _groups(pairs).items():
            ix = torch.tensor(idx)
            m = lp.margin[ix]
            iv = bootstrap_mean(m, n_boot=n_boot, level=level, seed=seed)
            cell: dict[str, Any] = {
                "n": len(idx), "preference_accuracy": float((m > 0).double().mean()),
                "margin_mean": iv.mean, "margin_ci_low": iv.low, "margin_ci_high": iv.high,
                "chosen_tokens_mean": float(lp.chosen_tokens[ix].mean()),
                "rejected_tokens_mean": float(lp.rejected_tokens[ix].mean()),
                "chosen_words_mean": float(words_c[ix].mean()), "rejected_words_mean": float(words_r[ix].mean()),
                "implicit_reward_accuracy": None,
            }
            if reference is not None and name != reference:
                ref = logprobs[reference]
                shift = paired_difference(m, ref.margin[ix], n_boot=n_boot, level=level, seed=seed)
                reward = (lp.chosen[ix] - ref.chosen[ix]) - (lp.rejected[ix] - ref.rejected[ix])
                cell.update({"margin_shift_mean": shift.mean, "margin_shift_ci_low": shift.low,
                             "margin_shift_ci_high": shift.high,
                             "margin_rose_share": float((m > ref.margin[ix]).double().mean()),
                             "implicit_reward_accuracy": float((reward > 0).double().mean())})
            cells[crit] = cell
        models[name] = cells
    return {"models": models, "reference": reference, "level": level, "n_boot": n_boot, "seed": seed}


def model_contrasts(logprobs: Mapping[str, PairLogprobs], pairs: Sequence[PreferencePair], *, subject: str,
                    controls: Sequence[str], n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """Paired margin difference of ``subject`` minus each control, per criterion, with intervals.

    An effect claimed for the subject (the model trained on the real pairs) is only an effect where
    the interval of ``subject - control`` excludes zero for its controls (swapped pairs, random direction).
    Each cell has the `Interval` fields, ``distinguishable`` (the interval excludes zero and there are at
    least `MIN_PAIRS_FOR_INTERVAL` pairs) and ``direction``: ``"above"`` / ``"below"`` (the subject's margin
    is above / below the control's), ``"not distinguishable"`` or ``"too few pairs"``.

    Examples:
        >>> t = torch.tensor
        >>> a = PairLogprobs(t([-1.0, -1.0]), t([-2.0, -2.0]), t([1.0, 1.0]), t([1.0, 1.0]))
        >>> b = PairLogprobs(t([-2.0, -2.0]), t([-2.0, -2.0]), t([1.0, 1.0]), t([1.0, 1.0]))
        >>> model_contrasts({"t": a, "s": b}, [PreferencePair("q", "a", "b")] * 2, subject="t",
        ...                 controls=["s"], n_boot=10)["s"]["all"]["mean"]
        1.0
    """
    out: dict[str, dict[str, Any]] = {}
    for c in controls:
        if c not in logprobs or subject not in logprobs:
            raise ValueError(f"Need log-probs of {subject!r} and {c!r}; have {sorted(logprobs)}.")
        out[c] = {}
        for crit, idx in _groups(pairs).items():
            ix = torch.tensor(idx)
            d = paired_difference(logprobs[subject].margin[ix], logprobs[c].margin[ix], n_boot=n_boot, level=level,
                                  seed=seed)
            enough = d.n >= MIN_PAIRS_FOR_INTERVAL
            out[c][crit] = {**d.to_dict(), "distinguishable": bool(enough and d.excludes_zero),
                            "direction": ("too few pairs" if not enough else "not distinguishable"
                                          if not d.excludes_zero else "above" if d.mean > 0 else "below")}
    return out


def evaluate_preferences(models: Mapping[str, LoadedModel], pairs: Sequence[PreferencePair] | None = None, *,
                         reference: str | None = "base", subject: str | None = None,
                         controls: Sequence[str] = (), batch_size: int = 8, n_boot: int = DEFAULT_N_BOOT,
                         level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Any]:
    """Judge-free figures of several models on one preference set (module docs).

    Args:
        models: name -> model (e.g. ``{"base": base, "trained": trained, "swapped": swapped}``).
        pairs: the preference set (default: the shipped ``test`` split).
        reference: the model the others are compared with (default ``"base"``).
        subject: the model whose effect is claimed (default ``"trained"`` if present).
        controls: models to compare ``subject`` with, pair by pair (default: every model but the reference
            and the subject).
        batch_size: pairs per forward pass.
        n_boot: bootstrap resamples.
        level: interval coverage.
        seed: bootstrap seed.

    Returns:
        `preference_metrics`'s dict plus ``contrasts`` (subject minus each control) and ``set`` (``n``,
        ``sha256``, criteria).

    Examples:
        >>> m = evaluate_preferences({"base": base, "trained": trained})  # doctest: +SKIP
        >>> m["models"]["trained"]["all"]["margin_shift_mean"]  # doctest: +SKIP
    """
    pairs = list(pairs) if pairs is not None else load_preference_set()
    if not models:
        raise ValueError("No models to evaluate.")
    lps = {name: pair_logprobs(m, pairs, batch_size=batch_size) for name, m in models.items()}
    out = preference_metrics(lps, pairs, reference=reference if reference in lps else None, n_boot=n_boot,
                             level=level, seed=seed)
    subject = subject if subject is not None else ("trained" if "trained" in lps else None)
    if subject is not None:
        ctrl = list(controls) or [n for n in lps if n not in (reference, subject)]
        out["contrasts"] = {"subject": subject, "controls": model_contrasts(
            lps, pairs, subject=subject, controls=ctrl, n_boot=n_boot, level=level, seed=seed)}
    out["set"] = {"n": len(pairs), "sha256": preference_set_sha256(pairs),
                  "criteria": sorted({p.criterion for p in pairs})}
    return out
