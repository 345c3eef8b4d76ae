"""Layer analysis: separation math, suggested range, LayerReport on the tiny model, split-half stability."""

from __future__ import annotations

import json

import pytest
import torch

import icon2_lens as il
from icon2_lens.directions import instruction_hash
from icon2_lens.layers import _default_heldout, separation, suggest_layer_range

from conftest import INSTRUCTIONS

HELDOUT = [
    "Name three rivers in Africa.",
    "Write a limerick about a cat.",
    "How many legs does a spider have?",
    "Suggest a name for a bakery.",
]
PARAPHRASES = {"helpful": [("Be useful.", "Be useless."), ("Help the user.", "Do not help the user.")]}
RESPONSES = {
    "helpful": [
        ("How do I boil an egg?", "Boil it for eight minutes.", "Figure it out yourself."),
        ("What is 2+2?", "It is 4.", "Maths is not my thing."),
        ("How do I sort a list in Python?", "Use sorted(xs).", "Look it up somewhere."),
    ]
}


@pytest.fixture(scope="module")
def dirs(tiny_model):
    return il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)


@pytest.fixture(scope="module")
def report(tiny_model, dirs):
    return il.layer_report(tiny_model, dirs, heldout=HELDOUT, paraphrases=PARAPHRASES, n_paraphrase_instructions=2,
                           response_pairs=RESPONSES, width=2, batch_size=8, progress=False)


# ---- pure math ---------------------------------------------------------------------------------


def test_separation():
    pos = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0], [0.0, 5.0, 1.0], [2.0, 0.0, 1.0]])
    neg = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(separation(pos, neg), torch.tensor([0.75, 0.25, 0.75]))
    torch.testing.assert_close(separation(neg, pos), torch.tensor([0.25, 0.75, 0.0]))  # ties count as not ordered
    for a, b in [(pos, neg[:2]), (pos[0], neg[0]), (pos[:0], neg[:0])]:
        with pytest.raises(ValueError):
            separation(a, b)


def test_suggest_layer_range_picks_best_window():
    assert suggest_layer_range(torch.tensor([0.5, 0.9, 0.95, 0.6, 0.5, 0.5]), width=2) == [1, 2]
    assert suggest_layer_range(torch.tensor([0.9, 0.1, 0.1, 0.1, 0.8, 0.8]), width=2) == [4, 5]
    assert suggest_layer_range(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]), width=3) == [4, 5, 6]


def test_suggest_layer_range_ties_go_to_the_middle():
    assert suggest_layer_range(torch.ones(6), width=2) == [2, 3]
    assert suggest_layer_range(torch.ones(7), width=3) == [2, 3, 4]
    assert suggest_layer_range(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0]), width=1) in ([0], [5])


def test_suggest_layer_range_defaults_nan_and_layer_ids():
    assert len(suggest_layer_range(torch.rand(30))) == 10  # a third of the layers
    assert len(suggest_layer_range(torch.rand(4))) == 1
    assert suggest_layer_range(torch.rand(1)) == [0]
    s = torch.tensor([float("nan"), 0.2, 0.9, 0.9, float("nan")])
    assert suggest_layer_range(s, width=2) == [2, 3]
    assert suggest_layer_range(torch.full((3,), float("nan")), width=1) == [1]
    assert suggest_layer_range(s, width=2, layers=[10, 11, 12, 13, 14]) == [12, 13]
    for w in (0, 6):
        with pytest.raises(ValueError, match="width"):
            suggest_layer_range(s, width=w)


# ---- LayerReport on the tiny model -------------------------------------------------------------


def _proj(h, u):
    return (h * u.unsqueeze(0)).sum(-1)


def test_report_shapes_values_counts(tiny_model, dirs, report):
    C, L = 2, tiny_model.n_layers
    assert report.criteria == ["helpful", "honest"] and report.layers == list(range(L))
    for t in (report.heldout, report.paraphrase, report.response):
        assert t.shape == (C, L)
    assert ((report.heldout >= 0) & (report.heldout <= 1)).all()
    for t in (report.paraphrase[0], report.response[0]):
        assert ((t >= 0) & (t <= 1)).all()
    assert torch.isnan(report.paraphrase[1]).all() and torch.isnan(report.response[1]).all()
    assert report.counts == {"helpful": {"a": 4, "b": 4, "c": 3}, "honest": {"a": 4}}
    assert len(report.suggested_layers) == 2
    lo = report.suggested_layers[0]
    assert report.suggested_layers == [lo, lo + 1]


