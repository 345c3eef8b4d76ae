"""Every stage folder's file names, in one place.

The stages, the shard merge, the pipeline and the CLI read these names from here, so a name is
never spelled twice. `STAGE_FILES` gives the files of the resumable, shardable stages: a settings
file (written first; a rerun with the same settings continues the run) and an append-only data
file (written batch by batch).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StageFiles", "STAGE_FILES", "SHARDABLE"]

# A run directory (`icon2_lens.run_pipeline`).
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
RUN_REPORT = "report.md"
COSTS = "costs.json"
SHARD = "shard.json"
# extract / layers
DIRECTIONS = "directions"
DIRECTIONS_TENSORS = "directions.safetensors"
DIRECTIONS_META = "directions.json"
LAYER_REPORT = "layer_report"  # .json / .md / .png
# synthesize
SYNTHESIS_SETTINGS = "synthesis.json"
RAW = "raw.jsonl"
INSTRUCTIONS = "instructions.jsonl"
DROPPED = "dropped.jsonl"
SYNTHESIS_REPORT = "report.json"
# score
SCORES = "scores.jsonl"
SELECTED = "selected.jsonl"
SCORE_HISTOGRAM = "consistency_hist.png"
SCORE_REPORT = "score_report.json"
# generate (and every pair-making method)
GENERATION_SETTINGS = "generation.json"
PAIRS = "pairs.jsonl"
PAIR_REPORT = "report.json"
# calibrate
GAMMAS = "gammas.yaml"
# train
TRAINED_MODEL = "trained_model"
TRAIN_LOG = "train_log.jsonl"
TRAIN_CURVE = "train_curve.png"
TRAIN_CONFIG = "train_config.json"
# evaluate
METRICS = "metrics.json"
EVAL_REPORT = "report.md"
PROBE_SHIFT = "probe_shift.png"


@dataclass(frozen=True)
class StageFiles:
    """The files of a resumable, shardable stage.

    Attributes:
        settings: the settings file (``None``: the stage writes its data in one go).
        data: the rows file (append-only for resumable stages).
        outputs: every file the finished (unsharded or merged) stage writes.
        shard_outputs: what a finished shard folder holds.
    """

    settings: str | None
    data: str
    outputs: tuple[str, ...]
    shard_outputs: tuple[str, ...]


STAGE_FILES: dict[str, StageFiles] = {
    "synthesize": StageFiles(SYNTHESIS_SETTINGS, RAW,
                             (INSTRUCTIONS, DROPPED, SYNTHESIS_REPORT, RAW, SYNTHESIS_SETTINGS),
                             (RAW, SYNTHESIS_SETTINGS, SHARD)),
    "score": StageFiles(None, SCORES, (SCORES, SELECTED, SCORE_HISTOGRAM, SCORE_REPORT), (SCORES, SHARD)),
    "generate": StageFiles(GENERATION_SETTINGS, PAIRS, (PAIRS, GENERATION_SETTINGS, PAIR_REPORT),
                           (PAIRS, GENERATION_SETTINGS, SHARD)),
}
#: The stages that can be cut into shards and merged.
SHARDABLE = tuple(STAGE_FILES)
