"""Inherent-consistency scoring (Eq. 2/3) and selection: pure math, the tiny model, the histogram."""

from __future__ import annotations

import json
import math

import pytest
import torch

import icon2_lens as il
from icon2_lens.directions import DirectionSet
from icon2_lens.prompts import render_chat, scoring_texts
from icon2_lens.scoring import (
    DEFAULT_TOP_FRACTION,
    assign_criteria,
    consistency_histogram,
    consistency_scores,
    project,
    scoring_layers,
)

from conftest import INSTRUCTIONS

TO_SCORE = [
    "Name three rivers in Africa.",
    "Write a limerick about a cat.",
    "How many legs does a spider have?",
    "Suggest a name for a bakery.",
    "Explain recursion to a child, with one short example.",
    "Hi",
    "What is 2+2?",
]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    return il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)


@pytest.fixture(scope="module")
def table(tiny_model, dirs):
    return il.score_instructions(tiny_model, dirs, TO_SCORE, standardize=False, progress=False)  # raw Eq. 2


def _direct(model, dirs, texts, layers=None):
    """Per-layer projections [n, criterion, layer] computed the long way round."""
    layers = dirs.layers if layers is None else layers
    h = il.read_last_token(model, texts, hook=dirs.hook, layers=layers, batch_size=len(texts), progress=False)
    vecs = dirs.vectors[:, [dirs.layers.index(x) for x in layers]]
    out = torch.empty(len(texts), len(dirs.criteria), len(layers))
    for b in range(len(texts)):
        for c in range(len(dirs.criteria)):
            for j in range(len(layers)):
                out[b, c, j] = torch.dot(h[b, j], vecs[c, j])
    return out


def _scores(table, criteria):
    return torch.tensor([table[f"score_{c}"] for c in criteria]).T


# ---- pure math ----------------------------------------------------------------------------------


def test_project_matches_loop():
    g = torch.Generator().manual_seed(0)
    h, v = torch.randn(5, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    p = project(h, v)
    assert p.shape == (5, 2, 3)
    want = torch.tensor([[[float(h[b, l] @ v[c, l]) for l in range(3)] for c in range(2)] for b in range(5)])
    torch.testing.assert_close(p, want, atol=1e-5, rtol=1e-5)
    assert project(h.double(), v.half()).dtype == torch.float32


def test_consistency_scores_raw_and_standardised():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 2, 3, generator=g)
    mean, std = torch.randn(2, 3, generator=g), torch.rand(2, 3, generator=g) + 0.5
    raw = consistency_scores(p)
    z = consistency_scores(p, mean=mean, std=std)
    assert raw.shape == z.shape == (4, 2)
    for b in range(4):
        for c in range(2):
            assert raw[b, c].item() == pytest.approx(sum(p[b, c, l].item() for l in range(3)) / 3, abs=1e-6)
            want = sum((p[b, c, l].item() - mean[c, l].item()) / std[c, l].item() for l in range(3)) / 3
            assert z[b, c].item() == pytest.approx(want, abs=1e-5)
    # mean 0 and std 1 is the raw score
    torch.testing.assert_close(consistency_scores(p, mean=torch.zeros(2, 3), std=torch.ones(2, 3)), raw)


def test_consistency_scores_errors():
    p = torch.ones(1, 2, 3)
    with pytest.raises(ValueError, match="both"):
        consistency_scores(p, mean=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="both"):
        consistency_scores(p, std=torch.ones(2, 3))
    for bad in (torch.zeros(2, 3), -torch.ones(2, 3), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])):
        with pytest.raises(ValueError, match="positive"):
            consistency_scores(p, mean=torch.zeros(2, 3), std=bad)


def test_assign_criteria_max_argmax_first_on_ties():
    best, idx = assign_criteria(torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [-3.0, -1.0, -2.0], [5.0, 5.0, 5.0]]))
    assert best.tolist() == [1.0, 2.0, -1.0, 5.0]
    assert idx.tolist() == [0, 1, 1, 0]


