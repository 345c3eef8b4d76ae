"""Gamma calibration (the App. J rule), the scorers, degeneration metrics, pair reports and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

import icon2_lens as il
from icon2_lens import calibration as cal_mod
from icon2_lens.calibration import CalibrationResult, calibrate_gamma, load_gammas
from icon2_lens.cli import main
from icon2_lens.errors import BadInputError
from icon2_lens.evaluation import PairwiseJudge, ProbeScorer, RewardModelScorer, distinct_n, is_degenerate, pair_report
from icon2_lens.pairs import generate_steered
from icon2_lens.prompts import render_chat

from conftest import INSTRUCTIONS, build_tokenizer

REAL_GENERATE = cal_mod.generate_steered
LAYERS = [1, 2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTIONS = ["Name three rivers in Africa.", "Write a limerick about a cat.", "How many legs does a spider have?",
             "Suggest a name for a bakery."]
TABLE = [{"instruction": q, "criterion": c} for q, c in zip(QUESTIONS, ["helpful", "honest", "helpful", "honest"])]
#: Three rows: with n=3 the sample is the whole table, in table order; exclude=() says no row is a training row.
TABLE3 = TABLE[:3]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    return d.with_meta(suggested_layers=LAYERS)


# ---- degeneration metrics -----------------------------------------------------------------------------


def test_distinct_n():
    assert distinct_n("") == 1.0 and distinct_n("one") == 1.0  # no bigrams at all
    assert distinct_n("the cat sat on the mat", 2) == 1.0
    assert distinct_n("no no no no no", 2) == 0.25
    assert distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert distinct_n("a b c a b c", 1) == 0.5
    assert distinct_n("a b c a b c", 3) == pytest.approx(3 / 4)
    assert distinct_n("a  b\n\ta b", 2) == pytest.approx(2 / 3)  # words split on any whitespace


def test_is_degenerate():
    assert is_degenerate("") and is_degenerate("  \n\t ")
    assert is_degenerate("the the the the the the the the the the")
    assert is_degenerate("I am. I am. I am. I am. I am. I am.")  # 12 words, distinct-2 2/11
    assert is_degenerate("a b a b a b a b")  # 8 words, distinct-2 2/7
    assert not is_degenerate("a b a b a b a")  # a loop, but under 8 words
    assert is_degenerate("!" * 30) and is_degenerate("ab" * 15)  # character runs
    assert not is_degenerate("a" * 19)  # under 20 characters
    assert not is_degenerate("Paris is the capital of France.")
    assert not is_degenerate("Hi")
    assert not is_degenerate("The Nile, the Congo and the Niger are three long rivers that flow through Africa.")
    assert is_degenerate("one two three four five six seven eight", min_distinct2=1.01)  # thresholds are used
    assert is_degenerate("Sure" + "\x14" * 25) and not is_degenerate("Wait" + "." * 19)  # 20+ of one character
    assert is_degenerate("x = " + "[0]" * 10) and not is_degenerate("x = " + "[0]" * 9)  # a unit 10+ times


LONG_ANSWER = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. "
    "Inside the chloroplasts, chlorophyll absorbs mostly red and blue light. That energy splits water molecules, "
    "releasing oxygen as a by-product, and drives the synthesis of ATP and NADPH. In the Calvin cycle, the plant then "
    "uses these carriers to fix carbon dioxide from the air into sugars such as glucose, which it stores as starch or "
    "burns for growth. Nearly all life on Earth depends on it, directly or indirectly."
)


def test_a_long_normal_answer_is_not_degenerate():
    assert distinct_n(LONG_ANSWER, 2) > 0.95 and len(LONG_ANSWER) > 400
    assert not is_degenerate(LONG_ANSWER)


# ---- calibrate_gamma: the rule, with scripted responses and scores ------------------------------------


def _normal(g, i):
    return f"g{g}i{i} is a perfectly ordinary reply"


def _loop(g, i):
    return f"g{g}i{i} " + "loop " * 10


def _key(text):
    head = text.split()[0]
    return float(head[1:head.index("i")]), int(head[head.index("i") + 1:])


class TableScorer:
    """Pointwise scorer reading its score from a table keyed by the (gamma, instruction) tag of the text."""

    name = "table"

    def __init__(self, raw):
        self.raw, self.calls = raw, []

    def __call__(self, instructions, responses, criteria):
        self.calls.append((list(instructions), list(responses), list(criteria)))
        return [self.raw[_key(r)] for r in responses]


def _script(monkeypatch, raw, degenerate=()):
    """Replace generation by scripted texts; returns (calls, scorer)."""
    calls = []

    def fake(model, prompts, *, directions, criteria, gammas, **kw):
        calls.append({"prompts": list(prompts), "criteria": list(criteria), "gammas": list(gammas), **kw})
        out = []
        for p, g in zip(prompts, gammas):
            i = next(j for j, q in enumerate(QUESTIONS) if render_chat(model.tokenizer, q) == p)
            text = _loop(g, i) if (g, i) in degenerate else _normal(g, i)
            out.append({"text": text, "finished": True, "n_tokens": 3})
        return out

    monkeypatch.setattr(cal_mod, "generate_steered", fake)
    flat = {(g, i): s for g, scores in raw.items() for i, s in enumerate(scores)}
    return calls, TableScorer(flat)


SCENARIO_A = {  # gamma: raw scores of instructions 0, 1, 2
    0.2: [100.0, 100.0, 9.0],  # 0 and 1 degenerate (a high raw score that must not count)
    0.1: [5.0, 5.0, 5.0],
    0.05: [4.0, 4.0, 4.0],
    -0.05: [4.5, 4.5, 6.0],
    -0.1: [1.0, 2.0, 3.0],
    -0.2: [-100.0, 0.0, 0.0],  # 0 degenerate (a low raw score: the pair must still count as a loss)
}
DEGENERATE_A = {(0.2, 0), (0.2, 1), (-0.2, 0)}


@pytest.fixture
def result_a(tiny_model, dirs, monkeypatch):
    calls, scorer = _script(monkeypatch, SCENARIO_A, DEGENERATE_A)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), n=3, gammas_pos=[0.2, 0.05, 0.1],
                              gammas_neg=[-0.05, -0.2, -0.1], scorer=scorer, batch_size=4, max_new_tokens=4,
                              progress=False)
    return res, calls, scorer, [str(w.message) for w in caught]


def test_rule_picks_best_mean_and_best_passing_gamma_neg(result_a):
    res, calls, scorer, msgs = result_a
    grid = [-0.2, -0.1, -0.05, 0.05, 0.1, 0.2]
    # generation: every (gamma, instruction) once, in mixed batches of 4 rows with per-row gammas
    assert [len(c["gammas"]) for c in calls] == [4, 4, 4, 4, 2]
    assert [g for c in calls for g in c["gammas"]] == [g for g in grid for _ in range(3)]
    assert [x for c in calls for x in c["criteria"]] == ["helpful", "honest", "helpful"] * 6
    assert calls[0]["layers"] == LAYERS and calls[0]["max_new_tokens"] == 4
    assert len({g for g in calls[0]["gammas"]}) == 2  # one batch mixes strengths
    # the scorer saw all 18 responses in one call, with the rows' criteria
    assert len(scorer.calls) == 1 and len(scorer.calls[0][1]) == 18

    assert (res.gamma_pos, res.gamma_neg) == (0.1, -0.1)
    per = {r["gamma"]: r for r in res.per_gamma}
    assert [r["gamma"] for r in res.per_gamma] == grid
    floor = -100.0  # the lowest raw score of the sweep
    assert per[0.2]["mean_score"] == pytest.approx((floor + floor + 9) / 3)  # not (100 + 100 + 9) / 3
    assert per[-0.2]["mean_score"] == pytest.approx((floor + 0 + 0) / 3)
    assert per[0.1]["mean_score"] == 5.0 and per[-0.05]["mean_score"] == pytest.approx(5.0)
    assert per[-0.1]["mean_score"] == pytest.approx(2.0) and per[0.05]["mean_score"] == 4.0
    assert per[0.2]["degenerate_share"] == pytest.approx(2 / 3)
    assert per[-0.2]["degenerate_share"] == pytest.approx(1 / 3)
    assert all(per[g]["degenerate_share"] == 0 for g in (-0.1, -0.05, 0.05, 0.1))
    assert per[0.2]["distinct2"] == pytest.approx((0.2 + 0.2 + 1.0) / 3) and per[0.1]["distinct2"] == 1.0
    assert all(r["n"] == 3 for r in res.per_gamma)
    win = {(p["gamma_pos"], p["gamma_neg"]): p["win_share"] for p in res.pairs}
    assert win == pytest.approx({
        (0.05, -0.2): 2 / 3, (0.05, -0.1): 1.0, (0.05, -0.05): 0.0,
        (0.1, -0.2): 2 / 3, (0.1, -0.1): 1.0, (0.1, -0.05): 2 / 3,  # -0.2 would be 1.0 if its degenerate row won
        (0.2, -0.2): 1 / 3, (0.2, -0.1): 1 / 3, (0.2, -0.05): 1 / 3,
    })
    assert [(p["gamma_pos"], p["gamma_neg"]) for p in res.pairs][:3] == [(0.05, -0.2), (0.05, -0.1), (0.05, -0.05)]
    # warnings: both gammas with > 25% degenerate responses; no fallback warning
    assert sorted(m.split(" breaks")[0] for m in msgs if "breaks fluency" in m) == ["gamma = -0.2", "gamma = 0.2"]
    assert not any("No gamma-" in m for m in msgs)
    assert res.settings["scorer"] == "table" and res.settings["n"] == 3 and res.settings["win_threshold"] == 0.9
    assert res.settings["layers"] == LAYERS and res.settings["decoding"]["max_new_tokens"] == 4
    ex = {(e["gamma"], e["instruction"]): e for e in res.examples}
    assert len(ex) == 18 and ex[(0.2, QUESTIONS[0])]["degenerate"] and ex[(0.2, QUESTIONS[0])]["score"] == 100.0


def test_table_holds_per_gamma_rows_and_the_win_matrix(result_a):
    res = result_a[0]
    t = res.table()
    assert "| 0.1 * | + | 5.000 | 0.00 | 1.00 |" in t
    assert "| -0.1 * | - | 2.000 | 0.00 | 1.00 |" in t
    assert "| 0.2 | + | -63.667 | 0.67 | 0.47 |" in t
    assert "| gamma+ \\ gamma- | -0.05 | -0.1 | -0.2 |" in t
    assert "| 0.05 | 0.00 | 1.00 | 0.67 |" in t
    assert "| 0.1 | 0.67 | **1.00** | 0.67 |" in t  # the chosen cell in bold
    assert "| 0.2 | 0.33 | 0.33 | 0.33 |" in t
    assert t.rstrip().endswith("chosen: gamma+ = 0.1, gamma- = -0.1 (scorer table, win threshold 0.9)")


def test_rule_gamma_neg_is_the_best_mean_among_passing_and_ties_are_gentle(tiny_model, dirs, monkeypatch):
    raw = {0.1: [10.0] * 3, 0.2: [10.0] * 3, -0.05: [9.0, 9.0, 11.0], -0.1: [1.0] * 3, -0.2: [3.0] * 3}
    _, scorer = _script(monkeypatch, raw)
    kw = dict(n=3, gammas_pos=[0.1, 0.2], gammas_neg=[-0.2, -0.1, -0.05], scorer=scorer, max_new_tokens=4,
              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), **kw)
    # gamma+ ties at 10: the gentler one; gamma-: -0.05 has the best mean but wins only 2/3;
    # of the passing -0.1 (mean 1) and -0.2 (mean 3) the best mean wins, not the gentlest
    assert (res.gamma_pos, res.gamma_neg) == (0.1, -0.2)
    res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), win_threshold=0.5, **kw)
    assert res.gamma_neg == -0.05  # 2/3 > 0.5: now it passes
    res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), win_threshold=0.0, **kw)
    assert res.gamma_neg == -0.05


def test_rule_falls_back_to_the_best_win_share_with_a_warning(tiny_model, dirs, monkeypatch):
    raw = {0.1: [5.0] * 3, -0.05: [6.0, 6.0, 4.0], -0.1: [4.0, 4.0, 6.0]}
    _, scorer = _script(monkeypatch, raw)
    want = r"No gamma- reaches a win share above 0.9 with gamma\+ = 0.1 \(best: 0.67 at gamma- = -0.1\)"
    with pytest.warns(UserWarning, match=want):
        res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), n=3, gammas_pos=[0.1], gammas_neg=[-0.1, -0.05],
                              scorer=scorer, max_new_tokens=4, progress=False)
    assert (res.gamma_pos, res.gamma_neg) == (0.1, -0.1)
    # all lose: the gentler gamma- among equal win shares
    _, scorer = _script(monkeypatch, {0.1: [5.0] * 3, -0.05: [6.0] * 3, -0.1: [7.0] * 3})
    with pytest.warns(UserWarning, match="No gamma- reaches"):
        res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), n=3, gammas_pos=[0.1], gammas_neg=[-0.1, -0.05],
                              scorer=scorer, max_new_tokens=4, progress=False)
    assert res.gamma_neg == -0.05


def test_pairwise_scorer_rule_with_a_scripted_judge(tiny_model, dirs, monkeypatch):
    """A pairwise scorer: gamma 0 joins the sweep, a gamma's score is its verdict against gamma 0."""
    raw = {0.1: [3.0, 3.0, 0.0], 0.0: [1.0] * 3, -0.1: [0.0, 0.0, 5.0]}
    calls, table = _script(monkeypatch, raw)

    class Judge:
        name = "scripted_judge"
        compared = []

        def compare(self, instructions, a, b):
            self.compared.append((list(a), list(b)))
            sa, sb = table(instructions, a, ["x"] * len(a)), table(instructions, b, ["x"] * len(b))
            return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(sa, sb)]

    res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), n=3, gammas_pos=[0.1], gammas_neg=[-0.1], scorer=Judge(),
                          max_new_tokens=4, progress=False, win_threshold=0.5)
    assert [g for c in calls for g in c["gammas"]] == [-0.1] * 3 + [0.0] * 3 + [0.1] * 3
    per = {r["gamma"]: r["mean_score"] for r in res.per_gamma}
    assert list(per) == [-0.1, 0.0, 0.1]
    assert per[0.0] == 0.5 and per[0.1] == pytest.approx(2 / 3) and per[-0.1] == pytest.approx(1 / 3)
    assert res.pairs == [{"gamma_pos": 0.1, "gamma_neg": -0.1, "win_share": pytest.approx(2 / 3)}]
    assert (res.gamma_pos, res.gamma_neg) == (0.1, -0.1) and res.settings["scorer"] == "scripted_judge"


