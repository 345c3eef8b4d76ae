"""The `synthesize` and `score` subcommands, run in-process on the tiny model."""

from __future__ import annotations

import json

import pytest

import icon2_lens as il
from icon2_lens.cli import main


INSTR = ["Write a haiku about the sea.", "Explain how DNS works.", "What is the capital of France?",
         "Give me three tips for sleeping better.", "How do I reverse a list in Python?"]
TO_SCORE = ["Name three rivers in Africa.", "Write a limerick about a cat.", "How many legs does a spider have?",
            "Suggest a name for a bakery.", "Explain recursion to a child.", "What is 2+2?"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


# ---- synthesize ---------------------------------------------------------------------------------


def _synth(model_dir, out, *extra):
    return main(["synthesize", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--n", "8",
                 "--out", str(out), "--max-new-tokens", "6", "--min-words", "1", "--batch-size", "4", *extra])


def test_synthesize_writes_continues_and_overwrites(tiny_model, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "synth"
    assert _synth(tiny_model_dir, out) == 0
    stdout = capsys.readouterr().out
    assert "wrote:" in stdout
    for name in ("instructions.jsonl", "dropped.jsonl", "report.json", "raw.jsonl"):
        assert (out / name).is_file() and str(out / name) in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["generated"] == 8 and report["kept"] + sum(report["dropped"].values()) == 8
    assert '"generated": 8' in stdout  # the report is printed
    assert len(_lines(out / "instructions.jsonl")) == report["kept"]
    assert len(_lines(out / "dropped.jsonl")) == 8 - report["kept"]
    raw = _lines(out / "raw.jsonl")
    assert len(raw) == 8
    settings = json.loads((out / "synthesis.json").read_text())
    assert settings["batch_size"] == 4 and settings["max_new_tokens"] == 6
    # the CLI equals the library call
    ref = il.synthesize_instructions(tiny_model, 8, max_new_tokens=6, min_words=1, batch_size=4, progress=False,
                                     out=tmp_path / "ref")
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(raw) == strip(_lines(tmp_path / "ref" / "raw.jsonl"))
    assert il.synthesis.synthesis_report(ref)["dropped"] == report["dropped"]

    # a rerun continues the run: nothing new to generate
    assert _synth(tiny_model_dir, out) == 0
    assert _lines(out / "raw.jsonl") == raw
    capsys.readouterr()

    # other settings are refused without --overwrite, and the folder is kept
    before = _files(out)
    assert _synth(tiny_model_dir, out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "icon2-lens synthesize: error:" in err and "seed" in err and "--overwrite" in err
    assert _files(out) == before

    # --overwrite restarts
    assert _synth(tiny_model_dir, out, "--seed", "1", "--overwrite") == 0
    new_raw = _lines(out / "raw.jsonl")
    assert len(new_raw) == 8 and new_raw != raw
    assert json.loads((out / "synthesis.json").read_text())["seed"] == 1


def test_synthesize_refuses_foreign_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert _synth(tiny_model_dir, out, *extra) == 2
        assert "synthesis" in capsys.readouterr().err
        assert _files(out) == {"notes.txt": b"keep me"}
    f = tmp_path / "afile"
    f.write_text("x")
    assert _synth(tiny_model_dir, f) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_synthesize_into_empty_folder_with_default_batch(tiny_model_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    argv = ["synthesize", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--n", "8",
            "--out", str(out), "--max-new-tokens", "6", "--min-words", "1"]
    assert main(argv) == 0
    assert json.loads((out / "synthesis.json").read_text())["batch_size"] == 16  # synthesize's own default
    assert json.loads((out / "report.json").read_text())["generated"] == 8
    raw = _lines(out / "raw.jsonl")
    assert len(raw) == 16  # raw.jsonl holds whole batches; only the first n count
    assert main(argv) == 0 and _lines(out / "raw.jsonl") == raw


@pytest.mark.parametrize("args,match", [(["--n", "0"], "positive"), (["--temperature", "0"], "--temperature"),
                                        (["--top-p", "2"], "--top-p"), (["--min-words", "0"], "--min-words")])
def test_synthesize_bad_input_returns_2(tiny_model_dir, tmp_path, capsys, args, match):
    out = tmp_path / "synth"
    assert _synth(tiny_model_dir, out, *args) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


# ---- score --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    instr = root / "feature.txt"
    instr.write_text("\n".join(INSTR) + "\n")
    out = root / "dirs"
    rc = main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--criteria",
               "helpful,honest", "--instructions", str(instr), "--out", str(out), "--batch-size", "5"])
    assert rc == 0
    return out


@pytest.fixture
def to_score(tmp_path):
    p = tmp_path / "to_score.jsonl"
    p.write_text("".join(json.dumps({"instruction": x, "id": i}) + "\n" for i, x in enumerate(TO_SCORE)))
    return p


def _score(model_dir, dirs, instructions, out, *extra):
    return main(["score", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--directions", str(dirs),
                 "--instructions", str(instructions), "--out", str(out), *extra])


def test_score_writes_outputs(tiny_model, tiny_model_dir, dirs_dir, to_score, tmp_path, capsys):
    from datasets import load_dataset

    out = tmp_path / "scored"
    assert _score(tiny_model_dir, dirs_dir, to_score, out, "--top-k", "2") == 0
    stdout = capsys.readouterr().out
    names = ["scores.jsonl", "selected.jsonl", "consistency_hist.png", "score_report.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert "wrote:" in stdout and all(str(out / n) in stdout for n in names)
    assert (out / "consistency_hist.png").read_bytes()[:8] == PNG_MAGIC

    scores = [json.loads(x) for x in _lines(out / "scores.jsonl")]
    assert [r["instruction"] for r in scores] == TO_SCORE
    ref = il.score_instructions(tiny_model, il.DirectionSet.load(dirs_dir), TO_SCORE, progress=False)  # standardised
    for r, want in zip(scores, ref):
        assert list(r) == ["instruction", "score_helpful", "score_honest", "consistency", "criterion",
                           *il.scoring.PROVENANCE_COLUMNS]
        assert r["score_helpful"] == pytest.approx(want["score_helpful"], abs=1e-5)
        assert r["score_honest"] == pytest.approx(want["score_honest"], abs=1e-5)
        assert r["criterion"] == want["criterion"]

    sel = load_dataset("json", data_files=str(out / "selected.jsonl"), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(sel) == 2
    best = sorted(scores, key=lambda r: -r["consistency"])[:2]
    assert list(sel["instruction"]) == [r["instruction"] for r in best]
    assert list(sel["consistency"]) == pytest.approx([r["consistency"] for r in best])

    report = json.loads((out / "score_report.json").read_text())
    assert report["scored"] == 6 and report["selected"] == 2
    assert report["selection"] == {"top_fraction": None, "top_k": 2, "threshold": None, "balance_criteria": False}
    assert report["settings"]["layers"] == [0, 1, 2, 3] and report["settings"]["render"] == "chat"
    assert sum(report["criterion_all"].values()) == 6 and sum(report["criterion_selected"].values()) == 2
    assert report["lowest_selected_consistency"] == pytest.approx(best[-1]["consistency"])

    # an existing output folder is refused without --overwrite, and left alone
    before = _files(out)
    assert _score(tiny_model_dir, dirs_dir, to_score, out, "--top-k", "3") == 2
    assert "already exists" in capsys.readouterr().err
    assert _files(out) == before
    assert _score(tiny_model_dir, dirs_dir, to_score, out, "--top-k", "3", "--overwrite") == 0
    assert len(_lines(out / "selected.jsonl")) == 3


def test_score_default_selection_and_options(tiny_model_dir, dirs_dir, to_score, tmp_path):
    out = tmp_path / "o1"
    assert _score(tiny_model_dir, dirs_dir, to_score, out) == 0
    assert len(_lines(out / "selected.jsonl")) == 1  # ceil(10% of 6)
    out = tmp_path / "o2"
    assert _score(tiny_model_dir, dirs_dir, to_score, out, "--no-standardize", "--render", "raw",
                  "--threshold=-1e9", "--batch-size", "2") == 0
    report = json.loads((out / "score_report.json").read_text())
    assert report["settings"]["standardize"] is False and report["settings"]["render"] == "raw"
    assert report["selected"] == 6


@pytest.mark.parametrize("spec,want", [("0-1", [0, 1]), ("0,2", [0, 2]), ("3", [3]), ("all", [0, 1, 2, 3])])
def test_score_layers_option(tiny_model, tiny_model_dir, dirs_dir, to_score, tmp_path, spec, want):
    out = tmp_path / "o"
    assert _score(tiny_model_dir, dirs_dir, to_score, out, "--layers", spec, "--top-k", "1") == 0
    report = json.loads((out / "score_report.json").read_text())
    assert report["settings"]["layers"] == want
    scores = [json.loads(x) for x in _lines(out / "scores.jsonl")]
    ref = il.score_instructions(tiny_model, il.DirectionSet.load(dirs_dir), TO_SCORE, layers=want, progress=False)
    assert [r["score_honest"] for r in scores] == pytest.approx(list(ref["score_honest"]), abs=1e-5)


def test_score_argparse_conflict(dirs_dir, to_score, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _score("unused", dirs_dir, to_score, tmp_path / "o", "--top-k", "2", "--threshold", "0.1")
    assert exc.value.code == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,match", [
    (["--threshold", "1e9"], "No instruction reaches"),
    (["--layers", "x"], "--layers 'x'"),
    (["--layers", "0-9"], "not in the directions"),
    (["--layers", "suggested"], "no suggested layers"),
    (["--top-fraction", "0"], "--top-fraction"),
    (["--top-k", "0"], "--top-k"),
    (["--threshold", "nan"], "--threshold nan is not a finite number"),
    (["--threshold", "0", "--balance-criteria"], "--balance-criteria works with --top-fraction or --top-k"),
])
def test_score_bad_options_return_2(tiny_model_dir, dirs_dir, to_score, tmp_path, capsys, args, match):
    out = tmp_path / "o"
    assert _score(tiny_model_dir, dirs_dir, to_score, out, *args) == 2
    err = capsys.readouterr().err
    assert "icon2-lens score: error:" in err and match in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["to_score.jsonl"]  # no temp folder left behind


def test_score_bad_instruction_files(tiny_model_dir, dirs_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert _score(tiny_model_dir, dirs_dir, empty, tmp_path / "o") == 2
    assert "No instructions" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Name a river."}\n{"instruction": "Oops"\n{"instruction": "x"}\n')
    assert _score(tiny_model_dir, dirs_dir, bad, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2" in err and "not valid JSON" in err
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"prompt": "Name a river."}\n')
    assert _score(tiny_model_dir, dirs_dir, nocol, tmp_path / "o") == 2
    assert "no 'instruction' field" in capsys.readouterr().err
    assert _score(tiny_model_dir, dirs_dir, tmp_path / "missing.txt", tmp_path / "o") == 2
    assert _score(tiny_model_dir, tmp_path / "nodirs", empty, tmp_path / "o") == 2
    assert "not a DirectionSet folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_score_a_synthesize_folder(tiny_model_dir, dirs_dir, tmp_path):
    synth = tmp_path / "synth"
    synth.mkdir()
    (synth / "instructions.jsonl").write_text(
        "".join(json.dumps({"instruction": x, "raw": x, "index": i}) + "\n" for i, x in enumerate(TO_SCORE[:4])))
    out = tmp_path / "o"
    assert _score(tiny_model_dir, dirs_dir, synth, out, "--top-fraction", "0.5") == 0
    assert [json.loads(x)["instruction"] for x in _lines(out / "scores.jsonl")] == TO_SCORE[:4]
    assert len(_lines(out / "selected.jsonl")) == 2


def test_score_other_model_directions_return_2(other_tiny_model, dirs_dir, to_score, tmp_path, capsys):
    out = tmp_path / "o"
    assert _score(other_tiny_model.info.hf_path, dirs_dir, to_score, out) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not out.exists()




def test_synthesize_then_score(talker_dir, tiny_model_dir, dirs_dir, tmp_path):
    """The two stages chain: score reads a synthesize folder's kept rows (instructions.jsonl), not raw.jsonl."""
    synth = tmp_path / "synth"
    assert _synth(talker_dir, synth, "--max-new-tokens", "16", "--n", "16") == 0
    report = json.loads((synth / "report.json").read_text())
    kept = [json.loads(x)["instruction"] for x in _lines(synth / "instructions.jsonl")]
    assert len(kept) == report["kept"] >= 2 and report["kept"] < 16
    out = tmp_path / "o"
    assert _score(tiny_model_dir, dirs_dir, synth, out, "--top-k", "1") == 0
    assert [json.loads(x)["instruction"] for x in _lines(out / "scores.jsonl")] == [x.strip() for x in kept]
    assert len(_lines(out / "selected.jsonl")) == 1


def test_score_an_empty_synthesis_is_refused(tiny_model_dir, dirs_dir, tmp_path, capsys):
    synth = tmp_path / "synth"
    assert _synth(tiny_model_dir, synth) == 0  # the random tiny model never ends its turn in 6 tokens
    assert (synth / "instructions.jsonl").read_text() == ""
    capsys.readouterr()
    out = tmp_path / "o"
    assert _score(tiny_model_dir, dirs_dir, synth, out) == 2
    err = capsys.readouterr().err
    assert "No instructions found" in err and "instructions.jsonl" in err
    assert not out.exists()


def test_synthesize_overwrite_does_not_delete_a_file(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("precious")
    rc = _synth(tiny_model_dir, f, "--overwrite")
    assert f.is_file() and f.read_text() == "precious"
    assert rc == 2 and "is a file" in capsys.readouterr().err
