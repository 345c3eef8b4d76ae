"""The whole method as one resumable run, the merge of sharded stages, the comparison with the baselines, and
Mind's Mirror end to end (`run_distill`)."""

from __future__ import annotations

from .compare import CompareConfig, CompareResult, compare_methods
from .distill_run import DistillConfig, DistillResult, run_distill
from .merge import merge_shards
from .run import PipelineResult, RunConfig, compare, load_config, run_pipeline, stage_keys

__all__ = ["PipelineResult", "RunConfig", "load_config", "merge_shards", "run_pipeline", "stage_keys", "compare",
           "compare_methods", "CompareConfig", "CompareResult", "run_distill", "DistillConfig", "DistillResult"]