@pytest.mark.parametrize("kw,match", [
    ({"gammas_pos": [0.1], "gammas_neg": [0.1]}, "Every gamma\\+ must exceed every gamma-"),
    ({"gammas_pos": [0.05, 0.2], "gammas_neg": [-0.1, 0.1]}, "Every gamma\\+ must exceed every gamma-"),
    ({"gammas_pos": [-0.05], "gammas_neg": [-0.1, -0.05]}, "Every gamma\\+ must exceed every gamma-"),
    ({"gammas_pos": [], "gammas_neg": [-0.1]}, "at least one"),
    ({"gammas_neg": []}, "at least one"),
    ({"n": 0}, "n and max_new_tokens must be positive"),
    ({"n": -2}, "n and max_new_tokens must be positive"),
    ({"max_new_tokens": 0}, "n and max_new_tokens must be positive"),
    ({"win_threshold": 1.0}, r"win_threshold must be in \[0, 1\)"),
    ({"win_threshold": -0.1}, r"win_threshold must be in \[0, 1\)"),
    ({"criterion": "kindness"}, "not in the directions"),
])
def test_calibrate_bad_input(tiny_model, dirs, monkeypatch, kw, match):
    calls, scorer = _script(monkeypatch, {})
    opts = dict(n=3, gammas_pos=[0.1], gammas_neg=[-0.1], scorer=scorer, max_new_tokens=4, progress=False)
    opts.update(kw)
    with pytest.raises(ValueError, match=match):
        calibrate_gamma(tiny_model, dirs, TABLE, exclude=(), **opts)
    assert calls == []


