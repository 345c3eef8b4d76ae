"""evaluate(): base vs trained model on held-out instructions (tiny models)."""

from __future__ import annotations

import json

import pytest

import icon2_lens as il
from icon2_lens.evaluation import probe_means

from conftest import INSTRUCTIONS, build_model_folder

HELDOUT = ["Name a river in Africa.", "Suggest a name for a cat.", "What is two plus two?"]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    return il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, progress=False).with_meta(
        suggested_layers=[1, 2])


@pytest.fixture(scope="module")
def sibling(tmp_path_factory):
    """Same shape (and fingerprint) as the tiny model, other weights: stands in for a trained model."""
    return il.load_model(build_model_folder(tmp_path_factory.mktemp("models") / "tiny-sibling", seed=1), device="cpu")


def test_evaluate_writes_report_and_metrics(tiny_model, sibling, dirs, tmp_path):
    out = tmp_path / "eval"
    m = il.evaluate(tiny_model, sibling, dirs, HELDOUT, max_new_tokens=4, out=out, progress=False)
    assert m["n"] == 3
    pb, pt = probe_means(tiny_model, dirs, HELDOUT), probe_means(sibling, dirs, HELDOUT)
    for c in ("helpful", "honest"):
        assert m["probe"][c]["base"] == pytest.approx(pb[c]) and m["probe"][c]["trained"] == pytest.approx(pt[c])
        assert m["probe"][c]["shift"] == pytest.approx(pt[c] - pb[c])
    j = m["judge"]
    assert j["win"] + j["tie"] + j["loss"] == pytest.approx(1.0) and j["name"] == "pairwise_judge"
    assert set(m["degeneration"]) == {"base", "trained"}
    assert sorted(p.name for p in out.iterdir()) == ["alpaca_eval_base.json", "alpaca_eval_trained.json",
                                                     "metrics.json", "probe_shift.png", "report.md"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    rows = json.loads((out / "alpaca_eval_trained.json").read_text())
    assert [r["instruction"] for r in rows] == HELDOUT and set(rows[0]) == {"instruction", "output", "generator"}
    assert "| helpful |" in (out / "report.md").read_text()
    with pytest.raises(FileExistsError):
        il.evaluate(tiny_model, sibling, dirs, HELDOUT, max_new_tokens=4, out=out, progress=False)


def test_a_model_against_itself_shifts_nothing_and_ties(tiny_model, dirs):
    m = il.evaluate(tiny_model, tiny_model, dirs, HELDOUT, max_new_tokens=4, progress=False)
    assert all(v["shift"] == 0.0 for v in m["probe"].values())
    assert m["judge"]["tie"] == 1.0  # identical answers: the verdict cannot survive the order swap


def test_evaluate_bad_input(tiny_model, other_tiny_model, dirs):
    with pytest.raises(ValueError, match="No held-out"):
        il.evaluate(tiny_model, tiny_model, dirs, [], progress=False)
    with pytest.raises(ValueError, match="fingerprint|shape"):
        il.evaluate(tiny_model, other_tiny_model, dirs, HELDOUT, progress=False)
    with pytest.warns(UserWarning, match="trained on"):
        il.evaluate(tiny_model, tiny_model, dirs, HELDOUT, max_new_tokens=2, training_instructions=HELDOUT[:1],
                    progress=False)


def test_cli_evaluate(tiny_model_dir, sibling, tmp_path, capsys):
    from icon2_lens.cli import main

    held = tmp_path / "held.txt"
    held.write_text("\n".join(HELDOUT))
    d = tmp_path / "dirs"
    inst = tmp_path / "inst.txt"
    inst.write_text("\n".join(INSTRUCTIONS))
    assert main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--out", str(d),
                 "--criteria", "helpful", "--instructions", str(inst)]) == 0
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--trained",
               sibling.info.hf_path, "--directions", str(d), "--instructions", str(held), "--out", str(out),
               "--max-new-tokens", "3"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "Probe shift" in stdout and str(out / "report.md") in stdout
    assert json.loads((out / "metrics.json").read_text())["n"] == 3
    assert main(["evaluate", "--model", str(tiny_model_dir), "--trained", str(tmp_path / "nope"), "--directions",
                 str(d), "--instructions", str(held), "--out", str(tmp_path / "e2")]) == 2


class _FirstPicker:
    """A judge that always picks the response shown first, whatever it says (pure position bias)."""

    name = "first_picker"

    def orders(self, instructions, a, b):
        return [True] * len(a), [True] * len(a)

    def compare(self, instructions, a, b):
        raise AssertionError("evaluate should use orders() when the judge has it")


class _Oracle:
    """A judge without orders(): 'a' always wins."""

    name = "oracle"

    def compare(self, instructions, a, b):
        return [1.0] * len(a)


def test_position_bias_is_measured_and_reported(tiny_model, sibling, dirs, tmp_path):
    m = il.evaluate(tiny_model, sibling, dirs, HELDOUT, judge=_FirstPicker(), max_new_tokens=4, out=tmp_path / "e",
                    progress=False)
    assert m["judge"]["tie"] == 1.0 and m["judge"]["first_position_share"] == 1.0
    assert "picked the response shown first in 1.00 of its 6 verdicts" in (tmp_path / "e" / "report.md").read_text()
    m2 = il.evaluate(tiny_model, sibling, dirs, HELDOUT, judge=_Oracle(), max_new_tokens=4, progress=False)
    assert m2["judge"]["win"] == 1.0 and m2["judge"]["first_position_share"] is None


def test_overlap_with_training_instructions_warns(tiny_model, sibling, dirs):
    with pytest.warns(UserWarning, match=r"1 of the 3 evaluation instructions were trained on .*not held out"):
        il.evaluate(tiny_model, sibling, dirs, HELDOUT, training_instructions=["Other.", HELDOUT[1]], max_new_tokens=2,
                    progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no overlap: no warning
        il.evaluate(tiny_model, sibling, dirs, HELDOUT, training_instructions=["Other."], max_new_tokens=2,
                    progress=False)
