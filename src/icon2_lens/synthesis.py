"""Magpie-style instruction synthesis: the model writes the user turn itself (METHOD.md section 2).

The chat template is cut where the user's words go (`icon2_lens.prompts.pre_query_template`,
keeping any default system prompt the template inserts), the model samples the user turn until
its end-of-turn token, and a clean-up pass drops what is not a usable instruction, each drop with
a reason (`DROP_REASONS`). Generation is in batches of the same prefix (no padding) and, with an
output folder, resumable: raw generations are appended batch by batch to ``raw.jsonl`` and a rerun
continues after the last complete batch.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BadInputError, check_finite
from .gen import Decoding, engine
from .gen.base import check_count
from .math.text import jaccard, normalize_text, shingles
from .models import LoadedModel
from .prompts import pre_query_template
from .runs import names
from .runs.batches import BatchJob, run_batches
from .runs.io import atomic_write_text

if TYPE_CHECKING:
    import datasets

__all__ = ["SynthesisConfig", "synthesize_instructions", "clean_generations", "finish_synthesis", "synthesis_report",
           "DROP_REASONS", "normalize_text"]

@dataclass(frozen=True, kw_only=True)
class SynthesisConfig:
    """Settings of `synthesize_instructions`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        temperature: sampling temperature (Magpie: 1.0).
        top_p: nucleus sampling mass (Magpie: 0.99); ``top_k`` is off.
        max_new_tokens: budget for one user turn (longer ones are dropped as ``truncated``).
        batch_size: generations per batch (all share the prefix: no padding).
        system_prompt: ``None`` keeps what the template renders by itself; a string replaces it.
        min_words: clean-up: shorter is ``too_short``.
        max_words: clean-up: longer is ``too_long``.
        near_duplicate_threshold: clean-up: character 5-gram Jaccard similarity counted as a near duplicate.
    """

    temperature: float = 1.0
    top_p: float = 0.99
    max_new_tokens: int = 96
    batch_size: int = 16
    system_prompt: str | None = None
    min_words: int = 3
    max_words: int = 200
    near_duplicate_threshold: float = 0.8

    def __post_init__(self) -> None:
        _check_settings(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size, min_words=self.min_words, max_words=self.max_words,
                        near_duplicate_threshold=self.near_duplicate_threshold)


def _check_settings(*, temperature: float, top_p: float, max_new_tokens: int, batch_size: int, min_words: int,
                    max_words: int, near_duplicate_threshold: float) -> None:
    """The checks of `SynthesisConfig` (and of `synthesize_instructions`' keywords): before any work."""
    check_count(batch_size, "batch_size")
    Decoding(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p)
    check_count(min_words, "min_words")
    check_count(max_words, "max_words")
    if max_words < min_words:
        raise BadInputError(f"max_words ({max_words}) must be at least min_words ({min_words}).", option="max_words")
    check_finite(near_duplicate_threshold, "near_duplicate_threshold", low=0.0, high=1.0, low_open=True)


#: Why a generation is dropped, in the order the rules are applied.
DROP_REASONS = (
    "truncated",  # no end-of-turn token within max_new_tokens
    "empty",
    "template_debris",  # chat-template markup or role headers in the text
    "too_short",
    "too_long",
    "not_instruction",  # the model answering / greeting / introducing itself instead of asking
    "duplicate",  # same text after normalisation as an earlier kept one
    "near_duplicate",  # character 5-gram Jaccard similarity >= threshold with an earlier kept one
)

_ROLE_HEADER = re.compile(r"^\s*(user|assistant|system|human|ai|bot|model)\s*[:\n]", re.IGNORECASE)
_MARKUP = re.compile(r"<\|[^|>]{1,40}\|>|<(start|end)_of_turn>|\[/?INST\]|<</?SYS>>|</?s>")
# Heuristics for "the model answered instead of asking"; every drop is listed with its reason in
# dropped.jsonl, so a user can audit what these rules remove.
_ANSWER_START = re.compile(
    r"^\s*(sure[!,.]|certainly[!,.]|of course[!,.]|absolutely[!,.]|here(?:'s| is| are) (?:a|an|some|your)\b|"
    r"i(?:'m| am) (?:sorry,? (?:but|i)\b|happy to|glad to|an ai|a language model|smollm)|as an ai\b|great question\b|"
    r"thank(?:s| you) for (?:your|the) question\b|thanks for asking\b|"
    r"i(?:'d| would) be (?:happy|glad) to\b|how (?:can|may) i (?:help|assist)\b|the answer is\b)",
    re.IGNORECASE,
)
_ANSWER_ANYWHERE = re.compile(
    r"how (?:can|may) i (?:help|assist) you|as an ai(?: language)? model|my name is smollm|i(?:'m| am) smollm|"
    r"i(?:'m| am) an ai assistant|named smollm",
    re.IGNORECASE,
)


def _drop_reason(text: str, finished: bool, *, min_words: int, max_words: int, special: Sequence[str]) -> str | None:
    if not finished:
        return "truncated"
    if not text:
        return "empty"
    if any(tok and tok in text for tok in special) or _MARKUP.search(text) or _ROLE_HEADER.match(text):
        return "template_debris"
    n_words = len(text.split())
    if n_words < min_words:
        return "too_short"
    if n_words > max_words:
        return "too_long"
    if _ANSWER_START.match(text) or _ANSWER_ANYWHERE.search(text):
        return "not_instruction"
    return None


def clean_generations(
    rows: Iterable[dict[str, Any]],
    *,
    min_words: int = 3,
    max_words: int = 200,
    near_duplicate_threshold: float = 0.8,
    special_tokens: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split raw generations into kept instructions and dropped ones, each drop with a reason.

    Args:
        rows: dicts with ``raw`` (the generated user turn, decoded with special tokens, cut before
            the end-of-turn token) and ``finished`` (whether the end-of-turn token came). Other keys
            are carried over.
        min_words: fewer whitespace-separated words than this is ``too_short``.
        max_words: more words than this is ``too_long``.
        near_duplicate_threshold: Jaccard similarity of character 5-gram sets at or above which a
            text counts as a near duplicate of an earlier kept one (1.0 disables near-duplicate
            detection beyond exact duplicates).
        special_tokens: strings whose presence marks template debris (the tokenizer's special tokens).

    Returns:
        ``(kept, dropped)``: kept rows gain ``instruction`` (the stripped text); dropped rows gain
        ``instruction`` and ``drop_reason`` (one of `DROP_REASONS`) and, for duplicates, ``duplicate_of``
        (the ``index`` or position of the kept row they repeat). Order is preserved; the first of
        several duplicates is kept.

    Examples:
        >>> kept, dropped = clean_generations([
        ...     {"raw": "Write a haiku about rain.", "finished": True},
        ...     {"raw": "write a haiku about RAIN!", "finished": True},
        ...     {"raw": "Sure! Here is a haiku.", "finished": True}])
        >>> [r["instruction"] for r in kept], [r["drop_reason"] for r in dropped]
        (['Write a haiku about rain.'], ['duplicate', 'not_instruction'])
    """
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"Need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}.")
    if not 0.0 < near_duplicate_threshold <= 1.0:
        raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {near_duplicate_threshold}.")
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}
    kept_shingles: list[frozenset[str]] = []
    kept_ids: list[Any] = []
    postings: dict[str, list[int]] = defaultdict(list)
    for pos, row in enumerate(rows):
        text = str(row.get("raw", "")).strip()
        out = {**row, "instruction": text}
        rid = row.get("index", pos)
        reason = _drop_reason(text, bool(row.get("finished", True)), min_words=min_words, max_words=max_words,
                              special=special_tokens)
        norm = normalize_text(text)
        if reason is None and norm in seen:
            reason, out["duplicate_of"] = "duplicate", seen[norm]
        sh = shingles(norm) if reason is None else frozenset()
        if reason is None and near_duplicate_threshold < 1.0:
            shared: Counter[int] = Counter()
            for g in sh:
                shared.update(postings.get(g, ()))
            for j, inter in shared.items():
                if jaccard(sh, kept_shingles[j], shared=inter) >= near_duplicate_threshold:
                    reason, out["duplicate_of"] = "near_duplicate", kept_ids[j]
                    break
        if reason is not None:
            out["drop_reason"] = reason
            dropped.append(out)
            continue
        seen[norm] = rid
        j = len(kept_shingles)
        kept_shingles.append(sh)
        kept_ids.append(rid)
        for g in sh:
            postings[g].append(j)
        kept.append(out)
    return kept, dropped


def _generate_batch(
    model: LoadedModel,
    prefix: str,
    size: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Sample ``size`` user turns after the same prefix (no padding needed) on the HF engine; RNG state is restored."""
    tok = model.tokenizer
    decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p)
    gens = engine(model).generate([prefix] * size, decoding, seed=seed)  # stops at end-of-turn or EOS
    return [{"raw": tok.decode(g.token_ids, skip_special_tokens=False), "finished": g.finished,
             "n_tokens": g.n_tokens} for g in gens]


def synthesize_instructions(
    model: LoadedModel,
    n: int,
    *,
    temperature: float = SynthesisConfig.temperature,
    top_p: float = SynthesisConfig.top_p,
    max_new_tokens: int = SynthesisConfig.max_new_tokens,
    batch_size: int = SynthesisConfig.batch_size,
    seed: int = 0,
    system_prompt: str | None = SynthesisConfig.system_prompt,
    min_words: int = SynthesisConfig.min_words,
    max_words: int = SynthesisConfig.max_words,
    near_duplicate_threshold: float = SynthesisConfig.near_duplicate_threshold,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> datasets.Dataset:
    """Let the model write ``n`` user turns and keep the usable ones.

    Args:
        model: from `icon2_lens.load_model`; sampling runs HF ``generate`` on
            the HF engine of `icon2_lens.gen` (the bridge's weights, HF's fast path; nothing hooked).
        n: number of generations (the kept count is smaller; see the report).
        temperature: sampling temperature (Magpie: 1.0).
        top_p: nucleus sampling mass (Magpie: 0.99); ``top_k`` is off.
        max_new_tokens: budget for one user turn; a turn without end-of-turn token within it is
            dropped as ``truncated``.
        batch_size: generations per batch (all share the prefix, so there is no padding).
        seed: batch ``b`` samples with a seed derived from ``(seed, b)``; the caller's RNG state is
            restored afterwards. Same seed and settings, same output.
        system_prompt: ``None`` keeps whatever the template renders without a system message
            (SmolLM2 inserts its default one); a string replaces it.
        min_words: clean-up: shorter is ``too_short`` (`clean_generations`).
        max_words: clean-up: longer is ``too_long``.
        near_duplicate_threshold: clean-up: character 5-gram Jaccard similarity counted as a near duplicate.
        out: a folder to make the run resumable: raw generations are appended to ``raw.jsonl`` after
            every batch, and a rerun with the same settings continues after the last complete
            batch (a larger ``n`` extends the run). At the end ``instructions.jsonl`` (kept),
            ``dropped.jsonl`` (with reasons) and ``report.json`` are written atomically.
        progress: show a progress bar.
        shard: ``(i, n)``: run only batches ``b`` with ``b % n == i`` of the same batches the unsharded
            run forms (same seeds), for data-parallel runs (`icon2_lens.shards`). With ``out`` the folder
            gets ``raw.jsonl``, ``synthesis.json`` (recording the shard; a rerun continues it) and, when
            finished, ``shard.json``; clean-up and de-duplication need all rows, so they are left to
            `icon2_lens.merge_shards`, which writes ``instructions.jsonl`` and the rest.

    Returns:
        A ``datasets.Dataset`` of kept instructions with provenance columns ``instruction``, ``raw``,
        ``index``, ``seed`` (the batch's seed), ``n_tokens``, ``temperature``, ``top_p``,
        ``max_new_tokens``, ``system_prompt``, ``model``. The counts (generated, kept, dropped per
        reason, duplicate share, speed) are in ``synthesis_report(ds)``. With a ``shard``: the shard's
        rows cleaned on their own (duplicates across shards are only found by the merge), a preview.

    Examples:
        >>> ds = il.synthesize_instructions(model, 64, seed=0)  # doctest: +SKIP
        >>> il.synthesis.synthesis_report(ds)["kept"]  # doctest: +SKIP
        41
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise BadInputError(f"n must be a positive number of generations, got {n!r}.", option="n")
    _check_settings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    min_words=min_words, max_words=max_words, near_duplicate_threshold=near_duplicate_threshold)
    clean_kwargs: dict[str, Any] = dict(min_words=min_words, max_words=max_words,
                                        near_duplicate_threshold=near_duplicate_threshold)
    clean_generations([], **clean_kwargs)  # validate the clean-up options before the slow part
    pq = pre_query_template(model.tokenizer, system_prompt=system_prompt)
    settings = {
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "seed": seed, "system_prompt": system_prompt, "prefix": pq.prefix, "model": model.info.model_id,
        "fingerprint": model.info.fingerprint,
    }
    special = [t for t in model.tokenizer.all_special_tokens if t]

    def make(b: int, covers: range, s: int) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        new = _generate_batch(model, pq.prefix, len(covers), temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens, seed=s)
        secs = (time.perf_counter() - t0) / len(new)
        return [{**r, "seconds": secs} for r in new]

    job = BatchJob(stage="synthesize", n_rows=n, batch_size=batch_size, seed=seed, make=make, whole_batches=True,
                   desc="synthesizing", unit="instr",
                   shard_settings={"cleanup": clean_kwargs, "special_tokens": special})
    start = time.perf_counter()
    rows = run_batches(job, out=out, settings=settings, shard=shard, progress=progress)
    if shard is not None:
        out = None  # clean-up and de-duplication over all shards are the merge's job
    return finish_synthesis(rows, settings, n=n, folder=out, special_tokens=special,
                            wall=time.perf_counter() - start, **clean_kwargs)


def finish_synthesis(rows: list[dict[str, Any]], settings: dict[str, Any], *, n: int,
                      folder: str | os.PathLike[str] | None, special_tokens: Sequence[str], wall: float,
                      min_words: int, max_words: int, near_duplicate_threshold: float) -> datasets.Dataset:
    """Clean up the raw rows with ``index < n`` (in index order) into the kept dataset; with a folder, write
    ``instructions.jsonl``, ``dropped.jsonl`` and ``report.json`` (shared by the run and the shard merge)."""
    from datasets import Dataset, DatasetInfo

    rows = [r for r in rows if r["index"] < n]
    kept, dropped = clean_generations(rows, special_tokens=special_tokens, min_words=min_words, max_words=max_words,
                                      near_duplicate_threshold=near_duplicate_threshold)
    report = _report(rows, kept, dropped, wall=wall)
    provenance = {k: settings[k] for k in ("temperature", "top_p", "max_new_tokens", "system_prompt", "model")}
    cols = ["instruction", "raw", "index", "seed", "n_tokens"]
    table = {c: [r[c] for r in kept] for c in cols}
    table.update({k: [v] * len(kept) for k, v in provenance.items()})
    ds = Dataset.from_dict(table, info=DatasetInfo(description=json.dumps(report)))
    if folder is not None:
        folder = Path(folder)
        atomic_write_text(folder / names.INSTRUCTIONS, "".join(json.dumps(r) + "\n" for r in ds))
        drop_cols = [*cols, "drop_reason", "duplicate_of", "finished"]
        atomic_write_text(folder / names.DROPPED, "".join(
            json.dumps({c: r.get(c) for c in drop_cols}) + "\n" for r in dropped))
        atomic_write_text(folder / names.SYNTHESIS_REPORT, json.dumps(report, indent=2))
    return ds


def _report(rows: list[dict[str, Any]], kept: list[dict[str, Any]], dropped: list[dict[str, Any]], *,
            wall: float) -> dict[str, Any]:
    reasons = Counter(r["drop_reason"] for r in dropped)
    gen_seconds = sum(float(r.get("seconds", 0.0)) for r in rows)
    n = len(rows)
    return {
        "generated": n,
        "kept": len(kept),
        "kept_share": len(kept) / n if n else 0.0,
        "dropped": {k: reasons.get(k, 0) for k in DROP_REASONS},
        "duplicate_share": (reasons["duplicate"] + reasons["near_duplicate"]) / n if n else 0.0,
        "generated_tokens": sum(int(r.get("n_tokens", 0)) for r in rows),
        "generation_seconds": gen_seconds,
        "generated_per_second": n / gen_seconds if gen_seconds else None,
        "kept_per_second": len(kept) / gen_seconds if gen_seconds else None,
        "wall_seconds_this_call": wall,
    }


def synthesis_report(ds: datasets.Dataset) -> dict[str, Any]:
    """The counts `synthesize_instructions` attached to its dataset.

    Keys: ``generated``, ``kept``, ``kept_share``, ``dropped`` (count per reason in `DROP_REASONS`),
    ``duplicate_share``, ``generated_tokens``, ``generation_seconds``, ``generated_per_second``,
    ``kept_per_second``.

    Examples:
        >>> synthesis_report(ds)["dropped"]["duplicate"]  # doctest: +SKIP
        12
    """
    try:
        report = json.loads(ds.info.description or "")
    except (json.JSONDecodeError, AttributeError):
        report = None
    if not isinstance(report, dict) or "generated" not in report:
        raise ValueError("This dataset carries no synthesis report; it was not made by synthesize_instructions "
                         "(a reloaded instructions.jsonl has it beside it in report.json).")
    return report