def _fake_dirs(layers=(0, 1, 2), suggested=None):
    c, n_l, d = 2, len(layers), 4
    meta = {"layers": list(layers), "hook": "resid_post"}
    if suggested is not None:
        meta["suggested_layers"] = suggested
    stats = {"proj_mean": torch.zeros(c, n_l), "proj_std": torch.ones(c, n_l)}
    return DirectionSet(vectors=torch.zeros(c, n_l, d), criteria=["a", "b"], stats=stats, meta=meta)


def test_scoring_layers():
    d = _fake_dirs()
    assert scoring_layers(d, "all") == [0, 1, 2]
    assert scoring_layers(d, [2, 0]) == [2, 0]
    assert scoring_layers(d, range(1, 3)) == [1, 2]
    assert scoring_layers(_fake_dirs(suggested=[1, 2]), "suggested") == [1, 2]
    with pytest.raises(ValueError, match="suggested"):
        scoring_layers(d, "suggested")
    with pytest.raises(ValueError, match="Unknown layers"):
        scoring_layers(d, "middle")
    with pytest.raises(ValueError, match=r"\[5\]"):
        scoring_layers(d, [1, 5])
    with pytest.raises(ValueError, match="not in the directions"):
        scoring_layers(d, [])


# ---- score_instructions on the tiny model ------------------------------------------------------


def test_score_columns_and_values(tiny_model, dirs, table):
    assert table.column_names == ["instruction", "score_helpful", "score_honest", "consistency", "criterion",
                                  *il.scoring.PROVENANCE_COLUMNS]  # settings travel as columns, not in Dataset.info
    assert list(table["instruction"]) == TO_SCORE
    p = _direct(tiny_model, dirs, scoring_texts(tiny_model.tokenizer, TO_SCORE))
    want = p.mean(-1)
    torch.testing.assert_close(_scores(table, dirs.criteria), want, atol=1e-5, rtol=1e-5)
    assert list(table["consistency"]) == pytest.approx(want.max(-1).values.tolist(), abs=1e-5)
    assert list(table["criterion"]) == [dirs.criteria[i] for i in want.argmax(-1).tolist()]
    s = _scores(table, dirs.criteria)
    assert list(table["consistency"]) == s.max(-1).values.tolist()  # exactly the max of the stored scores
    settings = il.scoring.table_settings(table)
    assert not table.info.description  # nothing is smuggled through Dataset.info
    assert settings["layers"] == [0, 1, 2, 3] and settings["standardize"] is False and settings["render"] == "chat"
    assert settings["criteria"] == ["helpful", "honest"] and settings["hook"] == "resid_post"


def test_score_standardized(tiny_model, dirs):
    t = il.score_instructions(tiny_model, dirs, TO_SCORE, standardize=True, progress=False)
    assert il.score_instructions(tiny_model, dirs, TO_SCORE, progress=False).to_list() == t.to_list()  # the default
    p = _direct(tiny_model, dirs, scoring_texts(tiny_model.tokenizer, TO_SCORE))
    mean, std = dirs.stats["proj_mean"], dirs.stats["proj_std"]
    want = ((p - mean) / std).mean(-1)
    torch.testing.assert_close(_scores(t, dirs.criteria), want, atol=1e-4, rtol=1e-5)
    assert list(t["criterion"]) == [dirs.criteria[i] for i in want.argmax(-1).tolist()]
    assert il.scoring.table_settings(t)["standardize"] is True


def test_score_batch_size_and_determinism(tiny_model, dirs, table):
    one = il.score_instructions(tiny_model, dirs, TO_SCORE, batch_size=1, standardize=False, progress=False)
    torch.testing.assert_close(_scores(one, dirs.criteria), _scores(table, dirs.criteria), atol=1e-5, rtol=0)
    assert list(one["criterion"]) == list(table["criterion"])
    again = il.score_instructions(tiny_model, dirs, TO_SCORE, standardize=False, progress=False)
    assert again.to_list() == table.to_list()
    with pytest.raises(ValueError, match="batch_size"):
        il.score_instructions(tiny_model, dirs, TO_SCORE, batch_size=0, progress=False)


