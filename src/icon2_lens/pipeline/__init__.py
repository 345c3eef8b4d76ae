"""The whole method as one resumable run, and the merge of sharded stages."""

from __future__ import annotations

from .merge import merge_shards
from .run import PipelineResult, RunConfig, load_config, run_pipeline, stage_keys

__all__ = ["PipelineResult", "RunConfig", "load_config", "merge_shards", "run_pipeline", "stage_keys"]
