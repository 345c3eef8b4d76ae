"""Data-parallel shards: ``i/n`` parsing, sharded synthesize/score/generate, and the merge (equal to unsharded)."""

from __future__ import annotations

import json

import pytest
import torch

import icon2_lens as il
from icon2_lens import pairs as pairs_mod
from icon2_lens.cli import main
from icon2_lens.runs.shards import check_shard, parse_shard, shard_batches, shard_device
from icon2_lens.synthesis import synthesis_report

from conftest import INSTRUCTIONS
from test_pairs import TABLE as PAIRS_TABLE

# Varied lengths, so the length-sorted scoring batches differ from input order; 40 rows with batch size 1
# are two chunks of 32 (batches are numbered across chunks).
TO_SCORE = il.instructions.builtin_instructions("heldout")[:40]
TABLE = [*PAIRS_TABLE, {"instruction": "What is 2+2?", "criterion": "honest", "consistency": 0.5}]  # 7 rows: an odd last batch
TIMING = {"generation_seconds", "generated_per_second", "kept_per_second", "wall_seconds_this_call"}


@pytest.fixture(scope="module")
def dirs(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    return d.with_meta(suggested_layers=[1, 2])


@pytest.fixture(scope="module")
def dirs_dir(dirs, tmp_path_factory):
    return dirs.save(tmp_path_factory.mktemp("shards") / "dirs")


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ---- i/n parsing, auto, batch selection ------------------------------------------------------------


def test_parse_shard_and_check_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ["2/2", "-1/2", "0/0", "1/-2", "a/b", "1", "1/2/3", "", "1.0/2"]:
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    assert check_shard(None) is None and check_shard([1, 3]) == (1, 3)
    for bad in [(2, 2), (0, 0), (-1, 2), (True, 2), (0.0, 2), (1,), (0, 1, 2)]:
        with pytest.raises(ValueError):
            check_shard(bad)
    with pytest.raises(TypeError, match="parse_shard"):
        check_shard("0/2")


def test_parse_shard_auto_from_launcher_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert parse_shard("auto") == (0, 1)  # a single process: accelerate launch sets neither
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard("auto") == (2, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="4/4"):
        parse_shard("auto")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        parse_shard("auto")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="integers"):
        parse_shard("auto")
    assert parse_shard("auto", env={"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)


def test_shard_device_and_batches(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert shard_device() is None
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert shard_device() is None  # CPU: the default device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert shard_device() == "cuda:2"
    assert shard_batches(7, (0, 3)) == [0, 3, 6] and shard_batches(7, (2, 3)) == [2, 5]
    assert shard_batches(2, (2, 3)) == [] and shard_batches(3, None) == [0, 1, 2]
    parts = [shard_batches(10, (i, 4)) for i in range(4)]
    assert sorted(b for p in parts for b in p) == list(range(10))


# ---- score -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,n", [(1, 2), (3, 3)])
def test_score_shards_merged_equal_unsharded(tiny_model, dirs, tmp_path, batch_size, n):
    ref = il.score_instructions(tiny_model, dirs, TO_SCORE, batch_size=batch_size, progress=False)
    parts = [il.score_instructions(tiny_model, dirs, TO_SCORE, batch_size=batch_size, progress=False, shard=(i, n))
             for i in range(n)]
    # each shard: a non-empty part, its global index, scores bit-identical to the unsharded rows
    assert all(len(p) > 0 for p in parts) and sum(len(p) for p in parts) == len(TO_SCORE)
    assert sorted(i for p in parts for i in p["index"]) == list(range(len(TO_SCORE)))
    for p in parts:
        assert p.column_names == [*ref.column_names[:5], "index", *ref.column_names[5:], *il.scoring.SHARD_COLUMNS[1:]]
        assert list(p["index"]) == sorted(p["index"])
        for row in p:
            want = ref[row["index"]]
            assert {k: v for k, v in row.items() if k not in il.scoring.SHARD_COLUMNS} == want
        settings = il.scoring.table_settings(p)
        assert settings["shard_total"] == len(TO_SCORE) and settings["shard_batch_size"] == batch_size
    folders = []
    for i, p in enumerate(parts):
        folders.append(tmp_path / f"s{i}")
        assert [x.name for x in il.scoring.save_scores(p, folders[-1])] == ["scores.jsonl", "shard.json"]
        assert sorted(x.name for x in folders[-1].iterdir()) == ["scores.jsonl", "shard.json"]
    merged = il.merge_shards("score", folders[::-1], out=tmp_path / "merged", top_k=5, balance_criteria=True)
    assert merged.to_list() == ref.to_list()
    assert merged.column_names == ref.column_names
    assert il.scoring.table_settings(merged) == il.scoring.table_settings(ref)
    il.scoring.save_scores(ref, tmp_path / "ref", top_k=5, balance_criteria=True)
    assert _files(tmp_path / "merged") == _files(tmp_path / "ref")  # scores, selection, report, histogram


def test_shard_scores_are_not_selected_on_their_own(tiny_model, dirs, tmp_path):
    part = il.score_instructions(tiny_model, dirs, TO_SCORE[:4], batch_size=2, progress=False, shard=(0, 2))
    with pytest.raises(ValueError, match="merge"):
        il.scoring.save_scores(part, tmp_path / "s", top_k=1)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="out of range"):
        il.score_instructions(tiny_model, dirs, TO_SCORE[:4], progress=False, shard=(2, 2))


# ---- merge errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def score_shards(tiny_model, dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("score_shards")

    def make(name, shard, texts=TO_SCORE[:8], **kw):
        t = il.score_instructions(tiny_model, dirs, texts, batch_size=2, progress=False, shard=shard, **kw)
        il.scoring.save_scores(t, root / name)
        return root / name

    return {"0/2": make("a0", (0, 2)), "1/2": make("a1", (1, 2)), "1/3": make("b1", (1, 3)),
            "1/2 raw": make("c1", (1, 2), standardize=False), "1/2 other": make("d1", (1, 2), texts=TO_SCORE[8:16])}


def test_merge_errors(score_shards, tmp_path):
    s = score_shards
    out = tmp_path / "m"
    cases = [
        ([s["0/2"]], "Missing shards 1/2"),
        ([s["0/2"], s["0/2"], s["1/2"]], "Duplicate shards"),
        ([s["0/2"], s["1/3"]], "different numbers of shards"),
        ([s["0/2"], s["1/2 raw"]], "disagree on 'standardize'"),
        ([s["0/2"], s["1/2 other"]], "disagree on 'instructions_sha256'"),
    ]
    for folders, match in cases:
        with pytest.raises(ValueError, match=match):
            il.merge_shards("score", folders, out=out)
        assert not out.exists()  # nothing half-written
    with pytest.raises(ValueError, match="is a 'score' shard"):
        il.merge_shards("generate", [s["0/2"], s["1/2"]], out=out)
    with pytest.raises(ValueError, match="score' shards only"):
        il.merge_shards("generate", [s["0/2"], s["1/2"]], out=out, top_k=2)
    with pytest.raises(ValueError, match="Unknown stage"):
        il.merge_shards("train", [s["0/2"]], out=out)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one of the shard folders"):
        il.merge_shards("score", [s["0/2"], s["1/2"]], out=s["1/2"], overwrite=True)
    with pytest.raises(ValueError, match="not a finished shard"):
        il.merge_shards("score", [s["0/2"], tmp_path], out=out)
    assert not out.exists()
    il.merge_shards("score", [s["0/2"], s["1/2"]], out=out)
    with pytest.raises(FileExistsError, match="already exists"):
        il.merge_shards("score", [s["0/2"], s["1/2"]], out=out)
    assert len(_jsonl(out / "scores.jsonl")) == 8 and len(_jsonl(out / "selected.jsonl")) == 1  # default 10%


def test_merge_refuses_tampered_indices(score_shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(score_shards["1/2"], bad)
    rows = _jsonl(bad / "scores.jsonl")
    rows[0]["index"] = _jsonl(score_shards["0/2"] / "scores.jsonl")[0]["index"]
    (bad / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="more than once"):
        il.merge_shards("score", [score_shards["0/2"], bad], out=tmp_path / "m")
    (bad / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(ValueError, match="holds 3 rows but shard.json says 4"):
        il.merge_shards("score", [score_shards["0/2"], bad], out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---- generate ------------------------------------------------------------------------------------------


def _gen(model, d, table=TABLE, **kw):
    opts = dict(gamma_pos=1.0, gamma_neg=-1.0, max_new_tokens=4, batch_size=2, do_sample=True, seed=7,
                progress=False)
    run = {k: v for k, v in {**opts, **kw}.items() if k in ("gamma_pos", "gamma_neg", "seed", "out", "progress", "shard")}
    cfg = il.PairsConfig(**{k: v for k, v in {**opts, **kw}.items() if k not in run})
    return il.generate_pairs(model, d, table, cfg, **run)


def test_generate_shards_merged_equal_unsharded(tiny_model, dirs, tmp_path):
    ref = _gen(tiny_model, dirs, out=tmp_path / "ref")
    parts = [_gen(tiny_model, dirs, out=tmp_path / f"g{i}", shard=(i, 3)) for i in range(3)]
    assert [list(p["batch"]) for p in parts] == [[0, 0, 3], [1, 1], [2, 2]]  # 7 rows in batches of 2
    for i, p in enumerate(parts):
        assert json.loads((tmp_path / f"g{i}" / "generation.json").read_text())["shard"] == f"{i}/3"
        assert json.loads((tmp_path / f"g{i}" / "shard.json").read_text())["rows"] == len(p)
    merged = il.merge_shards("generate", [tmp_path / f"g{i}" for i in (2, 0, 1)], out=tmp_path / "merged")
    assert merged.to_list() == ref.to_list()
    assert len({r["chosen"][0]["content"] for r in ref}) > 1  # sampled text, so the seeds matter
    for name in ("pairs.jsonl", "generation.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert report == il.evaluation.pair_report(ref) and "win_share" not in report
    # the merged folder is a finished unsharded run: rerunning it generates nothing
    again = _gen(tiny_model, dirs, out=tmp_path / "merged")
    assert again.to_list() == ref.to_list()


def test_generate_shard_resumes_after_interruption(tiny_model, dirs, tmp_path, monkeypatch):
    ref = _gen(tiny_model, dirs, shard=(0, 2))  # batches 0 and 2, no folder
    real, calls = pairs_mod.generate_steered, []

    def fail_second(model, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(model, prompts, **kw)

    monkeypatch.setattr(pairs_mod, "generate_steered", fail_second)
    out = tmp_path / "g0"
    with pytest.raises(RuntimeError):
        _gen(tiny_model, dirs, out=out, shard=(0, 2))
    assert [r["index"] for r in _jsonl(out / "pairs.jsonl")] == [0, 1] and not (out / "shard.json").exists()
    with pytest.raises(ValueError, match="not a finished shard"):
        il.merge_shards("generate", [out, out], out=tmp_path / "m")
    calls.clear()
    monkeypatch.setattr(pairs_mod, "generate_steered", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    done = _gen(tiny_model, dirs, out=out, shard=(0, 2))
    assert len(calls) == 1 and done.to_list() == ref.to_list()  # only batch 2 was left
    assert list(done["index"]) == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="other settings.*shard"):
        _gen(tiny_model, dirs, out=out, shard=(1, 2))  # a shard folder is not reused for another shard


# ---- synthesize ---------------------------------------------------------------------------------------------


def _synth(model, n, **kw):
    opts = dict(batch_size=4, max_new_tokens=16, progress=False, min_words=1)
    return il.synthesize_instructions(model, n, **{**opts, **kw})


def test_synthesize_shards_merged_equal_unsharded(talker, tmp_path):
    n = 22  # 6 batches of 4, the last cut to 2
    ref = _synth(talker, n, out=tmp_path / "ref")
    parts = [_synth(talker, n, out=tmp_path / f"s{i}", shard=(i, 2)) for i in range(2)]
    for i, p in enumerate(parts):
        folder = tmp_path / f"s{i}"
        assert sorted(x.name for x in folder.iterdir()) == ["raw.jsonl", "shard.json", "synthesis.json"]
        raw = _jsonl(folder / "raw.jsonl")
        assert sorted({r["batch"] for r in raw}) == list(range(i, 6, 2))
        assert synthesis_report(p)["generated"] == len([r for r in raw if r["index"] < n])  # the shard's preview
        with pytest.raises(FileNotFoundError, match="merge"):
            il.load_instructions(folder)
    merged = il.merge_shards("synthesize", [tmp_path / "s1", tmp_path / "s0"], out=tmp_path / "merged")
    assert synthesis_report(ref)["kept"] > 2 and sum(synthesis_report(ref)["dropped"].values()) > 2
    assert merged.to_list() == ref.to_list()
    m, r = tmp_path / "merged", tmp_path / "ref"
    assert sorted(x.name for x in m.iterdir()) == sorted(x.name for x in r.iterdir())
    for name in ("instructions.jsonl", "dropped.jsonl", "synthesis.json"):
        assert (m / name).read_bytes() == (r / name).read_bytes()
    no_time = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    assert no_time(_jsonl(m / "raw.jsonl")) == no_time(_jsonl(r / "raw.jsonl"))
    rep_m, rep_r = (json.loads((f / "report.json").read_text()) for f in (m, r))
    assert {k: v for k, v in rep_m.items() if k not in TIMING} == {k: v for k, v in rep_r.items() if k not in TIMING}
    assert il.load_instructions(m) == il.load_instructions(r)


def test_synthesize_merge_deduplicates_across_shards(talker, tmp_path):
    parts = [_synth(talker, 16, out=tmp_path / f"s{i}", shard=(i, 2)) for i in range(2)]
    first = parts[0][0]  # kept by shard 0
    raw1 = _jsonl(tmp_path / "s1" / "raw.jsonl")
    victim = next(r for r in raw1 if r["index"] in set(parts[1]["index"]) and r["index"] > first["index"])
    victim["raw"] = " " + first["raw"].upper()  # the same text after normalisation
    (tmp_path / "s1" / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw1))
    merged = il.merge_shards("synthesize", [tmp_path / "s0", tmp_path / "s1"], out=tmp_path / "m")
    assert victim["index"] not in set(merged["index"]) and first["index"] in set(merged["index"])
    dropped = {r["index"]: r for r in _jsonl(tmp_path / "m" / "dropped.jsonl")}
    assert dropped[victim["index"]]["drop_reason"] == "duplicate"
    assert dropped[victim["index"]]["duplicate_of"] == first["index"]
    assert synthesis_report(merged)["dropped"]["duplicate"] == 1


def test_synthesize_shard_resumes_and_extends(talker, tmp_path):
    full = _synth(talker, 16, out=tmp_path / "ref")
    out = tmp_path / "s1"
    _synth(talker, 8, out=out, shard=(1, 2))  # batch 1
    assert json.loads((out / "shard.json").read_text())["total"] == 8
    _synth(talker, 16, out=out, shard=(1, 2))  # continues with batch 3
    assert [r["batch"] for r in _jsonl(out / "raw.jsonl")] == [1] * 4 + [3] * 4
    _synth(talker, 16, out=tmp_path / "s0", shard=(0, 2))
    merged = il.merge_shards("synthesize", [tmp_path / "s0", out], out=tmp_path / "m")
    assert merged.to_list() == full.to_list()


# ---- CLI ---------------------------------------------------------------------------------------------------


def _score_cli(model_dir, dirs_dir, instructions, out, *extra):
    return main(["score", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--directions", str(dirs_dir),
                 "--instructions", str(instructions), "--out", str(out), "--batch-size", "3", *extra])


def test_cli_score_shards_and_merge_equal_unsharded(tiny_model_dir, dirs_dir, tmp_path, capsys, monkeypatch):
    instr = tmp_path / "to_score.txt"
    instr.write_text("\n".join(TO_SCORE[:20]) + "\n")
    assert _score_cli(tiny_model_dir, dirs_dir, instr, tmp_path / "shard_{shard}", "--shard", "0/2") == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _score_cli(tiny_model_dir, dirs_dir, instr, tmp_path / "shard_{shard}", "--shard", "auto") == 0
    for i in (0, 1):
        assert json.loads((tmp_path / f"shard_{i}" / "shard.json").read_text())["shard"] == f"{i}/2"
    capsys.readouterr()
    assert main(["merge", "score", "--out", str(tmp_path / "merged"), "--top-k", "4",
                 str(tmp_path / "shard_0"), str(tmp_path / "shard_1")]) == 0
    stdout = capsys.readouterr().out
    assert "merged 2 score shards: 20 rows" in stdout and str(tmp_path / "merged" / "selected.jsonl") in stdout
    assert _score_cli(tiny_model_dir, dirs_dir, instr, tmp_path / "ref", "--top-k", "4") == 0
    assert _files(tmp_path / "merged") == _files(tmp_path / "ref")
    assert len(_jsonl(tmp_path / "merged" / "selected.jsonl")) == 4


def test_cli_shard_errors_return_2(tiny_model_dir, dirs_dir, tmp_path, capsys):
    instr = tmp_path / "to_score.txt"
    instr.write_text("\n".join(TO_SCORE[:4]) + "\n")
    cases = [
        (["--shard", "2/2"], "out of range"),
        (["--shard", "1of2"], "use 'i/n'"),
        (["--shard", "0/2", "--top-k", "2"], "merge score"),
    ]
    for extra, match in cases:
        assert _score_cli(tiny_model_dir, dirs_dir, instr, tmp_path / "s", *extra) == 2
        assert match in capsys.readouterr().err
    assert _score_cli(tiny_model_dir, dirs_dir, instr, tmp_path / "s_{shard}") == 2
    assert "no --shard" in capsys.readouterr().err
    assert _score_cli(tiny_model_dir, dirs_dir, instr, tmp_path / "s0", "--shard", "0/2") == 0
    assert main(["merge", "score", "--out", str(tmp_path / "m"), str(tmp_path / "s0")]) == 2
    assert "Missing shards 1/2" in capsys.readouterr().err
    assert main(["merge", "synthesize", "--out", str(tmp_path / "m"), "--top-k", "3", str(tmp_path / "s0")]) == 2
    assert "'score' shards only" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_cli_generate_and_synthesize_shards(tiny_model_dir, dirs_dir, tmp_path, capsys):
    table = tmp_path / "table.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in TABLE[:5]))

    def gen(out, *extra):
        return main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--directions",
                     str(dirs_dir), "--instructions", str(table), "--out", str(out), "--max-new-tokens", "3",
                     "--batch-size", "2", "--gamma-pos", "1.0", "--gamma-neg", "-1.0", *extra])

    for i in (0, 1):
        assert gen(tmp_path / "g_{shard}", "--shard", f"{i}/2") == 0
        assert sorted(p.name for p in (tmp_path / f"g_{i}").iterdir()) == ["generation.json", "pairs.jsonl",
                                                                          "shard.json"]
    assert main(["merge", "generate", "--out", str(tmp_path / "gm"), str(tmp_path / "g_0"), str(tmp_path / "g_1")]) == 0
    assert gen(tmp_path / "gref") == 0
    for name in ("pairs.jsonl", "generation.json"):
        assert (tmp_path / "gm" / name).read_bytes() == (tmp_path / "gref" / name).read_bytes()

    def synth(out, *extra):
        return main(["synthesize", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--n", "8",
                     "--out", str(out), "--max-new-tokens", "6", "--min-words", "1", "--batch-size", "2", *extra])

    for i in (0, 1):
        assert synth(tmp_path / "s_{shard}", "--shard", f"{i}/2") == 0
    assert main(["merge", "synthesize", "--out", str(tmp_path / "sm"), str(tmp_path / "s_0"),
                 str(tmp_path / "s_1")]) == 0
    assert synth(tmp_path / "sref") == 0
    for name in ("instructions.jsonl", "dropped.jsonl", "synthesis.json"):
        assert (tmp_path / "sm" / name).read_bytes() == (tmp_path / "sref" / name).read_bytes()
