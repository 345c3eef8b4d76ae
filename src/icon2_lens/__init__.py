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
    il.train(pairs, output_dir="out/trained")                  # DPO (or SimPO) with TRL on a fresh HF copy
    il.run_pipeline(out="runs/icon2")                         # everything, resumable, with costs and a report
    il.make_pairs("sampling_ranking", model, kept)           # a competing method, same seam and accounting
    il.compare(il.CompareConfig(n=64), out="runs/compare")    # Icon2 vs the baselines: cost, quality, controls
    il.run_distill(il.DistillConfig(), out="runs/distill")    # Mind's Mirror: teacher data, students, accuracy

Building blocks live in subpackages: `il.gen` (the engine seam), `il.math` (pure math), `il.runs`
(batch runner, io, shards, costs), `il.judges`, `il.reports`, `il.pipeline`, and the stage modules
(`il.pairs`, `il.scoring`, ...); the independent evidence in `il.preference` (judge-free margins on
held-out human-written pairs) and `il.controls` (swapped and random-direction controls); Mind's Mirror's parts in
`il.distill` (problems, extraction rules, teacher data, answer probe, student).
"""

# Building blocks reachable as il.gen, il.judges, il.math, il.reports, il.runs (redundant aliases: explicit re-exports).
from . import baselines as baselines
from . import controls as controls
from . import distill as distill
from . import gen as gen
from . import judges as judges
from . import math as math
from . import preference as preference
from . import reports as reports
from . import runs as runs
from .activations import read_last_token
from .baselines import make_pairs
from .calibration import calibrate_gamma
from .controls import make_controls
from .criteria import DEFAULT_CRITERIA, Criterion, load_criteria
from .directions import DirectionSet, extract_directions
from .errors import BadFileError, BadInputError
from .evaluation import evaluate
from .instructions import load_instructions
from .layers import layer_report
from .models import LoadedModel, load_model
from .pairs import PairsConfig, generate_pairs
from .pipeline import (
    CompareConfig,
    DistillConfig,
    RunConfig,
    compare,
    load_config,
    merge_shards,
    run_distill,
    run_pipeline,
)
from .preference import load_preference_set
from .prompts import render_chat
from .runs.costs import measure_costs
from .scoring import score_instructions, select_instructions
from .steering import steer
from .synthesis import synthesize_instructions
from .training import TrainConfig, train, train_dpo

__version__ = "0.1.0"

__all__ = [
    # models and data
    "load_model", "LoadedModel", "DEFAULT_CRITERIA", "Criterion", "load_criteria", "load_instructions",
    "render_chat", "read_last_token",
    # the Icon2 stages
    "extract_directions", "DirectionSet", "layer_report", "synthesize_instructions", "score_instructions",
    "select_instructions", "generate_pairs", "PairsConfig", "steer", "calibrate_gamma",
    "train", "train_dpo", "TrainConfig",
    # evidence
    "evaluate", "load_preference_set", "make_controls",
    # the competing methods
    "make_pairs", "compare", "CompareConfig",
    # Mind's Mirror (distilling rationales and self-evaluation into a student)
    "run_distill", "DistillConfig",
    # runs
    "run_pipeline", "RunConfig", "load_config", "merge_shards", "measure_costs",
    # errors: bad input (a ValueError naming the option) and a bad file (naming the file)
    "BadInputError", "BadFileError",
]