def test_report_values_equal_manual_computation(tiny_model, dirs, report):
    """Each separation equals projecting hand-rendered texts on the direction (checks the bookkeeping)."""
    tok = tiny_model.tokenizer

    def sep(pos_texts, neg_texts, ci):
        u = dirs.vectors[ci]
        hp = il.read_last_token(tiny_model, pos_texts, progress=False)
        hn = il.read_last_token(tiny_model, neg_texts, progress=False)
        return separation(_proj(hp, u), _proj(hn, u))

    for ci, c in enumerate(dirs.criterion_defs):
        want_a = sep([il.render_chat(tok, d, system=c.positive) for d in HELDOUT],
                     [il.render_chat(tok, d, system=c.negative) for d in HELDOUT], ci)
        torch.testing.assert_close(report.heldout[ci], want_a)
    para_instr = HELDOUT[:2]
    want_b = sep([il.render_chat(tok, d, system=p) for p, _ in PARAPHRASES["helpful"] for d in para_instr],
                 [il.render_chat(tok, d, system=n) for _, n in PARAPHRASES["helpful"] for d in para_instr], 0)
    torch.testing.assert_close(report.paraphrase[0], want_b)
    want_c = sep([il.render_chat(tok, q, assistant=g) for q, g, _ in RESPONSES["helpful"]],
                 [il.render_chat(tok, q, assistant=b) for q, _, b in RESPONSES["helpful"]], 0)
    torch.testing.assert_close(report.response[0], want_c)
    score = (report.paraphrase[0] + report.response[0]) / 2
    assert report.suggested_layers == suggest_layer_range(score, width=2)


def test_response_texts_end_at_the_answer(tiny_model):
    text = il.render_chat(tiny_model.tokenizer, "What is 2+2?", assistant="It is 4.")
    assert text.endswith("<|im_start|>assistant\nIt is 4.")
    assert text.startswith(tiny_model.tokenizer.bos_token) and "system" not in text


def test_report_table_save_apply(dirs, report, tmp_path):
    table = report.table()
    lo, hi = min(report.suggested_layers), max(report.suggested_layers)
    assert f"suggested steering layers: {lo}-{hi}" in table
    assert "helpful a" in table and "honest c" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert len(rows) == len(report.layers)
    assert [r.split("|")[1].strip() for r in rows if "*" in r.split("|")[1]] == [f"{x}*" for x in report.suggested_layers]

    written = report.save(tmp_path / "rep")
    assert set(written) == {"json", "md", "png"}
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"layer_report.json", "layer_report.md", "layer_report.png"}
    data = json.loads(written["json"].read_text())
    assert data["suggested_layers"] == report.suggested_layers
    assert data["paraphrase"][1] == [None] * len(report.layers)
    torch.testing.assert_close(torch.tensor(data["heldout"]), report.heldout)
    assert report.table() in written["md"].read_text()
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    applied = report.apply(dirs)
    assert applied.suggested_layers == report.suggested_layers
    assert applied.meta["layer_report"]["suggested_layers"] == report.suggested_layers
    assert dirs.suggested_layers is None and "layer_report" not in dirs.meta  # input untouched
    assert torch.equal(applied.vectors, dirs.vectors)
    # the applied set round-trips through disk with its report
    out = applied.save(tmp_path / "dirs")
    assert il.DirectionSet.load(out).suggested_layers == report.suggested_layers


def test_report_with_stability_and_custom_criterion(tiny_model, tmp_path):
    crit = il.Criterion("concise", "Answer in one short sentence.", "Answer at great length with many digressions.")
    d = il.extract_directions(tiny_model, [crit], INSTRUCTIONS, batch_size=6, progress=False)
    stab = il.layers.split_half_stability(tiny_model, d, INSTRUCTIONS, batch_size=6, progress=False)
    rep = il.layer_report(tiny_model, d, heldout=HELDOUT, stability=stab, progress=False)  # default paraphrases: none
    assert torch.isnan(rep.paraphrase).all() and torch.isnan(rep.response).all()
    assert rep.suggested_layers == suggest_layer_range(rep.heldout.mean(0))  # falls back to (a)
    assert "concise stab" in rep.table()
    assert torch.equal(rep.stability, stab)
    written = rep.save(tmp_path)
    assert "stability" in json.loads(written["json"].read_text())


def test_report_refuses_other_model(other_tiny_model, dirs):
    with pytest.raises(ValueError, match="fingerprint"):
        il.layer_report(other_tiny_model, dirs, heldout=HELDOUT, progress=False)