# ---- save / load ---------------------------------------------------------------------------------------


def test_save_and_load_gammas(result_a, tmp_path, monkeypatch):
    res = result_a[0]
    out = tmp_path / "cal"
    paths = res.save(out)
    names = ["calibration.json", "calibration.md", "calibration.png", "gammas.yaml"]
    assert sorted(p.name for p in paths.values()) == names
    assert sorted(p.name for p in out.iterdir()) == names  # no temp files left
    assert json.loads((out / "calibration.json").read_text()) == json.loads(json.dumps(res.to_dict()))
    assert (out / "calibration.md").read_text() == res.table() + "\n"
    png = (out / "calibration.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    want = {"gamma_pos": 0.1, "gamma_neg": -0.1, "layers": LAYERS, "scale": "relative", "positions": "all",
            "max_new_tokens": 4, "do_sample": False, "repetition_penalty": 1.1}
    assert res.gammas_config() == want
    assert load_gammas(out) == want and load_gammas(out / "gammas.yaml") == want
    # a failure while drawing leaves the previous figure intact and no temp file behind
    def broken_figure(self):
        raise RuntimeError("no plot")

    monkeypatch.setattr(CalibrationResult, "figure", broken_figure)
    with pytest.raises(RuntimeError, match="no plot"):
        res.save(out)
    assert (out / "calibration.png").read_bytes() == png
    assert sorted(p.name for p in out.iterdir()) == names


