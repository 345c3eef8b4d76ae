"""reports: every Markdown table and figure, on hand-made plain data. No model."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from icon2_lens import reports
from icon2_lens.calibration import CalibrationResult
from icon2_lens.layers import LayerReport
from icon2_lens.runs.costs import StageCost
from icon2_lens.runs.costs import cost_table as runs_cost_table

NAN = float("nan")


def test_reports_imports_no_stage_module():
    """reports sits below the stages: only torch, matplotlib and the standard library."""
    tree = ast.parse(Path(reports.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"reports imports a package module: {node.module}"
            found.add((node.module or "").split(".")[0])
    assert found - set(sys.stdlib_module_names) <= {"torch", "matplotlib", "__future__"}


# ---- evaluation ------------------------------------------------------------------------------------------

def _cell(n, acc, margin, shift=None):
    c = {"n": n, "preference_accuracy": acc, "margin_mean": margin, "margin_ci_low": margin - 0.01,
         "margin_ci_high": margin + 0.01, "chosen_tokens_mean": 40.0, "rejected_tokens_mean": 38.0,
         "chosen_words_mean": 30.0, "rejected_words_mean": 29.0, "implicit_reward_accuracy": None}
    if shift is not None:
        c.update(margin_shift_mean=shift, margin_shift_ci_low=shift - 0.002, margin_shift_ci_high=shift + 0.002,
                 margin_rose_share=0.6, implicit_reward_accuracy=0.55)
    return c


METRICS = {
    "n_instructions": 2, "models": {"base": "base-m", "trained": "trained-m", "swapped": "swapped-m"},
    "preference": {
        "reference": "base", "level": 0.9, "n_boot": 100, "seed": 0,
        "set": {"n": 4, "sha256": "ab" * 32, "criteria": ["helpful"]},
        "models": {"base": {"all": _cell(4, 0.5, -0.1)}, "trained": {"all": _cell(4, 0.75, -0.09, 0.01)},
                   "swapped": {"all": _cell(4, 0.25, -0.11, -0.01)}},
        "contrasts": {"subject": "trained", "controls": {"swapped": {"all": {
            "mean": 0.02, "low": 0.001, "high": 0.04, "n": 4, "level": 0.9, "distinguishable": True}}}},
    },
    "self_probe": {"helpful": {"base": 0.1, "trained": 0.25, "shift": 0.15, "shift_ci_low": 0.05,
                               "shift_ci_high": 0.2, "n": 2}},
    "judge": {"name": "fake", "n": 2, "win": 0.5, "tie": 0.5, "loss": 0.0, "first_position_share": 0.75,
              "able_to_judge": True, "note": ""},
    "degeneration": {"base": {"distinct1": 0.5, "distinct2": 0.75, "repetition_rate": 0.125, "degenerate_share": 0.0,
                              "mean_words": 12.4}},
}


def test_evaluation_markdown():
    md = reports.evaluation_markdown(METRICS)
    assert md.startswith("# Evaluation: trained-m vs base-m (controls: swapped)\n\n## Judge-free preference margins")
    # the independent figures come before the judge, and the self-probe comes last, labelled
    assert md.index("Judge-free") < md.index("## Pairwise judge") < md.index("## Self-probe shift")
    assert "| trained | all | 4 | 0.750 | -0.0900 [-0.1000, -0.0800] | +0.0100 [+0.0080, +0.0120] | 0.550 | 40 / 38 |" in md
    assert "| base | all | 4 | 0.500 | -0.1000 [-0.1100, -0.0900] | - | n/a | 40 / 38 |" in md
    assert "| swapped | all | 4 | +0.0200 [+0.0010, +0.0400] | yes |" in md
    assert "*Self-probe*: read through the same criterion directions" in md
    assert "| helpful | 0.100 | 0.250 | +0.150 [+0.050, +0.200] |" in md
    assert "picked the response shown first in 0.75 of its 4 verdicts" in md


def test_evaluation_markdown_says_when_a_judge_cannot_judge_and_when_controls_overlap():
    m = {**METRICS, "judge": {**METRICS["judge"], "first_position_share": 0.95, "able_to_judge": False,
                             "note": "unable to judge: picks the first position in 95% of verdicts"}}
    con = m["preference"]["contrasts"]["controls"]["swapped"]["all"]
    m["preference"] = {**m["preference"], "contrasts": {"subject": "trained", "controls": {"swapped": {"all": {
        **con, "low": -0.01, "distinguishable": False}}}}}
    md = reports.evaluation_markdown(m)
    assert "**unable to judge: picks the first position in 95% of verdicts**" in md
    assert "no: not distinguishable at this size" in md


def test_evaluation_markdown_without_answers():
    m = {k: v for k, v in METRICS.items() if k not in ("judge", "degeneration", "self_probe")}
    md = reports.evaluation_markdown(m)
    assert "Judge-free" in md and "Pairwise judge" not in md and "Self-probe" not in md


def test_probe_shift_and_preference_figures():
    fig = reports.probe_shift_figure(METRICS)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["helpful"]
    fig = reports.preference_figure(METRICS)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["all"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["trained", "swapped"]


# ---- calibration -----------------------------------------------------------------------------------------

CAL = {"gamma_pos": 0.1, "gamma_neg": -0.1,
       "per_gamma": [{"gamma": -0.1, "mean_score": -1.0, "degenerate_share": 0.5, "distinct2": 0.8, "n": 2},
                     {"gamma": 0.1, "mean_score": 0.5, "degenerate_share": 0.0, "distinct2": 0.9, "n": 2}],
       "pairs": [{"gamma_pos": 0.1, "gamma_neg": -0.1, "win_share": 1.0}],
       "settings": {"scorer": "probe", "win_threshold": 0.9}}


def test_calibration_table():
    assert reports.calibration_table(CAL) == """\
