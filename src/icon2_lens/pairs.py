"""Bidirectional steered generation into TRL-ready preference pairs (METHOD.md section 4).

For each instruction, the chosen response is generated with ``gamma_pos * u_c`` added to the
residual stream at the steering layers and the rejected one with ``gamma_neg * u_c``
(``gamma_neg < gamma_pos``), where ``c`` is the instruction's assigned criterion. Both responses of
an instruction are generated in the same batch with a per-row gamma (one pass, not two). The
fast path is the HF engine of `icon2_lens.gen` (HF ``generate`` with torch forward hooks), the default for
bulk generation; ``path="bridge"`` runs the bridge engine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .activations import check_context
from .directions import DirectionSet
from .errors import BadInputError, check_finite
from .gen import Decoding, EngineKind, engine
from .gen.base import check_count
from .models import LoadedModel
from .prompts import render_chat
from .runs import names
from .runs.batches import BatchJob, run_batches
from .runs.io import read_jsonl
from .runs.shards import check_shard
from .steering import Positions, Scale, steer_spec, steering_vectors

if TYPE_CHECKING:
    import datasets

__all__ = ["PairsConfig", "generate_pairs", "generate_steered", "table_rows", "DEFAULT_GAMMA_POS", "DEFAULT_GAMMA_NEG",
           "DEFAULT_DECODING"]

#: Default strengths, in units of the criterion's own P+/P- projection gap spread over the steering layers
#: (``scale="contrast"``): chosen by the judge-free held-out margin (benchmarks/evidence_sweep.py, docs/evidence.md),
#: which found the earlier relative +0.07/-0.02 (about 31% of the residual norm) moved trained models away from
#: better answers.
DEFAULT_GAMMA_POS = 1.0
DEFAULT_GAMMA_NEG = -1.0

def generate_steered(
    model: LoadedModel,
    prompts: Sequence[str],
    *,
    directions: DirectionSet | None = None,
    criteria: str | Sequence[str] | None = None,
    gammas: float | Sequence[float] | None = None,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
    positions: Positions = "all",
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    path: Literal["hf", "bridge"] = "hf",
) -> list[dict[str, Any]]:
    """Generate one response per rendered prompt, each row steered with its own criterion and gamma.

    Prompts are left-padded into one batch. Without ``directions`` nothing is steered (plain
    generation). Sampling is seeded inside ``torch.random.fork_rng`` (the caller's RNG is untouched).

    Returns:
        One dict per prompt: ``text`` (special tokens removed, cut at the end-of-turn token),
        ``finished`` (the end-of-turn token came), ``n_tokens`` (generated, stop token included).

    Examples:
        >>> rows = generate_steered(model, [render_chat(tok, "Hi")] * 2, directions=dirs,  # doctest: +SKIP
        ...                         criteria="helpful", gammas=[0.1, -0.05], layers=range(15, 25))
    """
    decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        repetition_penalty=repetition_penalty)
    if path not in ("hf", "bridge"):
        raise ValueError(f"Unknown path {path!r}; use 'hf' or 'bridge'.")
    spec = None
    if directions is not None:
        if criteria is None or gammas is None:
            raise ValueError("Steering needs criteria and gammas along with directions.")
        directions.check_compatible(model)
        spec = steer_spec(directions, criteria, gammas, layers=layers, scale=scale, positions=positions)
    if not prompts:
        raise ValueError("No prompts to generate from.")
    check_context(model, prompts)  # the context rule (icon2_lens.activations), before the forward pass
    return [g.to_dict() for g in engine(model, path).generate(prompts, decoding, steer=spec, seed=seed)]


def _table_rows(table: Any, criterion: str | None, directions: DirectionSet) -> list[dict[str, Any]]:
    if isinstance(table, (str, os.PathLike)):
        p = Path(table)
        path = p / names.SELECTED if p.is_dir() else p
        if not path.is_file():
            if p.is_dir() and (p / names.SHARD).is_file():
                raise FileNotFoundError(f"{p} is one shard of a sharded `score` run (no selection yet); merge the "
                                        "shards first: icon2-lens merge score --out DIR SHARD_DIR ...")
            raise FileNotFoundError(f"{path} does not exist; pass a `score` output folder or its selected.jsonl.")
        table = read_jsonl(path)
    rows = []
    for r in table:
        if not isinstance(r, dict) and not hasattr(r, "keys"):
            raise ValueError(f"Each table row must be an object with 'instruction' and 'criterion', got {r!r:.60}.")
        rows.append(dict(r))
    if not rows:
        raise ValueError("The table is empty; score and select some instructions first.")
    missing = [i for i, r in enumerate(rows) if "instruction" not in r]
    if missing:
        raise ValueError("The table needs an 'instruction' column "
                         "(the output of score_instructions/select_instructions).")
    for r in rows:
        c = criterion or r.get("criterion")
        if c is None:
            raise ValueError("The table has no 'criterion' column; pass criterion='...' to steer every row along one.")
        if c not in directions.criteria:
            raise ValueError(f"Criterion {c!r} is not in the directions (which have {directions.criteria}); use one "
                             "of these, or extract directions for it (icon2-lens extract --criteria).")
        r["criterion"] = c
    return rows


@dataclass(frozen=True, kw_only=True)
class PairsConfig:
    """Settings of `generate_pairs`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        gamma_pos: strength of the chosen side (default 1: one projection gap of the criterion, spread over the
            steering layers, with ``scale="contrast"``; chosen by the judge-free held-out sweep).
        gamma_neg: strength of the rejected side, below ``gamma_pos``.
        layers: ``"suggested"`` (the layer report's range), ``"all"``, or layer ids.
        scale: ``"relative"``, ``"unit"`` or ``"contrast"``; see `icon2_lens.steer`.
        positions: ``"all"`` or ``"generated"``; see `icon2_lens.steer`.
        criterion: steer every row along this criterion instead of the table's.
        max_new_tokens: token budget per response.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling mass (with ``do_sample``).
        repetition_penalty: HF repetition penalty.
        batch_size: instructions per batch (each batch generates ``2 x batch_size`` rows).
        engine: ``"hf"`` (fast path) or ``"bridge"`` (TransformerLens hooks); see `icon2_lens.gen`.

    Examples:
        >>> PairsConfig(gamma_pos=2.0).gamma_neg
        -1.0
    """

    gamma_pos: float = DEFAULT_GAMMA_POS
    gamma_neg: float = DEFAULT_GAMMA_NEG
    layers: Literal["suggested", "all"] | list[int] = "suggested"
    scale: Scale = "contrast"
    positions: Positions = "all"
    criterion: str | None = None
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    batch_size: int = 8
    engine: EngineKind = "hf"

    def __post_init__(self) -> None:
        check_finite(self.gamma_pos, "gamma_pos")
        check_finite(self.gamma_neg, "gamma_neg")
        if not self.gamma_neg < self.gamma_pos:
            raise BadInputError(f"gamma_neg must be below gamma_pos (got gamma_pos={self.gamma_pos}, "
                                f"gamma_neg={self.gamma_neg}).", option="gamma_neg")
        check_count(self.batch_size, "batch_size")
        if self.engine not in ("hf", "bridge"):
            raise BadInputError(f"Unknown engine {self.engine!r}; use 'hf' or 'bridge'.", option="engine")
        self.decoding()  # validates the decoding settings (max_new_tokens, temperature, top_p, repetition_penalty)

    def decoding(self) -> Decoding:
        """The decoding settings as a `icon2_lens.gen.Decoding`."""
        return Decoding(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
                        top_p=self.top_p, repetition_penalty=self.repetition_penalty)


#: Default decoding settings of `generate_pairs` (from `PairsConfig`).
DEFAULT_DECODING: dict[str, Any] = {k: getattr(PairsConfig, k) for k in (
    "max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty")}


def generate_pairs(
    model: LoadedModel,
    directions: DirectionSet,
    table: datasets.Dataset | Sequence[dict[str, Any]] | str | os.PathLike[str],
    config: PairsConfig | None = None,
    *,
    gamma_pos: float | None = None,
    gamma_neg: float | None = None,
    layers: Sequence[int] | range | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> datasets.Dataset:
    """Generate a chosen (``+gamma_pos``) and a rejected (``gamma_neg``) response per instruction.

    Args:
        model: from `icon2_lens.load_model`; must match the directions.
        directions: the `DirectionSet` (its suggested layers are the default range).
        table: rows with ``instruction`` and ``criterion`` (`icon2_lens.select_instructions`'s output,
            a list of dicts, or a ``score`` output folder / JSONL file); ``consistency`` is carried over.
        config: a `PairsConfig` (default: its defaults); the keywords below override it.
        gamma_pos: strength of the chosen side (overrides ``config.gamma_pos``).
        gamma_neg: strength of the rejected side (overrides ``config.gamma_neg``).
        layers: steering layer ids (overrides ``config.layers``).
        seed: batch ``b`` samples with a seed derived from ``(seed, b)``.
        out: a folder: rows are appended to ``pairs.jsonl`` batch by batch; a rerun with the same
            settings skips the finished instructions (a torn last batch is cut off and redone).
        progress: progress bar (pairs/s).
        shard: ``(i, n)``: generate only the batches ``b`` with ``b % n == i`` of the batches the
            unsharded run forms (same rows, padding and seeds, so the same pairs), for data-parallel
            runs (`icon2_lens.runs.shards`). With ``out`` the shard is recorded in ``generation.json`` (a
            rerun continues it) and ``shard.json`` is written when it is finished; merge the folders
            with `icon2_lens.merge_shards`.

    Returns:
        A ``datasets.Dataset`` in TRL's conversational preference format: ``prompt`` (a user message
        list), ``chosen`` and ``rejected`` (an assistant message list each), plus ``instruction``,
        ``criterion``, ``consistency``, ``gamma_pos``, ``gamma_neg``, ``layers``, ``scale``,
        ``positions``, decoding settings, ``seed``, ``chosen_finished``, ``rejected_finished``, ``index``.
        With a ``shard``, only the shard's rows (``index`` is the row's position in the whole table).

    Examples:
        >>> pairs = il.generate_pairs(model, dirs, il.select_instructions(table))  # doctest: +SKIP
        >>> cfg = il.PairsConfig(max_new_tokens=64)
        >>> pairs = il.generate_pairs(model, dirs, kept, cfg, gamma_pos=0.05)  # doctest: +SKIP
        >>> pairs[0]["chosen"]  # doctest: +SKIP
        [{'role': 'assistant', 'content': '...'}]
    """
    from datasets import Dataset

    cfg = config or PairsConfig()
    overrides: dict[str, Any] = {k: v for k, v in {"gamma_pos": gamma_pos, "gamma_neg": gamma_neg}.items()
                                 if v is not None}
    if layers is not None:
        if not list(layers):
            raise ValueError("The layer selection is empty; pass at least one layer (or None for the suggested "
                             "range).")
        overrides["layers"] = [int(x) for x in layers]
    cfg = replace(cfg, **overrides) if overrides else cfg
    directions.check_compatible(model)
    shard = check_shard(shard)
    rows = _table_rows(table, cfg.criterion, directions)
    if cfg.layers == "suggested":
        layer_list: list[int] = list(directions.suggested_layers or [])  # none: steering_vectors says what to do
    elif cfg.layers == "all":
        layer_list = list(directions.layers)
    else:
        layer_list = [int(x) for x in cfg.layers]  # steering_vectors names a layer the directions lack
    steering_vectors(directions, rows[0]["criterion"], cfg.gamma_pos, layers=layer_list or None,
                     scale=cfg.scale)  # validate
    tok = model.tokenizer
    check_context(model, [render_chat(tok, r["instruction"]) for r in rows], what="instructions")  # before any batch
    gamma_pos, gamma_neg, scale, positions = cfg.gamma_pos, cfg.gamma_neg, cfg.scale, cfg.positions
    max_new_tokens, do_sample, temperature, top_p = cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p
    repetition_penalty, batch_size, path = cfg.repetition_penalty, cfg.batch_size, cfg.engine
    settings = {"gamma_pos": gamma_pos, "gamma_neg": gamma_neg, "layers": layer_list, "scale": scale,
                "positions": positions, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                "temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty, "seed": seed,
                "path": path, "batch_size": batch_size, "model": model.info.model_id,
                "fingerprint": model.info.fingerprint}

    def make(b: int, covers: range, s: int) -> list[dict[str, Any]]:
        chunk = [rows[i] for i in covers]
        prompts = [render_chat(tok, r["instruction"]) for r in chunk]
        crits = [r["criterion"] for r in chunk]
        k = len(chunk)
        gen = generate_steered(
            model, prompts + prompts, directions=directions, criteria=crits + crits,
            gammas=[gamma_pos] * k + [gamma_neg] * k, layers=layer_list or None, scale=scale, positions=positions,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=s, path=path)
        new = []
        for i, r in enumerate(chunk):
            c, rj = gen[i], gen[k + i]
            new.append({
                "prompt": [{"role": "user", "content": r["instruction"]}],
                "chosen": [{"role": "assistant", "content": c["text"]}],
                "rejected": [{"role": "assistant", "content": rj["text"]}],
                "instruction": r["instruction"], "criterion": r["criterion"],
                "consistency": float(r["consistency"]) if r.get("consistency") is not None else None,
                "gamma_pos": gamma_pos, "gamma_neg": gamma_neg, "layers": layer_list, "scale": scale,
                "positions": positions, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                "temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty, "seed": s,
                "chosen_finished": c["finished"], "rejected_finished": rj["finished"],
                "chosen_tokens": c["n_tokens"], "rejected_tokens": rj["n_tokens"],
            })
        return new

    def check(row: dict[str, Any], index: int) -> None:
        if row.get("instruction") != rows[index]["instruction"]:
            raise ValueError(f"{out} holds pairs of another table (another table was used at row {index}); choose "
                             "another folder.")

    digest = hashlib.sha256(json.dumps([[r["instruction"], r["criterion"], r.get("consistency")]
                                        for r in rows], default=str).encode()).hexdigest()
    job = BatchJob(stage="generate", n_rows=len(rows), batch_size=batch_size, seed=seed, make=make, check=check,
                   desc="generating pairs", unit="pair", shard_settings={"table_sha256": digest})
    done = run_batches(job, out=out, settings=settings, shard=shard, progress=progress)
    return Dataset.from_list(done)


#: The public name of the table reader (used by calibration and the CLI).
table_rows = _table_rows