def test_score_layers(tiny_model, dirs, table):
    with pytest.raises(ValueError, match="suggested"):
        il.score_instructions(tiny_model, dirs, TO_SCORE, layers="suggested", progress=False)
    sub = il.score_instructions(tiny_model, dirs, TO_SCORE, layers=[0, 2], standardize=False, progress=False)
    p = _direct(tiny_model, dirs, scoring_texts(tiny_model.tokenizer, TO_SCORE), layers=[0, 2])
    torch.testing.assert_close(_scores(sub, dirs.criteria), p.mean(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_scores(sub, dirs.criteria), _scores(table, dirs.criteria))
    assert il.scoring.table_settings(sub)["layers"] == [0, 2]
    sug = il.score_instructions(tiny_model, dirs.with_meta(suggested_layers=[0, 2]), TO_SCORE, layers="suggested",
                                standardize=False, progress=False)
    assert sug.to_list() == sub.to_list()
    # standardisation picks the statistics of the chosen layers
    z = il.score_instructions(tiny_model, dirs, TO_SCORE, layers=[0, 2], standardize=True, progress=False)
    mean, std = dirs.stats["proj_mean"][:, [0, 2]], dirs.stats["proj_std"][:, [0, 2]]
    torch.testing.assert_close(_scores(z, dirs.criteria), ((p - mean) / std).mean(-1), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="not in the directions"):
        il.score_instructions(tiny_model, dirs, TO_SCORE, layers=[0, 9], progress=False)


def test_score_render(tiny_model, dirs, table):
    raw = il.score_instructions(tiny_model, dirs, TO_SCORE, render="raw", standardize=False, progress=False)
    assert not torch.allclose(_scores(raw, dirs.criteria), _scores(table, dirs.criteria))
    texts = scoring_texts(tiny_model.tokenizer, TO_SCORE, render="raw")
    assert texts[0] == "<s>" + TO_SCORE[0]  # the BOS the tokenizer adds, once
    torch.testing.assert_close(_scores(raw, dirs.criteria), _direct(tiny_model, dirs, texts).mean(-1),
                               atol=1e-5, rtol=1e-5)
    assert il.scoring.table_settings(raw)["render"] == "raw"
    with pytest.raises(ValueError, match="system_prompt"):
        il.score_instructions(tiny_model, dirs, TO_SCORE, render="raw", system_prompt="Be kind.", progress=False)
    with pytest.raises(ValueError, match="render"):
        il.score_instructions(tiny_model, dirs, TO_SCORE, render="html", progress=False)
    sys_t = il.score_instructions(tiny_model, dirs, TO_SCORE, system_prompt="Be kind.", standardize=False, progress=False)
    texts = [render_chat(tiny_model.tokenizer, x, system="Be kind.") for x in TO_SCORE]
    torch.testing.assert_close(_scores(sys_t, dirs.criteria), _direct(tiny_model, dirs, texts).mean(-1),
                               atol=1e-5, rtol=1e-5)


def test_score_refuses_other_model_directions(tiny_model, other_tiny_model):
    other = il.extract_directions(other_tiny_model, ["helpful"], INSTRUCTIONS[:2], batch_size=2, progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        il.score_instructions(tiny_model, other, TO_SCORE, progress=False)


def test_score_refuses_empty_input(tiny_model, dirs, tmp_path):
    for empty in ([], ["", "   "]):
        with pytest.raises(ValueError, match="No instructions"):
            il.score_instructions(tiny_model, dirs, empty, progress=False)
    f = tmp_path / "empty.txt"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="No instructions"):
        il.score_instructions(tiny_model, dirs, f, progress=False)


def test_score_accepts_dataset_and_synthesis_folder(tiny_model, dirs, table, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"id": list(range(len(TO_SCORE))), "instruction": TO_SCORE})
    assert il.score_instructions(tiny_model, dirs, ds, standardize=False, progress=False).to_list() == table.to_list()
    folder = tmp_path / "synth"
    folder.mkdir()
    (folder / "instructions.jsonl").write_text(
        "".join(json.dumps({"instruction": x, "raw": " " + x, "index": i}) + "\n" for i, x in enumerate(TO_SCORE)))
    (folder / "raw.jsonl").write_text('{"raw": "not read", "finished": false}\n')
    assert il.score_instructions(tiny_model, dirs, folder, standardize=False, progress=False).to_list() == table.to_list()