def test_load_gammas_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_gammas(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_gammas(tmp_path / "missing.yaml")
    bad = tmp_path / "gammas.yaml"
    bad.write_text(yaml.safe_dump({"gamma_pos": 0.1}))
    with pytest.raises(ValueError, match="no gamma_pos/gamma_neg"):
        load_gammas(bad)
    bad.write_text("- 0.1\n- -0.1\n")
    with pytest.raises(ValueError, match="not a calibration output"):
        load_gammas(tmp_path)


# ---- calibrate_gamma on the tiny model -------------------------------------------------------------------


class DistinctWords:
    """A deterministic pointwise scorer: number of distinct words (ties broken by length)."""

    name = "distinct_words"

    def __call__(self, instructions, responses, criteria):
        return [len(set(r.split())) + len(r) / 1000 for r in responses]


def _expected_choice(res, gp, gn, threshold):
    """The rule recomputed from the examples (n <= 3: the examples hold every response)."""
    ex = {(e["gamma"], e["instruction"]): e for e in res.examples}
    qs = sorted({q for _, q in ex}, key=QUESTIONS.index)
    floor = min(e["score"] for e in ex.values())
    eff = {k: floor if e["degenerate"] else e["score"] for k, e in ex.items()}
    mean = {g: sum(eff[(g, q)] for q in qs) / len(qs) for g in gp + gn}
    win = {(p, n): sum(ex[(p, q)]["score"] > ex[(n, q)]["score"] and not ex[(p, q)]["degenerate"]
                       and not ex[(n, q)]["degenerate"] for q in qs) / len(qs) for p in gp for n in gn}
    best_pos = max(gp, key=lambda g: (mean[g], -g))
    passing = [n for n in gn if win[(best_pos, n)] > threshold]
    best_neg = max(passing, key=lambda g: (mean[g], g)) if passing else max(gn, key=lambda g: (win[(best_pos, g)], g))
    return best_pos, best_neg, mean, win, bool(passing)


def test_calibrate_on_the_tiny_model(tiny_model, dirs, monkeypatch):
    calls = []

    def recording(model, prompts, **kw):
        out = REAL_GENERATE(model, prompts, **kw)
        calls.append({"prompts": list(prompts), **kw, "out": out})
        return out

    monkeypatch.setattr(cal_mod, "generate_steered", recording)
    gp, gn = [0.5, 1.0], [-1.0, -0.5]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), n=3, gammas_pos=gp, gammas_neg=gn, scorer=DistinctWords(),
                              max_new_tokens=4, batch_size=5, progress=False)
    assert [len(c["prompts"]) for c in calls] == [5, 5, 2]
    assert all(c["seed"] == 0 and c["repetition_penalty"] == 1.1 and c["layers"] == LAYERS for c in calls)
    grid = [-1.0, -0.5, 0.5, 1.0]
    assert [r["gamma"] for r in res.per_gamma] == grid
    # every response of the sweep equals that (gamma, instruction) generated alone
    texts = [r["text"] for c in calls for r in c["out"]]
    ex = {(e["gamma"], e["instruction"]): e for e in res.examples}
    assert len(ex) == 12
    tok = tiny_model.tokenizer
    for j, (g, i) in enumerate((g, i) for g in grid for i in range(3)):
        e = ex[(g, QUESTIONS[i])]
        assert e["response"] == texts[j] and e["criterion"] == TABLE3[i]["criterion"]
        alone = generate_steered(tiny_model, [render_chat(tok, QUESTIONS[i])], directions=dirs,
                                 criteria=TABLE3[i]["criterion"], gammas=g, layers=LAYERS, max_new_tokens=4,
                                 repetition_penalty=1.1)[0]["text"]
        assert alone == e["response"]
        assert e["score"] == pytest.approx(DistinctWords()([""], [e["response"]], [""])[0])
        assert e["degenerate"] == is_degenerate(e["response"])
    assert len(set(texts)) > 3  # the strengths produce different responses
    best_pos, best_neg, mean, win, passed = _expected_choice(res, gp, gn, 0.9)
    assert (res.gamma_pos, res.gamma_neg) == (best_pos, best_neg)
    assert {r["gamma"]: r["mean_score"] for r in res.per_gamma} == pytest.approx(mean)
    assert {(p["gamma_pos"], p["gamma_neg"]): p["win_share"] for p in res.pairs} == pytest.approx(win)
    assert any("No gamma-" in str(w.message) for w in caught) == (not passed)


