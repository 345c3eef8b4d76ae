"""DirectionSet.response_separation: the layer report's measure (c) averaged over the steering layers (no model)."""

from __future__ import annotations

import pytest
import torch

from icon2_lens.directions import DirectionSet
from icon2_lens.layers import LayerReport

CRITERIA = ["general", "helpful", "honest", "harmless"]
LAYERS = [0, 1, 2, 3, 4]
# (c) per criterion and layer; general has no response pairs (None), harmless reads backwards
RESPONSE = [
    [None, None, None, None, None],
    [0.50, 0.70, 0.80, 0.90, 0.60],
    [0.40, 0.60, None, 0.70, 0.50],
    [0.30, 0.10, 0.00, 0.20, 0.40],
]


def _dirs(**meta) -> DirectionSet:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(len(CRITERIA), len(LAYERS), 8, generator=g)
    stats = {k: torch.ones(len(CRITERIA), len(LAYERS)) for k in ("resid_norm", "proj_mean", "proj_std")}
    return DirectionSet(vectors=v / v.norm(dim=-1, keepdim=True), criteria=list(CRITERIA), stats=stats,
                        meta={"layers": LAYERS, "hook": "resid_post", **meta})


def _report() -> dict:
    return {"criteria": CRITERIA, "layers": LAYERS, "suggested_layers": [1, 2, 3], "response": RESPONSE}


def test_without_a_layer_report_it_is_empty():
    assert _dirs().response_separation() == {}
    assert _dirs(suggested_layers=[1, 2]).response_separation() == {}
    assert _dirs(layer_report={}).response_separation() == {}


def test_mean_over_the_suggested_layers():
    dirs = _dirs().with_meta(suggested_layers=[1, 2, 3], layer_report=_report())
    sep = dirs.response_separation()
    assert list(sep) == CRITERIA
    assert sep["general"] is None  # no response pairs
    assert sep["helpful"] == pytest.approx((0.7 + 0.8 + 0.9) / 3)
    assert sep["honest"] == pytest.approx((0.6 + 0.7) / 2)  # the missing layer is skipped, not counted as 0
    assert sep["harmless"] == pytest.approx(0.1)  # below 0.5: the direction reads backwards


def test_explicit_layers_and_fallbacks():
    dirs = _dirs().with_meta(suggested_layers=[1, 2, 3], layer_report=_report())
    assert dirs.response_separation([0])["helpful"] == pytest.approx(0.5)
    assert dirs.response_separation([2])["honest"] is None  # only a missing value there
    assert dirs.response_separation([3, 99])["harmless"] == pytest.approx(0.2)  # a layer the report lacks is ignored
    # no suggested range: every layer of the report
    no_range = _dirs(layer_report=_report())
    assert no_range.response_separation()["helpful"] == pytest.approx((0.5 + 0.7 + 0.8 + 0.9 + 0.6) / 5)


def test_with_meta_leaves_the_original_alone():
    plain = _dirs()
    with_rep = plain.with_meta(layer_report=_report())
    assert plain.response_separation() == {} and with_rep.response_separation() != {}


def test_from_a_layer_report_object_and_through_save_and_load(tmp_path):
    nan = float("nan")
    t = torch.tensor([[nan if x is None else x for x in row] for row in RESPONSE])
    rep = LayerReport(criteria=CRITERIA, layers=LAYERS, heldout=torch.zeros(4, 5), paraphrase=torch.zeros(4, 5),
                      response=t, suggested_layers=[1, 2, 3], counts={})
    dirs = rep.apply(_dirs())
    assert dirs.suggested_layers == [1, 2, 3]
    sep = dirs.response_separation()
    assert sep["general"] is None and sep["honest"] == pytest.approx(0.65)
    assert sep["helpful"] == pytest.approx(0.8) and sep["harmless"] == pytest.approx(0.1)
    dirs.save(tmp_path / "d")
    assert DirectionSet.load(tmp_path / "d").response_separation() == pytest.approx(sep)
