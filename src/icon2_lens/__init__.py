"""icon2_lens: self-synthetic preference data from a model's own residual stream (Icon2).

The public surface::

    import icon2_lens as il
    model = il.load_model()                                   # embedded SmolLM2-135M-Instruct, offline
    dirs = il.extract_directions(model, il.DEFAULT_CRITERIA, "default")
    report = il.layer_report(model, dirs); dirs = report.apply(dirs)
    dirs.save("out/directions"); dirs = il.DirectionSet.load("out/directions", model=model)
    ds = il.synthesize_instructions(model, 512)               # Magpie-style, cleaned, with provenance
    table = il.score_instructions(model, dirs, ds)            # consistency per criterion (Eq. 2/3)
    kept = il.select_instructions(table, top_fraction=0.1)
    pairs = il.generate_pairs(model, dirs, kept)              # chosen +gamma*u, rejected -gamma*u, one batch
    with il.steer(model, dirs, "helpful", 0.07): ...            # hooks removed on exit
    il.train_dpo(pairs, output_dir="out/trained")              # TRL DPO on a fresh HF copy
    il.run_pipeline(out="runs/icon2")                         # everything, resumable, with costs and a report
"""

from .activations import LastTokenReader, read_last_token
from .criteria import DEFAULT_CRITERIA, Criterion, load_criteria
from .directions import DirectionSet, directions_from_activations, extract_directions
from .instructions import builtin_instructions, load_instructions
from .layers import LayerReport, layer_report, split_half_stability, suggest_layer_range
from .models import LoadedModel, ModelInfo, load_model
from .runs.costs import StageCost, cost_table, load_costs, measure_costs
from .calibration import CalibrationResult, calibrate_gamma, load_gammas
from .evaluation import PairwiseJudge, ProbeScorer, RewardModelScorer, evaluate, pair_report
from .pairs import generate_pairs, generate_steered
from .pipeline import PipelineResult, RunConfig, load_config, run_pipeline
from .prompts import pre_query_template, render_chat
from .scoring import consistency_histogram, save_scores, score_instructions, select_instructions
from .pipeline.merge import merge_shards
from .steering import Steering, steer
from .synthesis import synthesis_report, synthesize_instructions
from .training import TrainResult, train_dpo

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult",
    "DEFAULT_CRITERIA",
    "Criterion",
    "DirectionSet",
    "LastTokenReader",
    "LayerReport",
    "LoadedModel",
    "PairwiseJudge",
    "ProbeScorer",
    "RewardModelScorer",
    "Steering",
    "TrainResult",
    "PipelineResult",
    "RunConfig",
    "StageCost",
    "ModelInfo",
    "builtin_instructions",
    "calibrate_gamma",
    "consistency_histogram",
    "cost_table",
    "directions_from_activations",
    "evaluate",
    "extract_directions",
    "generate_pairs",
    "generate_steered",
    "layer_report",
    "load_criteria",
    "load_config",
    "load_costs",
    "load_gammas",
    "load_instructions",
    "load_model",
    "measure_costs",
    "pair_report",
    "read_last_token",
    "run_pipeline",
    "pre_query_template",
    "render_chat",
    "merge_shards",
    "save_scores",
    "score_instructions",
    "select_instructions",
    "synthesis_report",
    "synthesize_instructions",
    "train_dpo",
    "split_half_stability",
    "steer",
    "suggest_layer_range",
]