def test_score_chunks_larger_than_one(tiny_model, dirs):
    """Instructions beyond one chunk (32 x batch_size) land in their own rows."""
    many = [f"Question number {i}: what is {i} plus {i}?" for i in range(40)]
    t = il.score_instructions(tiny_model, dirs, many, batch_size=1, standardize=False, progress=False)
    p = _direct(tiny_model, dirs, scoring_texts(tiny_model.tokenizer, many))
    torch.testing.assert_close(_scores(t, dirs.criteria), p.mean(-1), atol=1e-5, rtol=1e-5)


# ---- select_instructions ------------------------------------------------------------------------


def _table(cons, crit=None, **extra):
    from datasets import Dataset, DatasetInfo

    crit = crit or ["a"] * len(cons)
    cols = {"instruction": [f"i{k}" for k in range(len(cons))], "consistency": list(cons), "criterion": list(crit),
            **extra}
    return Dataset.from_dict(cols, info=DatasetInfo(description=json.dumps({"criteria": sorted(set(crit))})))


def _ids(sel):
    return [int(x[1:]) for x in sel["instruction"]]


CONS = [0.3, 0.9, -0.2, 0.5, 0.9, 0.1, 0.7, 0.0, 0.4, 0.6, 0.8, 0.2]


def test_select_default_top_fraction():
    t = _table(CONS)
    sel = il.select_instructions(t)
    assert DEFAULT_TOP_FRACTION == 0.1
    assert len(sel) == math.ceil(0.1 * len(CONS)) == 2
    assert _ids(sel) == [1, 4]  # best first; the tie keeps input order
    t25 = _table([float(i) for i in range(25)])
    assert _ids(il.select_instructions(t25)) == [24, 23, 22]  # ceil(2.5)


def test_select_rules():
    t = _table(CONS, score_a=CONS)
    assert _ids(il.select_instructions(t, top_k=4)) == [1, 4, 10, 6]
    assert il.select_instructions(t, top_k=4).column_names == t.column_names  # all columns kept
    assert _ids(il.select_instructions(t, top_k=100)) == sorted(range(12), key=lambda i: -CONS[i])
    assert _ids(il.select_instructions(t, threshold=0.6)) == [1, 4, 10, 6, 9]  # >= keeps equality
    assert _ids(il.select_instructions(t, threshold=-5)) == sorted(range(12), key=lambda i: -CONS[i])
    assert _ids(il.select_instructions(t, top_fraction=0.25)) == [1, 4, 10]
    assert len(il.select_instructions(t, top_fraction=1.0)) == 12
    assert len(il.select_instructions(t, top_fraction=0.01)) == 1
    cons = il.select_instructions(t, top_k=6)["consistency"]
    assert list(cons) == sorted(cons, reverse=True)


@pytest.mark.parametrize("kw", [dict(top_k=2, threshold=0.1), dict(top_fraction=0.1, top_k=2),
                                dict(top_fraction=0.1, threshold=0.0), dict(top_fraction=0.0),
                                dict(top_fraction=1.5), dict(top_k=0), dict(top_k=2.5), dict(top_k=True),
                                dict(threshold=0.0, balance_criteria=True)])
def test_select_bad_options(kw):
    with pytest.raises(ValueError):
        il.select_instructions(_table(CONS), **kw)


def test_select_threshold_keeping_nothing():
    with pytest.raises(ValueError, match=r"No instruction reaches consistency >= 2.*highest is 0.9"):
        il.select_instructions(_table(CONS), threshold=2.0)


def test_select_needs_a_score_table():
    from datasets import Dataset

    with pytest.raises(ValueError, match="consistency"):
        il.select_instructions(Dataset.from_dict({"instruction": ["x"], "criterion": ["a"]}))
    with pytest.raises(ValueError, match="empty"):
        il.select_instructions(_table([]))