def test_default_heldout_skips_used_instructions(dirs):
    builtin = il.instructions.builtin_instructions()
    used = dirs.with_meta(instruction_hashes=[instruction_hash(x) for x in builtin[:5]])
    assert _default_heldout(used, 3) == builtin[5:8]
    assert _default_heldout(dirs, 2) == builtin[:2]
    all_used = dirs.with_meta(instruction_hashes=[instruction_hash(x) for x in il.instructions.builtin_instructions("all")])
    with pytest.raises(ValueError, match="held out"):
        _default_heldout(all_used, 3)


def test_documented_default_flow_extract_then_report(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful"], "default", layers=[0], batch_size=64, progress=False)
    rep = il.layer_report(tiny_model, d, n_heldout=4, paraphrases={}, response_pairs={}, progress=False)
    assert rep.counts["helpful"]["a"] == 4


# ---- split-half stability ----------------------------------------------------------------------


def test_split_half_stability_shape_range_and_halves(tiny_model, dirs):
    stab = il.layers.split_half_stability(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    assert stab.shape == (2, tiny_model.n_layers)
    assert ((stab >= -1 - 1e-5) & (stab <= 1 + 1e-5)).all()
    assert torch.equal(il.layers.split_half_stability(tiny_model, dirs, INSTRUCTIONS, batch_size=6, progress=False), stab)
    # equals extracting from the two halves separately
    perm = torch.randperm(len(INSTRUCTIONS), generator=torch.Generator().manual_seed(0)).tolist()
    half_a = [INSTRUCTIONS[i] for i in perm[: len(perm) // 2]]
    half_b = [INSTRUCTIONS[i] for i in perm[len(perm) // 2:]]
    va = il.extract_directions(tiny_model, ["helpful", "honest"], half_a, progress=False).vectors
    vb = il.extract_directions(tiny_model, ["helpful", "honest"], half_b, progress=False).vectors
    torch.testing.assert_close(stab, (va * vb).sum(-1), atol=1e-4, rtol=0)


def test_stability_in_the_extraction_pass(tiny_model, dirs):
    one = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, stability=True,
                                progress=False)
    plain = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    torch.testing.assert_close(one.vectors, plain.vectors, atol=1e-5, rtol=0)  # merged halves == full set
    for k in plain.stats:
        torch.testing.assert_close(one.stats[k], plain.stats[k], atol=1e-4, rtol=1e-4, msg=k)
    two_pass = il.layers.split_half_stability(tiny_model, plain, INSTRUCTIONS, batch_size=6, progress=False)
    torch.testing.assert_close(one.stats["stability"], two_pass, atol=1e-5, rtol=0)
    assert one.meta["stability_split"] == {"seed": 0, "halves": [len(INSTRUCTIONS) // 2, len(INSTRUCTIONS) - len(INSTRUCTIONS) // 2]}
    rep = il.layer_report(tiny_model, one, heldout=HELDOUT, paraphrases={}, progress=False)
    assert torch.equal(rep.stability, one.stats["stability"])  # shown without a second pass
    assert il.layer_report(tiny_model, plain, heldout=HELDOUT, paraphrases={}, progress=False).stability is None
    with pytest.raises(ValueError, match="at least 4"):
        il.extract_directions(tiny_model, ["helpful"], INSTRUCTIONS[:3], stability=True, progress=False)


def test_figure_leaves_matplotlib_state_alone(report, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, n_figs = matplotlib.get_backend(), len(plt.get_fignums())
    fig = report.figure()
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) >= len(report.criteria)
    png = report.plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend and len(plt.get_fignums()) == n_figs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]


def test_split_half_needs_four_instructions(tiny_model):
    with pytest.raises(ValueError, match="at least 4"):
        il.layers.split_half_stability(tiny_model, ["helpful"], INSTRUCTIONS[:3], progress=False)


def test_builtin_layer_data():
    from icon2_lens.layers import builtin_paraphrases, builtin_response_pairs

    names = {c.name for c in il.DEFAULT_CRITERIA}
    para, resp = builtin_paraphrases(), builtin_response_pairs()
    assert set(para) == names and set(resp) == names
    for c in names:
        assert len(para[c]) >= 4 and all(p.strip() and n.strip() and p != n for p, n in para[c])
        assert len(resp[c]) >= 8 and all(q and g and b and g != b for q, g, b in resp[c])