# ---- PairwiseJudge ----------------------------------------------------------------------------------------


ANSWERS_A = ["The Nile, the Congo and the Niger.", "There once was a cat.", "Eight.", "Crumb & Co."]
ANSWERS_B = ["Bananas.", "A cat sat on a hat, and that was that.", "Spiders have eight legs.", "I cannot help."]


def _direct_prefers_first(model, q, a, b):
    text = render_chat(model.tokenizer, PairwiseJudge.PROMPT.format(q=q, a=a, b=b))
    ids = torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        logits = il.gen.hf_model(model)(ids).logits[0, -1]
    tok = model.tokenizer
    return bool(logits[tok("A", add_special_tokens=False)["input_ids"][0]]
                > logits[tok("B", add_special_tokens=False)["input_ids"][0]])


def test_pairwise_judge_on_the_tiny_model(tiny_model):
    judge = PairwiseJudge(tiny_model, batch_size=3)
    ab = judge.compare(QUESTIONS, ANSWERS_A, ANSWERS_B)
    ba = judge.compare(QUESTIONS, ANSWERS_B, ANSWERS_A)
    assert len(ab) == 4 and set(ab) <= {0.0, 0.5, 1.0}
    assert ba == [1.0 - x for x in ab]  # swapping maps 1 <-> 0 and keeps 0.5
    assert judge.compare(QUESTIONS, ANSWERS_A, ANSWERS_A) == [0.5] * 4  # same text in both orders: a tie
    for k in range(4):  # the verdict from the logits of "A" and "B", both orders
        x = _direct_prefers_first(tiny_model, QUESTIONS[k], ANSWERS_A[k], ANSWERS_B[k])
        y = _direct_prefers_first(tiny_model, QUESTIONS[k], ANSWERS_B[k], ANSWERS_A[k])
        assert ab[k] == (1.0 if x and not y else 0.0 if y and not x else 0.5)
    assert PairwiseJudge(tiny_model, batch_size=1).compare(QUESTIONS, ANSWERS_A, ANSWERS_B) == ab
    with pytest.raises(TypeError, match="compare"):
        judge(QUESTIONS, ANSWERS_A, ["helpful"] * 4)


@pytest.mark.filterwarnings("ignore:No gamma- reaches")
def test_calibrate_with_the_pairwise_judge(tiny_model, dirs):
    judge = PairwiseJudge(tiny_model)
    res = calibrate_gamma(tiny_model, dirs, TABLE3, exclude=(), n=3, gammas_pos=[1.0], gammas_neg=[-1.0], scorer=judge,
                          max_new_tokens=4, progress=False, win_threshold=0.0)
    assert [r["gamma"] for r in res.per_gamma] == [-1.0, 0.0, 1.0]
    assert res.settings["scorer"] == "pairwise_judge"
    ex = {(e["gamma"], e["instruction"]): e for e in res.examples}
    qs = QUESTIONS[:3]
    texts = {g: [ex[(g, q)]["response"] for q in qs] for g in (-1.0, 0.0, 1.0)}
    deg = {g: [ex[(g, q)]["degenerate"] for q in qs] for g in texts}
    assert [ex[(0.0, q)]["score"] for q in qs] == [0.5] * 3
    for g in (-1.0, 1.0):
        want = judge.compare(qs, texts[g], texts[0.0])
        assert [ex[(g, q)]["score"] for q in qs] == want
    floor = min(e["score"] for e in ex.values())
    per = {r["gamma"]: r["mean_score"] for r in res.per_gamma}
    for g in texts:
        eff = [floor if d else s for d, s in zip(deg[g], [ex[(g, q)]["score"] for q in qs])]
        assert per[g] == pytest.approx(sum(eff) / 3)
    verdict = judge.compare(qs, texts[1.0], texts[-1.0])
    wins = [v == 1.0 and not a and not b for v, a, b in zip(verdict, deg[1.0], deg[-1.0])]
    assert res.pairs[0]["win_share"] == pytest.approx(sum(wins) / 3)