def test_select_balance_criteria():
    # 'a' comes first in input order; a: 8 rows, b: 4 rows, all 'b' rows score low
    crit = ["a", "a", "b", "a", "a", "b", "a", "b", "a", "a", "a", "b"]
    t = _table(CONS, crit)
    assert set(il.select_instructions(t, top_k=4)["criterion"]) == {"a"}  # a global rule ignores 'b'
    sel = il.select_instructions(t, top_k=4, balance_criteria=True)
    assert sorted(sel["criterion"]) == ["a", "a", "b", "b"]
    a_best = sorted([i for i in range(12) if crit[i] == "a"], key=lambda i: -CONS[i])
    b_best = sorted([i for i in range(12) if crit[i] == "b"], key=lambda i: -CONS[i])
    assert set(_ids(sel)) == set(a_best[:2] + b_best[:2])
    assert list(sel["consistency"]) == sorted(sel["consistency"], reverse=True)  # best first overall
    # an odd top_k: the first criterion (in input order) gets the extra row
    sel = il.select_instructions(t, top_k=5, balance_criteria=True)
    assert set(_ids(sel)) == set(a_best[:3] + b_best[:2])
    # top_fraction per group: ceil(0.3 * 8) = 3 of 'a', ceil(0.3 * 4) = 2 of 'b'
    sel = il.select_instructions(t, top_fraction=0.3, balance_criteria=True)
    assert set(_ids(sel)) == set(a_best[:3] + b_best[:2]) and len(sel) == 5
    assert list(sel["consistency"]) == sorted(sel["consistency"], reverse=True)


def test_select_on_score_table(table):
    sel = il.select_instructions(table, top_k=3)
    assert len(sel) == 3
    assert list(sel["consistency"]) == sorted(table["consistency"], reverse=True)[:3]
    assert sel.column_names == table.column_names


# ---- histogram ----------------------------------------------------------------------------------


def test_consistency_histogram(table):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    backend, fignums = matplotlib.get_backend(), plt.get_fignums()
    sel = il.select_instructions(table, top_k=3)
    fig = consistency_histogram(table, sel, bins=10)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    counts = {c: list(table["criterion"]).count(c) for c in ("helpful", "honest")}
    assert [ax.get_title() for ax in fig.axes] == [f"helpful (n={counts['helpful']})",
                                                   f"honest (n={counts['honest']})"]
    for ax, name in zip(fig.axes, ("helpful", "honest")):
        assert sum(p.get_height() for p in ax.patches) == counts[name]  # every row of that criterion is counted
        kept = [v for c, v in zip(sel["criterion"], sel["consistency"]) if c == name]
        lines = [ln for ln in ax.get_lines() if ln.get_xdata()[0] == ln.get_xdata()[1]]  # vertical cut lines
        if kept:
            assert len(lines) == 1 and lines[0].get_xdata()[0] == pytest.approx(min(kept))
        else:
            assert lines == []
    assert matplotlib.get_backend() == backend and plt.get_fignums() == fignums
    # without a selection: no cut lines; a criterion with no rows still gets its panel
    fig = consistency_histogram(_table([0.1, 0.5, 0.2], ["a", "a", "a"]))
    assert len(fig.axes) == 1 and fig.axes[0].get_lines() == []
    from datasets import Dataset

    t = Dataset.from_dict({"instruction": ["x", "y"], "score_a": [0.1, 0.1], "score_b": [0.2, 0.2],
                           "score_c": [0.0, 0.0], "consistency": [0.2, 0.2], "criterion": ["b", "b"]})
    fig = consistency_histogram(t, t)
    assert [ax.get_title() for ax in fig.axes] == ["a (n=0)", "b (n=2)", "c (n=0)"]
    assert plt.get_fignums() == fignums


def test_consistency_histogram_cut_per_criterion():
    crit = ["a", "a", "b", "a", "a", "b", "a", "b", "a", "a", "a", "b"]
    t = _table(CONS, crit)
    sel = il.select_instructions(t, top_k=4, balance_criteria=True)
    fig = consistency_histogram(t, sel, bins=5)
    assert [ax.get_title() for ax in fig.axes] == ["a (n=8)", "b (n=4)"]
    cuts = [ax.get_lines()[0].get_xdata()[0] for ax in fig.axes]
    assert cuts == [0.9, 0.1]  # the lowest kept consistency of each criterion
    assert [ax.get_legend().get_texts()[0].get_text() for ax in fig.axes] == ["kept: 2", "kept: 2"]


def test_consistency_histogram_counts_every_row_of_float64_table():
    crit = ["a", "a", "b", "a", "a", "b", "a", "b", "a", "a", "a", "b"]
    fig = consistency_histogram(_table(CONS, crit), bins=5)
    assert [sum(p.get_height() for p in ax.patches) for ax in fig.axes] == [8, 4]
