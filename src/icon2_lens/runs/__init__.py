"""Run infrastructure: atomic io, file names, the one resumable/shardable batch runner, shards, costs.

- `icon2_lens.runs.io`: atomic writes and folders, JSONL read/append, resumable run folders.
- `icon2_lens.runs.names`: every stage folder's file names, in one place.
- `icon2_lens.runs.batches`: `BatchJob` and `run_batches`, the loop every row-making stage runs on.
- `icon2_lens.runs.shards`: shard specs and reading finished shard folders back.
- `icon2_lens.runs.costs`: tokens, forward passes, wall time and memory of a stage.
"""

from __future__ import annotations

from . import names
from .batches import BatchJob, run_batches
from .costs import CostMeter, StageCost, cost_table, load_costs, measure_costs

__all__ = ["BatchJob", "CostMeter", "StageCost", "cost_table", "load_costs", "measure_costs", "names", "run_batches"]
