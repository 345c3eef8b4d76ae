"""A toy pair-making method in one module: chosen is the greedy answer, rejected a hot sample of the same prompt.

It shows what a new method needs (docs/extending.md): a config dataclass (the one source of its defaults),
a `make_pairs` on the engine seam and the batch runner (so it is seeded, resumable and shardable), and a
`StageSpec` (its one registration). It is not a good method; it is a short one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import icon2_lens as il
from icon2_lens.gen import Decoding, engine
from icon2_lens.pipeline.stages import StageSpec
from icon2_lens.runs import BatchJob, names, run_batches


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    """Attributes:
        max_new_tokens: token budget per response.
        temperature: the rejected side's sampling temperature.
        batch_size: instructions per batch.
    """

    max_new_tokens: int = 8
    temperature: float = 2.0
    batch_size: int = 2


def make_pairs(model: il.LoadedModel, instructions: list[str], config: ToyConfig = ToyConfig(), *, seed: int = 0,
               out: Path | None = None, shard: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """One TRL conversational pair per instruction, with provenance."""
    eng, tok = engine(model), model.tokenizer

    def make(b: int, covers: range, s: int) -> list[dict[str, Any]]:
        qs = [instructions[i] for i in covers]
        prompts = [il.render_chat(tok, q) for q in qs]
        good = eng.generate(prompts, Decoding(max_new_tokens=config.max_new_tokens), seed=s)
        bad = eng.generate(prompts, Decoding(max_new_tokens=config.max_new_tokens, do_sample=True,
                                             temperature=config.temperature), seed=s)
        return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c.text}],
                 "rejected": [{"role": "assistant", "content": r.text}], "method": "toy",
                 "chosen_finished": c.finished, "rejected_finished": r.finished} for q, c, r in zip(qs, good, bad)]

    job = BatchJob(stage="toy", n_rows=len(instructions), batch_size=config.batch_size, seed=seed, make=make,
                   files=names.STAGE_FILES["generate"], desc="toy pairs", unit="pair")
    return run_batches(job, out=out, settings={"method": "toy", **asdict(config)}, shard=shard, progress=False)


def _run(ctx: Any, folder: Path, meter: Any, cfg: ToyConfig, section: Any) -> tuple[int, list[Path]]:
    rows = il.runs.io.read_jsonl(ctx.out / "score" / names.SELECTED)
    pairs = make_pairs(ctx.model, [r["instruction"] for r in rows], cfg, seed=ctx.cfg.seed, out=folder)
    return len(pairs), [folder / names.PAIRS]


SPEC = StageSpec("toy", ("score",), ToyConfig, _run, help="toy pairs: greedy vs a hot sample")