| gamma | side | mean score | degenerate | distinct-2 |
|---|---|---|---|---|
| -0.1 * | - | -1.000 | 0.50 | 0.80 |
| 0.1 * | + | 0.500 | 0.00 | 0.90 |

share of pairs with chosen > rejected (rows gamma+, columns gamma-):

| gamma+ \\ gamma- | -0.1 |
|---|---|
| 0.1 | **1.00** |

chosen: gamma+ = 0.1, gamma- = -0.1 (scorer probe, win threshold 0.9)"""


def test_calibration_result_delegates():
    res = CalibrationResult(**{k: CAL[k] for k in ("gamma_pos", "gamma_neg", "per_gamma", "pairs", "settings")})
    assert res.table() == reports.calibration_table(CAL)
    fig = res.figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 3  # score panel, its twin (degenerate share), win share
    assert fig.axes[1].get_title() == "pairs at gamma+ = 0.1"


# ---- layer report ----------------------------------------------------------------------------------------

GRIDS = {"heldout": torch.tensor([[1.0, 0.9, 0.8]]), "paraphrase": torch.tensor([[NAN, 0.6, 0.7]]),
         "response": torch.tensor([[0.4, 0.55, 0.65]])}


def test_layer_table():
    assert reports.layer_table(["helpful"], [0, 1, 2], [1, 2], **GRIDS) == """\
| layer | helpful a | helpful b | helpful c |
|---|---|---|---|
| 0 | 1.00 | - | 0.40 |
| 1* | 0.90 | 0.60 | 0.55 |
| 2* | 0.80 | 0.70 | 0.65 |

