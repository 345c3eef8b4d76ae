"""The whole method as one resumable run, the merge of sharded stages, and the comparison with the baselines."""

from __future__ import annotations

from .compare import CompareConfig, CompareResult, compare_methods
from .merge import merge_shards
from .run import PipelineResult, RunConfig, compare, load_config, run_pipeline, stage_keys

__all__ = ["PipelineResult", "RunConfig", "load_config", "merge_shards", "run_pipeline", "stage_keys", "compare",
           "compare_methods", "CompareConfig", "CompareResult"]