# ---- ProbeScorer, RewardModelScorer ---------------------------------------------------------------------


def test_probe_scorer_equals_a_direct_computation(tiny_model, dirs):
    qs = QUESTIONS + [QUESTIONS[0]]
    rs = ANSWERS_A[:2] + ANSWERS_B[2:] + ["Totally different: the Amazon."]
    cs = ["helpful", "honest", "honest", "helpful", "honest"]
    scorer = ProbeScorer(tiny_model, dirs, batch_size=2)
    assert scorer.layers == LAYERS and scorer.name == "probe"
    got = scorer(qs, rs, cs)
    assert len(got) == 5 and all(isinstance(x, float) for x in got)
    texts = [render_chat(tiny_model.tokenizer, q, assistant=r) for q, r in zip(qs, rs)]
    h = il.read_last_token(tiny_model, texts, hook=dirs.hook, layers=LAYERS, progress=False)
    for b in range(5):
        c = dirs.index(cs[b])
        cols = [dirs.layers.index(layer) for layer in LAYERS]
        z = [((h[b, j] @ dirs.vectors[c, li]) - dirs.stats["proj_mean"][c, li]) / dirs.stats["proj_std"][c, li]
             for j, li in enumerate(cols)]
        assert got[b] == pytest.approx(float(sum(z) / len(z)), abs=1e-4)
    assert ProbeScorer(tiny_model, dirs, batch_size=16)(qs, rs, cs) == pytest.approx(got, abs=1e-5)
    # another layer choice, and all layers when none are suggested
    assert ProbeScorer(tiny_model, dirs, layers=[3])(qs, rs, cs) != pytest.approx(got, abs=1e-3)
    assert ProbeScorer(tiny_model, dirs.with_meta(suggested_layers=None)).layers == [0, 1, 2, 3]
    # an empty response is read as a blank one
    assert scorer(["Hi"], [""], ["helpful"]) == pytest.approx(scorer(["Hi"], [" "], ["helpful"]))
    with pytest.raises(ValueError, match="same length"):
        scorer(qs, rs[:2], cs)
    with pytest.raises(ValueError, match=r"Layers \[7\] are not in the directions"):
        ProbeScorer(tiny_model, dirs, layers=[7])
    with pytest.raises(KeyError, match="kindness"):
        scorer(qs[:1], rs[:1], ["kindness"])


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("models") / "tiny-reward"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_scorer(reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    scorer = RewardModelScorer(reward_dir, device="cpu", batch_size=3)
    assert scorer.name == f"reward_model:{reward_dir}"
    cs = ["helpful"] * 4
    s1 = scorer(QUESTIONS, ANSWERS_A, cs)
    assert len(s1) == 4 and all(isinstance(x, float) for x in s1)
    assert scorer(QUESTIONS, ANSWERS_A, cs) == s1  # deterministic
    assert RewardModelScorer(reward_dir, device="cpu", batch_size=1)(QUESTIONS, ANSWERS_A, cs) == pytest.approx(
        s1, abs=1e-4)  # padding does not change a score
    s2 = scorer(QUESTIONS, ANSWERS_B, cs)
    assert s2 != pytest.approx(s1, abs=1e-4)
    # the score is logits[0] of the chat-rendered conversation
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    tok = scorer.tokenizer
    for q, r, s in zip(QUESTIONS, ANSWERS_B, s2):
        text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                       tokenize=False)
        assert text.startswith("<s><|im_start|>user\n" + q)
        with torch.inference_mode():
            want = rm(**tok(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
        assert s == pytest.approx(want, abs=1e-4)
    with pytest.raises(BadInputError, match="neither a local folder nor an HF id in the local HF cache"):
        RewardModelScorer(tmp_path / "no-such-model")


# ---- pair_report -------------------------------------------------------------------------------------------


def _pair(q, chosen, rejected, cf=True, rf=True):
    return {"instruction": q, "criterion": "helpful", "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "chosen_finished": cf, "rejected_finished": rf}


PAIRS = [
    _pair("q0", "Paris is the capital of France.", "I do not know.", True, False),  # a real win
    _pair("q1", "Same answer on both sides", "Same answer on both sides"),  # identical: a tie
    _pair("q2", "the the the the the the the the the the", "No.", False, True),  # wins on length but degenerate
    _pair("q3", "Short.", "A much longer rejected answer here"),  # loses
]


class WordCount:
    name = "word_count"

    def __call__(self, instructions, responses, criteria):
        assert criteria == ["helpful"] * len(responses)
        return [float(len(r.split())) for r in responses]


def test_pair_report_figures():
    rep = pair_report(PAIRS, scorer=WordCount(), n_examples=2)
    assert rep["n_pairs"] == 4 and rep["identical_share"] == 0.25
    c, r = rep["chosen"], rep["rejected"]
    assert c["distinct2_mean"] == pytest.approx((1 + 1 + 1 / 9 + 1) / 4)
    assert r["distinct2_mean"] == 1.0
    chosen_texts = [p["chosen"][0]["content"] for p in PAIRS]
    assert c["distinct2_corpus"] == pytest.approx(distinct_n(" ".join(chosen_texts), 2))
    assert c["degenerate_share"] == 0.25 and r["degenerate_share"] == 0.0
    assert c["finished_share"] == 0.75 and r["finished_share"] == 0.75
    assert c["mean_words"] == (6 + 5 + 10 + 1) / 4 and r["mean_words"] == (4 + 5 + 1 + 6) / 4
    assert c["mean_score"] == c["mean_words"] and r["mean_score"] == r["mean_words"]
    assert rep["win_share"] == 0.25  # q0 only: q2's win does not count (degenerate), q1 is a tie
    assert rep["scorer"] == "word_count"
    assert rep["examples"] == [
        {"instruction": "q0", "criterion": "helpful", "chosen": "Paris is the capital of France.",
         "rejected": "I do not know."},
        {"instruction": "q1", "criterion": "helpful", "chosen": "Same answer on both sides",
         "rejected": "Same answer on both sides"}]
    plain = pair_report(PAIRS)
    assert "win_share" not in plain and "mean_score" not in plain["chosen"] and len(plain["examples"]) == 4

    class Judge:
        def compare(self, instructions, a, b):
            return [1.0, 1.0, 1.0, 0.5]

    rep = pair_report(PAIRS, scorer=Judge())
    assert rep["win_share"] == 0.5 and rep["scorer"] == "Judge"  # q2 is degenerate
    with pytest.raises(ValueError, match="No pairs"):
        pair_report([])


# ---- CLI: calibrate, then generate -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cal_cli")
    instr = root / "feature.txt"
    instr.write_text("\n".join(INSTRUCTIONS) + "\n")
    out = root / "dirs"
    assert main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--criteria",
                 "helpful,honest", "--instructions", str(instr), "--out", str(out), "--batch-size", "6"]) == 0
    return out


@pytest.fixture
def scored(tmp_path):
    p = tmp_path / "scored.jsonl"
    p.write_text("".join(json.dumps({"instruction": q, "criterion": "helpful"}) + "\n" for q in QUESTIONS))
    return p


def _calibrate(model_dir, d, scored, out, *extra):
    return main(["calibrate", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--directions", str(d),
                 "--instructions", str(scored), "--out", str(out), "--n", "2", "--gammas-pos", "0.05,0.1",
                 "--gammas-neg", "-0.05", "--max-new-tokens", "4", "--layers", "all", *extra])


def _generate(model_dir, d, scored, out, *extra):
    return main(["generate", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--directions", str(d),
                 "--instructions", str(scored), "--out", str(out), "--layers", "all", "--max-new-tokens", "4", *extra])


@pytest.mark.filterwarnings("ignore:No gamma- reaches")
def test_cli_calibrate_then_generate(tiny_model, tiny_model_dir, dirs_dir, scored, tmp_path, capsys):
    cal = tmp_path / "cal"
    assert _calibrate(tiny_model_dir, dirs_dir, scored, cal) == 0
    stdout = capsys.readouterr().out
    names = ["calibration.json", "calibration.md", "calibration.png", "gammas.yaml"]
    assert sorted(p.name for p in cal.iterdir()) == names
    assert "wrote:" in stdout and all(str(cal / n) in stdout for n in names)
    assert (cal / "calibration.md").read_text().strip() in stdout  # the table is printed
    data = json.loads((cal / "calibration.json").read_text())
    assert [r["gamma"] for r in data["per_gamma"]] == [-0.05, 0.05, 0.1]
    assert data["settings"]["n"] == 2 and data["settings"]["layers"] == [0, 1, 2, 3]
    assert data["settings"]["scorer"] == "reward_probe"  # the default: not the steering directions
    assert data["gamma_pos"] in (0.05, 0.1) and data["gamma_neg"] == -0.05
    # the CLI equals the library call (default scorer: the reward probe at the steering layers)
    ref = calibrate_gamma(tiny_model, il.DirectionSet.load(dirs_dir), [json.loads(x) for x in
                          scored.read_text().splitlines()], n=2, gammas_pos=[0.05, 0.1], gammas_neg=[-0.05],
                          layers=[0, 1, 2, 3], scale=il.PairsConfig().scale, max_new_tokens=4, progress=False)
    assert (ref.gamma_pos, ref.gamma_neg) == (data["gamma_pos"], data["gamma_neg"])
    assert [r["mean_score"] for r in ref.per_gamma] == pytest.approx([r["mean_score"] for r in data["per_gamma"]],
                                                                     abs=1e-4)
    gammas = load_gammas(cal)
    assert (gammas["gamma_pos"], gammas["gamma_neg"]) == (data["gamma_pos"], data["gamma_neg"])
    assert gammas["max_new_tokens"] == 4 and gammas["layers"] == [0, 1, 2, 3]

    gen = tmp_path / "gen"
    assert _generate(tiny_model_dir, dirs_dir, scored, gen, "--gammas", str(cal)) == 0
    stdout = capsys.readouterr().out
    names = ["generation.json", "pairs.jsonl", "report.json"]
    assert sorted(p.name for p in gen.iterdir()) == names
    assert all(str(gen / n) in stdout for n in names)
    settings = json.loads((gen / "generation.json").read_text())
    assert (settings["gamma_pos"], settings["gamma_neg"]) == (data["gamma_pos"], data["gamma_neg"])
    assert settings["layers"] == [0, 1, 2, 3] and settings["batch_size"] == 8 and settings["max_new_tokens"] == 4
    rows = [json.loads(x) for x in (gen / "pairs.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == QUESTIONS and [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all(r["criterion"] == "helpful" and r["gamma_pos"] == data["gamma_pos"] for r in rows)
    report = json.loads((gen / "report.json").read_text())
    assert report["n_pairs"] == 4 and report["scorer"] == "probe" and 0 <= report["win_share"] <= 1
    probe = ProbeScorer(tiny_model, il.DirectionSet.load(dirs_dir), layers=[0, 1, 2, 3])
    assert report["win_share"] == pair_report(rows, scorer=probe)["win_share"]
    assert report["identical_share"] == sum(r["chosen"] == r["rejected"] for r in rows) / 4

    # a rerun continues the run: nothing is regenerated
    before = (gen / "pairs.jsonl").read_bytes()
    assert _generate(tiny_model_dir, dirs_dir, scored, gen, "--gammas", str(cal)) == 0
    assert (gen / "pairs.jsonl").read_bytes() == before
    capsys.readouterr()
    # other settings are refused (the folder is kept), --overwrite starts again; --gamma-pos beats --gammas
    assert _generate(tiny_model_dir, dirs_dir, scored, gen, "--gammas", str(cal), "--gamma-pos", "0.3") == 2
    assert "other settings (gamma_pos:" in capsys.readouterr().err
    assert (gen / "pairs.jsonl").read_bytes() == before
    assert _generate(tiny_model_dir, dirs_dir, scored, gen, "--gammas", str(cal), "--gamma-pos", "0.3",
                     "--overwrite") == 0
    settings = json.loads((gen / "generation.json").read_text())
    assert (settings["gamma_pos"], settings["gamma_neg"]) == (0.3, data["gamma_neg"])


@pytest.mark.parametrize("extra,match", [
    (["--gammas-pos", "0.1,abc"], "--gammas-pos/--gammas-neg must be comma-separated numbers"),
    (["--gammas-neg", "minus"], "--gammas-pos/--gammas-neg must be comma-separated numbers"),
    (["--layers", "suggested"], "no suggested layers"),
    (["--layers", "0-9"], "not in the directions"),
    (["--criterion", "kindness"], "not in the directions"),
    (["--gammas-neg", "0.2"], "Every gamma+ must exceed every gamma-"),
])
def test_cli_calibrate_bad_input_returns_2(tiny_model_dir, dirs_dir, scored, tmp_path, capsys, extra, match):
    out = tmp_path / "cal"
    assert _calibrate(tiny_model_dir, dirs_dir, scored, out, *extra) == 2
    err = capsys.readouterr().err
    assert "icon2-lens calibrate: error:" in err and match in err
    assert not out.exists()


def test_cli_generate_uses_the_calibrated_scale(tiny_model_dir, dirs_dir, scored, tmp_path):
    cfg = tmp_path / "gammas.yaml"
    cfg.write_text(yaml.safe_dump({"gamma_pos": 2.0, "gamma_neg": -2.0, "layers": [0, 1, 2, 3], "scale": "unit",
                                   "positions": "all", "max_new_tokens": 4, "do_sample": False,
                                   "repetition_penalty": 1.1}))
    gen = tmp_path / "gen"
    assert _generate(tiny_model_dir, dirs_dir, scored, gen, "--gammas", str(cfg)) == 0
    assert json.loads((gen / "generation.json").read_text())["scale"] == "unit"


def test_parse_verdict_handles_formats_and_garbage():
    from icon2_lens.evaluation import parse_verdict

    for text, want in [("A", "A"), ("B.", "B"), ("Response B", "B"), ("**A**", "A"), ("The answer is B.", "B"),
                       ("ranking: A > B", "A"), ("Ranking: (B) > (A)", "B"), ("  a  ", None)]:
        assert parse_verdict(text) == want, text
    for garbage in ["", "banana", "Both A and B are fine", "AB", "Alpha Beta", "A B", "\x14\x14"]:
        assert parse_verdict(garbage) is None, garbage


def test_degeneration_stats():
    from icon2_lens.evaluation import degeneration_stats

    s = degeneration_stats(["one two three four", "go go go go go go go go go go"])
    assert s["distinct1"] == pytest.approx((1.0 + 0.1) / 2)
    assert s["repetition_rate"] == pytest.approx((0.0 + 7 / 8) / 2)
    assert s["degenerate_share"] == 0.5 and s["mean_words"] == 7.0
    with pytest.raises(ValueError, match="No texts"):
        degeneration_stats([])
