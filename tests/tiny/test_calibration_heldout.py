"""Calibration that is not circular: a held-out random sample, the reward-probe default, the self-probe label,
the bootstrap of the rule, the cumulative push per gamma, and the CLI options for them."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import pytest

import icon2_lens as il
from icon2_lens import calibration as cal_mod
from icon2_lens.calibration import calibrate_gamma, calibration_sample
from icon2_lens.cli import main
from icon2_lens.directions import instruction_hash
from icon2_lens.judges import ProbeScorer
from icon2_lens.math.gamma import cumulative_push
from icon2_lens.prompts import render_chat
from icon2_lens.reward_probe import RewardProbeScorer
from icon2_lens.steering import steering_vectors

from conftest import INSTRUCTIONS

LAYERS = [1, 2]
QUESTIONS = [f"Question number {i}: name a colour." for i in range(12)]
ROWS = [{"instruction": q, "criterion": "helpful" if i % 2 else "honest"} for i, q in enumerate(QUESTIONS)]


@dataclass(frozen=True)
class Pref:
    prompt: str
    chosen: str
    rejected: str
    criterion: str


PREFS = [Pref("Name a river.", "The Nile.", "No.", "helpful"), Pref("Is ice cold?", "Yes.", "No, it is hot.", "honest"),
         Pref("What is 1+1?", "2.", "3.", "honest")]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    return d.with_meta(suggested_layers=LAYERS)


@pytest.fixture
def score_dir(tmp_path):
    """A `score` output folder: 12 scored rows, the first 4 selected."""
    folder = tmp_path / "score"
    folder.mkdir()
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    return folder


# ---- the sample ----------------------------------------------------------------------------------------


def test_sample_is_seeded_random_in_table_order_and_excludes_given_rows(dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, info = calibration_sample(ROWS, 5, dirs, exclude=QUESTIONS[:6], seed=0)
    got = [r["instruction"] for r in rows]
    assert len(got) == 5 and not set(got) & set(QUESTIONS[:6])
    assert got == sorted(got, key=QUESTIONS.index)  # table order
    assert info == {"source": "rows", "pool": 12, "excluded": 6, "seed": 0, "hashes": [instruction_hash(q) for q in got]}
    again, _ = calibration_sample(ROWS, 5, dirs, exclude=QUESTIONS[:6], seed=0)
    assert again == rows
    other = [calibration_sample(ROWS, 3, dirs, exclude=(), seed=s)[0] for s in range(4)]
    assert len({tuple(r["instruction"] for r in o) for o in other}) > 1  # the seed matters
    assert [r["instruction"] for r in other[0]] != QUESTIONS[:3] or [r["instruction"] for r in other[1]] != \
        QUESTIONS[:3]  # not simply the first rows
    # exclusion compares normalised text (surrounding space)
    rows, info = calibration_sample(ROWS, 6, dirs, exclude=[f"  {q}\n" for q in QUESTIONS[:6]])
    assert {r["instruction"] for r in rows} == set(QUESTIONS[6:]) and info["excluded"] == 6


def test_too_few_rows_left_is_a_clear_error(dirs):
    with pytest.raises(ValueError, match=r"Only 2 of the table's 12 rows are left after excluding 10 training rows, "
                                         r"fewer than n=3; pass n <= 2"):
        calibration_sample(ROWS, 3, dirs, exclude=QUESTIONS[:10])


def test_a_score_folder_gives_its_scores_without_the_selected_rows(dirs, score_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, info = calibration_sample(score_dir, 8, dirs, seed=3)
    assert {r["instruction"] for r in rows} == set(QUESTIONS[4:])
    assert info["pool"] == 12 and info["excluded"] == 4 and info["source"].endswith("scores.jsonl")
    with pytest.raises(ValueError, match="Only 8 of the table's 12 rows"):
        calibration_sample(score_dir, 9, dirs)
    # an explicit exclude replaces the folder's selection; drawing a selected row then warns
    with pytest.warns(UserWarning, match="4 of the 12 calibration instructions are training rows"):
        rows, info = calibration_sample(score_dir, 12, dirs, exclude=[])
    assert info["excluded"] == 0
    # without selected.jsonl nothing is known to exclude: a warning
    (score_dir / "selected.jsonl").unlink()
    with pytest.warns(UserWarning, match="has no selected.jsonl"):
        rows, _ = calibration_sample(score_dir, 12, dirs)


def test_a_plain_table_without_exclude_warns(dirs):
    with pytest.warns(UserWarning, match="not checked against the training rows"):
        calibration_sample(ROWS, 2, dirs)


# ---- calibrate_gamma: scripted generation ---------------------------------------------------------------


def _script(monkeypatch):
    """Generation replaced by '<gamma> <question index>' texts; returns the calls."""
    calls = []

    def fake(model, prompts, *, directions, criteria, gammas, **kw):
        calls.append(list(gammas))
        idx = [next(j for j, q in enumerate(QUESTIONS) if render_chat(model.tokenizer, q) == p) for p in prompts]
        return [{"text": f"Answer {g} to question {i}, a calm and ordinary reply.", "finished": True, "n_tokens": 3}
                for g, i in zip(gammas, idx)]

    monkeypatch.setattr(cal_mod, "generate_steered", fake)
    return calls


class ByGamma:
    """Score = gamma for gamma+ and -gamma for gamma- ... plus noise from the question index."""

    name = "by_gamma"

    def __call__(self, instructions, responses, criteria):
        out = []
        for r in responses:
            words = r.split()
            g, i = float(words[1]), int(words[4].rstrip(","))
            out.append(-abs(g - 0.1) + (0.05 if i % 3 == 0 else 0.0) * (1 if g > 0 else -1))
        return out


def test_bootstrap_push_and_sample_in_the_result(tiny_model, dirs, score_dir, monkeypatch):
    _script(monkeypatch)
    res = calibrate_gamma(tiny_model, dirs, score_dir, n=6, gammas_pos=[0.05, 0.1, 0.2], gammas_neg=[-0.1, -0.05],
                          scorer=ByGamma(), max_new_tokens=4, progress=False, n_boot=40, seed=2)
    s = res.settings
    assert s["sample"]["pool"] == 12 and s["sample"]["excluded"] == 4 and len(s["sample"]["hashes"]) == 6
    assert not set(s["sample"]["hashes"]) & {instruction_hash(q) for q in QUESTIONS[:4]}
    assert {e["instruction"] for e in res.examples} <= set(QUESTIONS[4:])
    assert s["n_boot"] == 40 and s["seed"] == 2
    # the bootstrap: shares of 40 resamples, summing to 1, the chosen pair among them
    assert sum(b["share"] for b in res.bootstrap) == pytest.approx(1.0)
    assert all(b["share"] * 40 == pytest.approx(round(b["share"] * 40)) for b in res.bootstrap)
    assert (res.gamma_pos, res.gamma_neg) in {(b["gamma_pos"], b["gamma_neg"]) for b in res.bootstrap}
    assert res.to_dict()["bootstrap"] == res.bootstrap
    # the push per gamma: the mean over the sample's rows of cumulative_push at the last steering layer
    crits = [e["criterion"] for e in res.examples if e["gamma"] == 0.1]
    assert len(crits) == 3  # examples: the first 3 rows
    for r in res.per_gamma:
        for c, p in r["push"].items():
            ci, li = dirs.index(c), dirs.layers.index(2)
            want = cumulative_push(steering_vectors(dirs, c, r["gamma"], layers=LAYERS), float(
                dirs.stats["resid_norm"][ci, li]), float(dirs.stats["proj_gap"][ci, li]))
            assert p == {"share": pytest.approx(want["share_of_resid_norm"]), "gap": pytest.approx(want["gap_multiple"])}
        assert r["push_share"] > 0 and r["push_gap"] > 0
    per = {r["gamma"]: r for r in res.per_gamma}
    assert per[0.2]["push_share"] == pytest.approx(2 * per[0.1]["push_share"])  # linear in |gamma|
    assert per[-0.1]["push_share"] == pytest.approx(per[0.1]["push_share"])
    t = res.table()
    assert "| gamma | side | mean score | degenerate | distinct-2 | push / resid norm | push / contrast gap |" in t
    assert f"how often the rule picks each pair over 40 resamples of the 6 instructions" in t
    assert "| gamma+ | gamma- | share |" in t
    assert "6 instructions drawn at random (seed 2) from the 12 rows of" in t and "4 training rows left out" in t
    assert t.rstrip().endswith("(scorer by_gamma, win threshold 0.9)")
    res0 = calibrate_gamma(tiny_model, dirs, score_dir, n=6, gammas_pos=[0.1], gammas_neg=[-0.1], scorer=ByGamma(),
                           max_new_tokens=4, progress=False, n_boot=0)
    assert res0.bootstrap == [] and "resamples" not in res0.table()


def test_contrast_scale_push_is_gamma_gaps_on_one_layer(tiny_model, dirs, score_dir, monkeypatch):
    _script(monkeypatch)
    res = calibrate_gamma(tiny_model, dirs, score_dir, n=4, gammas_pos=[0.5, 1.0], gammas_neg=[-1.0], scorer=ByGamma(),
                          layers=[2], scale="contrast", max_new_tokens=4, progress=False, n_boot=5)
    assert {r["gamma"]: r["push_gap"] for r in res.per_gamma} == pytest.approx({-1.0: 1.0, 0.5: 0.5, 1.0: 1.0})


def test_the_default_scorer_is_the_reward_probe(tiny_model, dirs, score_dir, monkeypatch):
    _script(monkeypatch)
    res = calibrate_gamma(tiny_model, dirs, score_dir, n=3, gammas_pos=[0.1], gammas_neg=[-0.1], max_new_tokens=4,
                          progress=False, n_boot=5, preference_pairs=PREFS)
    s = res.settings
    assert s["scorer"] == "reward_probe"
    assert s["scorer_probe"]["layers"] == LAYERS and s["scorer_probe"]["mode"] == "pooled"
    assert s["scorer_accuracy"]["n"] == 3 and s["scorer_accuracy"]["set"] == "given"
    assert set(s["scorer_accuracy"]["per_criterion"]) == {"helpful", "honest"}
    assert set(s["scorer_cosine"]) == {"helpful", "honest"}
    rp = RewardProbeScorer.fit(tiny_model, layers=LAYERS)
    assert s["scorer_accuracy"]["accuracy"] == rp.accuracy(PREFS)["accuracy"]
    for e in res.examples:  # the scores are the reward probe's
        assert e["score"] == pytest.approx(rp([e["instruction"]], [e["response"]], [e["criterion"]])[0], abs=1e-5)
    t = res.table()
    assert "scorer: reward_probe, preference accuracy on held-out human-written pairs (given)" in t
    assert "(n=3, 90% interval" in t
    # the named form is the same scorer; the shipped set is the default when it is there
    named = calibrate_gamma(tiny_model, dirs, score_dir, n=3, gammas_pos=[0.1], gammas_neg=[-0.1], max_new_tokens=4,
                            progress=False, n_boot=5, scorer="reward-probe", preference_pairs=PREFS)
    assert named.per_gamma == res.per_gamma


@pytest.mark.filterwarnings("ignore:No gamma- reaches")
def test_the_self_probe_warns_and_is_labelled(tiny_model, dirs, score_dir, monkeypatch):
    _script(monkeypatch)
    kw = dict(n=3, gammas_pos=[0.1], gammas_neg=[-0.1], max_new_tokens=4, progress=False, n_boot=5)
    with pytest.warns(UserWarning, match="reads the steering directions themselves: calibrating with it is circular"):
        res = calibrate_gamma(tiny_model, dirs, score_dir, scorer="self-probe", **kw)
    assert res.settings["scorer"] == "self-probe" and "scorer_accuracy" not in res.settings
    t = res.table()
    assert "*self-probe*" in t and "circular" in t and "(scorer self-probe, win threshold 0.9)" in t
    probe = ProbeScorer(tiny_model, dirs, layers=LAYERS)
    for e in res.examples:
        assert e["score"] == pytest.approx(probe([e["instruction"]], [e["response"]], [e["criterion"]])[0], abs=1e-5)
    with pytest.warns(UserWarning, match="circular"):
        res2 = calibrate_gamma(tiny_model, dirs, score_dir, scorer=probe, **kw)
    assert res2.settings["scorer"] == "self-probe"
    with pytest.raises(ValueError, match="Unknown scorer 'oracle'"):
        calibrate_gamma(tiny_model, dirs, score_dir, scorer="oracle", **kw)


def test_unstable_choice_warns(tiny_model, dirs, monkeypatch):
    _script(monkeypatch)

    class ThreeWay:
        """Each third of the questions prefers another gamma+; the first third by a hair, so it wins on the table."""

        name = "three_way"

        def __call__(self, instructions, responses, criteria):
            out = []
            for r in responses:
                g, i = float(r.split()[1]), int(r.split()[4].rstrip(","))
                fav = (0.1, 0.2, 0.3)[i % 3]
                out.append(-1.0 if g < 0 else (1.0 + (0.01 if fav == 0.1 else 0.0)) if g == fav else 0.0)
            return out

    with pytest.warns(UserWarning, match=r"The choice is unstable: \(gamma\+ 0.1, gamma- -0.1\) is chosen in only"):
        res = calibrate_gamma(tiny_model, dirs, ROWS, exclude=(), n=12, gammas_pos=[0.1, 0.2, 0.3], gammas_neg=[-0.1],
                              scorer=ThreeWay(), max_new_tokens=4, progress=False, n_boot=60)
    assert res.gamma_pos == 0.1 and len(res.bootstrap) == 3
    assert next(b["share"] for b in res.bootstrap if b["gamma_pos"] == 0.1) < 0.5


# ---- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cal_heldout_cli")
    instr = root / "feature.txt"
    instr.write_text("\n".join(INSTRUCTIONS) + "\n")
    out = root / "dirs"
    assert main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--criteria",
                 "helpful,honest", "--instructions", str(instr), "--out", str(out), "--batch-size", "6"]) == 0
    return out


def _calibrate(model_dir, d, table, out, *extra):
    return main(["calibrate", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--directions", str(d),
                 "--instructions", str(table), "--out", str(out), "--n", "3", "--gammas-pos", "0.1",
                 "--gammas-neg", "-0.1", "--max-new-tokens", "3", "--layers", "1,2", *extra])


@pytest.mark.filterwarnings("ignore:No gamma- reaches", "ignore:The self-probe scorer")
def test_cli_scorer_exclude_and_n_boot(tiny_model_dir, dirs_dir, score_dir, tmp_path, capsys):
    out = tmp_path / "cal"
    with pytest.warns(UserWarning, match="circular"):
        assert _calibrate(tiny_model_dir, dirs_dir, score_dir, out, "--scorer", "self-probe", "--n-boot", "7",
                          "--seed", "1") == 0
    data = json.loads((out / "calibration.json").read_text())
    assert data["settings"]["scorer"] == "self-probe" and data["settings"]["n_boot"] == 7
    assert data["settings"]["seed"] == 1 and data["settings"]["sample"]["excluded"] == 4
    assert sum(b["share"] for b in data["bootstrap"]) == pytest.approx(1.0)
    assert "*self-probe*" in capsys.readouterr().out
    # --exclude: a file of training instructions replaces the folder's selection
    ex = tmp_path / "train.txt"
    ex.write_text("\n".join(QUESTIONS[:10]) + "\n")
    out2 = tmp_path / "cal2"
    assert _calibrate(tiny_model_dir, dirs_dir, score_dir, out2, "--scorer", "self-probe", "--exclude", str(ex),
                      "--n", "2") == 0
    data = json.loads((out2 / "calibration.json").read_text())
    assert sorted(data["settings"]["sample"]["hashes"]) == sorted(instruction_hash(q) for q in QUESTIONS[10:])
    # too few rows: exit 2 before the model is loaded, nothing written
    out3 = tmp_path / "cal3"
    assert _calibrate(tiny_model_dir, dirs_dir, score_dir, out3, "--exclude", str(ex)) == 2
    assert "Only 2 of the table's 12 rows" in capsys.readouterr().err and not out3.exists()
    # the old scorer names are refused by argparse
    with pytest.raises(SystemExit):
        _calibrate(tiny_model_dir, dirs_dir, score_dir, tmp_path / "cal4", "--scorer", "probe")
