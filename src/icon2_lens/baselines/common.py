"""What every pair-making method shares: its response budget, its input rows, its output rows and its run.

A method module (`icon2_lens.baselines.system_prompts`, ...) defines a config dataclass that extends
`ResponseBudget` (so every method has the same token budget and decoding fields, and `compare` can give them
all the same budget), and a ``make_pairs`` that builds one row per instruction with `pair_row` and runs its
batches with `run_method`. `run_method` puts the batches on the one resumable, shardable, seeded batch runner
(`icon2_lens.runs.run_batches`) and, with an output folder, writes ``costs.json`` from the shared accounting
(`icon2_lens.runs.measure_costs`), split into a ``generation`` and a ``labelling`` phase as the Icon2 paper's
Table 4 splits costs.

A row that could not become a pair (a judge that could not decide, say) is still written, with
``kept: false`` and a ``drop_reason``, so a resumed run knows the instruction was done; training skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..gen import Decoding, Generation
from ..instructions import load_instructions
from ..models import LoadedModel
from ..runs import names
from ..runs.batches import BatchJob, run_batches
from ..runs.costs import CostMeter, measure_costs
from ..runs.io import read_jsonl
from ..runs.shards import check_shard

__all__ = ["ResponseBudget", "InstructionRow", "instruction_rows", "pair_row", "dropped_row", "run_method",
           "Phase", "MakeRows", "GENERATION", "LABELLING"]

#: The two cost phases of a method (the Icon2 paper's Table 4 split).
GENERATION = "generation"
LABELLING = "labelling"

#: ``phase(name)`` opens a cost phase (a no-op without a meter).
Phase = Callable[[str], AbstractContextManager[Any]]
#: Makes the rows of one batch: ``(rows of the batch, batch seed, phase) -> one output row per input row``.
MakeRows = Callable[[list["InstructionRow"], int, Phase], list[dict[str, Any]]]


@dataclass(frozen=True, kw_only=True)
class ResponseBudget:
    """The response budget and decoding every method shares (its config extends this).

    Attributes:
        max_new_tokens: token budget per response (Icon2's default: 256).
        temperature: sampling temperature of the method's samples.
        top_p: nucleus mass of the method's samples.
        repetition_penalty: HF repetition penalty (Icon2's default: 1.1).
        batch_size: instructions per batch.

    Examples:
        >>> ResponseBudget(max_new_tokens=64).decoding(do_sample=True).max_new_tokens
        64
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        self.decoding(do_sample=True)  # validates the decoding fields

    def decoding(self, *, do_sample: bool, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> Decoding:
        """The budget as a `icon2_lens.gen.Decoding` (greedy with ``do_sample=False``)."""
        return Decoding(max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=do_sample,
                        temperature=temperature or self.temperature, top_p=self.top_p,
                        repetition_penalty=self.repetition_penalty)


@dataclass(frozen=True)
class InstructionRow:
    """One input of a method: the instruction and the criterion it was assigned (``None``: none).

    Attributes:
        instruction: the user message.
        criterion: the criterion (Icon2's selection assigns one; system-prompt pairs use it).
    """

    instruction: str
    criterion: str | None = None


def instruction_rows(source: Any, *, limit: int | None = None) -> list[InstructionRow]:
    """The inputs of a method from what a user passes.

    Args:
        source: a list of strings, a list of dicts with ``instruction`` (and optional ``criterion``), a ``score``
            output folder (its ``selected.jsonl``), a JSONL file of such rows, or anything
            `icon2_lens.load_instructions` reads (a built-in set name, a TXT file, a ``synthesize`` folder).
        limit: keep the first ``limit``.

    Examples:
        >>> instruction_rows(["Name a river."])[0]
        InstructionRow(instruction='Name a river.', criterion=None)
    """
    rows: list[InstructionRow]
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        table = p / names.SELECTED if p.is_dir() and (p / names.SELECTED).is_file() else p
        if table.is_file() and table.suffix == ".jsonl":
            data = read_jsonl(table)
            if data and all(isinstance(r, dict) for r in data):
                source = data
    if isinstance(source, Sequence) and not isinstance(source, str) and source and all(
            isinstance(r, dict) for r in source):
        rows = []
        for i, r in enumerate(source):
            q = r.get("instruction")
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"Row {i} has no 'instruction' text; each row needs one (got keys {sorted(r)}).")
            c = r.get("criterion")
            rows.append(InstructionRow(q.strip(), str(c) if c is not None else None))
    else:
        rows = [InstructionRow(q) for q in load_instructions(source)]
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ValueError("No instructions to make pairs for; pass at least one.")
    return rows


def _side(g: Generation | dict[str, Any]) -> tuple[str, bool, int]:
    if isinstance(g, Generation):
        return g.text, g.finished, g.n_tokens
    return str(g["text"]), bool(g["finished"]), int(g["n_tokens"])


def pair_row(row: InstructionRow, chosen: Generation | dict[str, Any], rejected: Generation | dict[str, Any], *,
             method: str, **provenance: Any) -> dict[str, Any]:
    """A kept pair in TRL's conversational format, with the method and its provenance.

    Returns:
        ``prompt`` (the user message only: no system prompt of the method), ``chosen``, ``rejected`` (one assistant
        message each), ``instruction``, ``criterion``, ``method``, ``kept`` (true), ``chosen_finished``,
        ``rejected_finished``, ``chosen_tokens``, ``rejected_tokens`` and ``provenance``'s keys.

    Examples:
        >>> r = pair_row(InstructionRow("Hi"), {"text": "Hello!", "finished": True, "n_tokens": 3},
        ...              {"text": "Go away", "finished": True, "n_tokens": 3}, method="toy")
        >>> r["chosen"], r["kept"]
        ([{'role': 'assistant', 'content': 'Hello!'}], True)
    """
    c_text, c_fin, c_n = _side(chosen)
    r_text, r_fin, r_n = _side(rejected)
    return {"prompt": [{"role": "user", "content": row.instruction}],
            "chosen": [{"role": "assistant", "content": c_text}],
            "rejected": [{"role": "assistant", "content": r_text}],
            "instruction": row.instruction, "criterion": row.criterion, "method": method, "kept": True,
            "drop_reason": None, "chosen_finished": c_fin, "rejected_finished": r_fin, "chosen_tokens": c_n,
            "rejected_tokens": r_n, **provenance}


def dropped_row(row: InstructionRow, *, method: str, reason: str, **provenance: Any) -> dict[str, Any]:
    """A row for an instruction that gave no pair (``kept: false``, ``drop_reason``); training skips it.

    Examples:
        >>> dropped_row(InstructionRow("Hi"), method="self_rewarding", reason="tie")["kept"]
        False
    """
    return {"prompt": [{"role": "user", "content": row.instruction}], "chosen": None, "rejected": None,
            "instruction": row.instruction, "criterion": row.criterion, "method": method, "kept": False,
            "drop_reason": reason, "chosen_finished": None, "rejected_finished": None, "chosen_tokens": None,
            "rejected_tokens": None, **provenance}


@contextmanager
def _meter_for(method: str, model: LoadedModel, meter: CostMeter | None,
               out: str | os.PathLike[str] | None, extra: Sequence[Any]) -> Iterator[CostMeter | None]:
    if meter is not None:  # the caller's (e.g. the pipeline's) meter: it writes costs.json
        meter.watch_model(model)
        for m in extra:
            if hasattr(m, "bridge"):
                meter.watch_model(m)
            else:
                meter.watch(m)
        yield meter
    elif out is not None:
        with measure_costs(method, model, *extra) as own:
            yield own
        if own.costs.rows or not (Path(out) / names.COSTS).is_file():  # a rerun that made nothing keeps the figures
            own.costs.save(Path(out))
    else:
        yield None


def run_method(
    *,
    method: str,
    model: LoadedModel,
    rows: list[InstructionRow],
    config: ResponseBudget,
    make: MakeRows,
    seed: int,
    out: str | os.PathLike[str] | None,
    shard: tuple[int, int] | None,
    progress: bool,
    meter: CostMeter | None = None,
    watch: Sequence[Any] = (),
    settings: dict[str, Any] | None = None,
    key: str = "instruction",
) -> list[dict[str, Any]]:
    """Run a method's batches: seeded per batch, resumable and shardable, with costs split into phases.

    Args:
        method: the method's name (recorded in every row and in ``generation.json``).
        model: the model that generates.
        rows: the inputs (`instruction_rows`).
        config: the method's config (a `ResponseBudget`); recorded in ``generation.json``.
        make: makes a batch's rows from ``(rows, seed, phase)``; wrap generation in ``phase(GENERATION)`` and
            judging or scoring in ``phase(LABELLING)``.
        seed: the run's seed; batch ``b`` gets ``row_seed(seed, b)``.
        out: a folder: ``pairs.jsonl`` and ``generation.json`` (resumable), and ``costs.json`` when finished.
        shard: ``(i, n)``: only the batches ``b % n == i``.
        progress: progress bar.
        meter: count costs into this meter instead (the pipeline's: it writes ``costs.json`` itself).
        watch: more models to count (a reward model, a judge model).
        settings: more settings that identify the run (e.g. the scorer's name).
        key: the output row's field that holds the input instruction (checked when a run resumes; SAO writes its
            own prompt into ``instruction`` and keeps the input in ``source_instruction``).

    Returns:
        The rows (kept and dropped), in index order. ``costs.json`` counts the work of this call: its ``rows`` are
        the kept pairs made by it (a resumed run's figures cover the resumed part; a rerun that made nothing leaves
        the earlier figures), so cost per kept pair is ``total / rows``.
    """
    shard = check_shard(shard)
    digest = hashlib.sha256(json.dumps([[r.instruction, r.criterion] for r in rows]).encode()).hexdigest()
    run_settings = {"method": method, **asdict(config), **(settings or {}), "seed": seed,
                    "model": model.info.model_id, "fingerprint": model.info.fingerprint, "instructions_sha256": digest}

    def check(row: dict[str, Any], index: int) -> None:
        if row.get(key) != rows[index].instruction:
            raise ValueError(f"{out} holds pairs of other instructions (row {index} differs); choose another folder.")

    made: list[dict[str, Any]] = []

    with _meter_for(method, model, meter, out, watch) as m:
        def phase(name: str) -> AbstractContextManager[Any]:
            return m.phase(name) if m is not None else nullcontext()

        def make_batch(b: int, covers: range, s: int) -> list[dict[str, Any]]:
            new = make([rows[i] for i in covers], s, phase)
            made.extend(new)
            return new

        job = BatchJob(stage=method, n_rows=len(rows), batch_size=config.batch_size, seed=seed, make=make_batch,
                       check=check,
                       desc=f"{method} pairs", unit="pair", shard_settings={"instructions_sha256": digest},
                       files=names.STAGE_FILES["generate"])
        done = run_batches(job, out=out, settings=run_settings, shard=shard, progress=progress)
        if m is not None:
            m.costs.rows = sum(1 for r in made if r.get("kept", True))
    return done