\\* suggested steering layers: 1-2"""
    with_stab = reports.layer_table(["helpful"], [0, 1, 2], [0, 2], **GRIDS, stability=torch.tensor([[0.9, 0.8, 0.7]]))
    assert with_stab.splitlines()[0] == "| layer | helpful a | helpful b | helpful c | helpful stab |"
    assert with_stab.splitlines()[2] == "| 0* | 1.00 | - | 0.40 | 0.90 |"
    assert with_stab.endswith("suggested steering layers: [0, 2]")


def test_layer_table_reads_json_lists():
    """``layer_report.json`` stores NaN as null: the same table from nested lists."""
    as_lists = {k: [[None if v != v else v for v in row] for row in t.tolist()] for k, t in GRIDS.items()}
    assert reports.layer_table(["helpful"], [0, 1, 2], [1, 2], **as_lists) == reports.layer_table(
        ["helpful"], [0, 1, 2], [1, 2], **GRIDS)


@pytest.mark.parametrize("stability", [None, torch.tensor([[0.9, 0.8, 0.7]])])
def test_layer_report_delegates(stability):
    rep = LayerReport(criteria=["helpful"], layers=[0, 1, 2], suggested_layers=[1, 2], counts={},
                      stability=stability, **GRIDS)
    assert rep.table() == reports.layer_table(["helpful"], [0, 1, 2], [1, 2], **GRIDS, stability=stability)
    fig = rep.figure()
    assert isinstance(fig, Figure) and len(fig.axes) == (3 if stability is None else 4)
    assert [ax.get_title() for ax in fig.axes][:3] == ["(a) held-out stimuli", "(b) paraphrased prompts",
                                                        "(c) response pairs"]


# ---- consistency histogram -------------------------------------------------------------------------------


def test_consistency_figure():
    crit = ["x", "y", "x", "y", "x"]
    cons = [0.1, 0.5, 0.3, 0.9, 0.2]
    fig = reports.consistency_figure(crit, cons, names=["y", "x", "z"], selected={"x": [0.3], "y": [0.5, 0.9]}, bins=4)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["y (n=2)", "x (n=3)", "z (n=0)"]
    counts = [sum(p.get_height() for p in ax.patches) for ax in fig.axes]
    assert counts == [2, 3, 0]  # every row in a bin
    assert [list(ax.lines[0].get_xdata()) for ax in fig.axes[:2]] == [[0.5, 0.5], [0.3, 0.3]]  # the cuts
    assert not fig.axes[2].lines
    default = reports.consistency_figure(crit, cons)  # panels in order of first appearance, no cut
    assert [ax.get_title() for ax in default.axes] == ["x (n=3)", "y (n=2)"] and not default.axes[0].lines


# ---- costs -----------------------------------------------------------------------------------------------

COSTS = [{"stage": "extract", "prompt_tokens": 1234, "generated_tokens": 0, "forward_passes": 3,
          "wall_seconds": 1.25, "peak_rss_mib": 500.4, "rows": None},
         {"stage": "generate", "prompt_tokens": 100, "generated_tokens": 5678, "forward_passes": 40,
          "wall_seconds": 12.5, "peak_rss_mib": 612.6, "rows": 24}]


def test_cost_table():
    assert reports.cost_table(COSTS, per=("kept pair", 24)) == """\
| stage | prompt tokens | generated tokens | forward passes | wall s | peak RSS MiB | rows |
|---|---|---|---|---|---|---|
| extract | 1,234 | 0 | 3 | 1.2 | 500 |  |
| generate | 100 | 5,678 | 40 | 12.5 | 613 | 24 |
| **total** | 1,334 | 5,678 | 43 | 13.8 | 613 | |
| per kept pair (24) | 56 | 237 | 1.8 | 0.57 | | |
"""


def test_cost_table_takes_stage_costs_and_the_old_name_delegates():
    stage_costs = [StageCost(**c) for c in COSTS]
    assert reports.cost_table(stage_costs) == reports.cost_table(COSTS) == runs_cost_table(stage_costs)
    assert runs_cost_table(stage_costs, per=("pair", 2)) == reports.cost_table(COSTS, per=("pair", 2))


def test_run_report_labels_the_self_probe_figure_and_counts():
    from icon2_lens.runs.costs import StageCost

    costs = [StageCost(stage="generate", prompt_tokens=10, generated_tokens=4, forward_passes=3, wall_seconds=2.0,
                       rows=2)]
    md = reports.run_report(out="runs/x", model="m", seed=0, order=["generate"], ran=["generate"], skipped=[],
                            costs=costs, counts={"kept": 5, "selected": 2, "pairs": 2},
                            pair_summary={"win_share": 0.9, "scorer": "probe",
                                          "chosen": {"degenerate_share": 0.0}, "rejected": {"degenerate_share": 0.5}},
                            train_history=[{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5, "reward_accuracy": 1.0,
                                                                       "reward_margin": 0.2}])
    assert "*Self-probe* (read through the steering directions" in md and "0.900 of the pairs" in md
    assert "- synthesized instructions kept: 5" in md and "- preference pairs: 2" in md
    assert "## DPO training" in md and "loss 0.6900 -> 0.5000" in md
    assert "| generate |" in md and "per kept pair" in md
