"""The run directory on the tiny model: skip, invalidate exactly downstream, resume, validate configs."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

import icon2_lens.pairs
from icon2_lens.cli import main
from icon2_lens.pipeline.run import STAGES, RunConfig, load_config, run_pipeline, stage_keys

from conftest import INSTRUCTIONS

EXTRA = ["Name three rivers in Africa.", "Why is the sky blue?"]
#: Stages that do nothing unless asked (compare: no methods listed; distill: not enabled); they take no time.
OFF_BY_DEFAULT = ("compare", "distill")


def _config(model_dir, instructions_file, **over) -> dict:
    cfg = {
        "model": str(model_dir),
        "extract": {"n_instructions": 6, "batch_size": 16},
        "layers": {"n_heldout": 4, "n_paraphrase_instructions": 1, "batch_size": 16},
        "synthesize": {"source": str(instructions_file)},
        "score": {"top_k": 4, "allow_invalid": True},  # a random tiny model has no valid criterion
        "generate": {"max_new_tokens": 6, "batch_size": 2},
        "train": {"max_steps": 1, "finished_only": False},  # 6-token answers never finish
        "controls": {"kinds": ["swapped"]},
        "evaluate": {"n": 2, "max_new_tokens": 6, "batch_size": 2, "n_preference": 2, "n_boot": 50},
    }
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


@pytest.fixture(scope="module")
def instructions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "instructions.txt"
    path.write_text("\n".join(INSTRUCTIONS + EXTRA) + "\n")
    return path


@pytest.fixture(scope="module")
def finished_run(talker_dir, instructions_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    res = run_pipeline(_config(talker_dir, instructions_file), out=out, progress=False, log=None)
    return out, res


def test_full_run_writes_every_stage_with_costs_and_a_report(finished_run):
    out, res = finished_run
    assert res.ran == list(STAGES) and res.skipped == []
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert [s for s, e in manifest.items() if e["status"] == "finished"] == list(STAGES)
    for stage in STAGES:
        costs = json.loads((out / stage / "costs.json").read_text())
        assert costs["stage"] == stage
        assert costs["wall_seconds"] > (0 if stage not in ("synthesize", *OFF_BY_DEFAULT) else -1)
    by = {c.stage: c for c in res.costs}
    assert by["generate"].generated_tokens > 0 and by["generate"].rows == 4  # top_k 4 -> 4 pairs
    assert by["extract"].forward_passes > 0 and by["train"].forward_passes == 2  # 1 step: policy + reference
    assert by["synthesize"].forward_passes == 0  # brought its own instructions: no model work
    pairs = [json.loads(x) for x in (out / "generate" / "pairs.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in pairs) == [0, 1, 2, 3]
    report = res.report.read_text()
    assert "| **total** |" in report and "per kept pair (4)" in report
    assert "Judge-free preference margins" in report and "Self-probe shift" in report
    assert "| win | tie | loss |" in report and "swapped" in report
    assert set(res.metrics["self_probe"]) == {"general", "helpful", "honest", "harmless"}
    pref = res.metrics["preference"]
    assert set(pref["models"]) == {"base", "trained", "swapped"} and pref["set"]["n"] == 6  # 2 per criterion
    assert set(pref["contrasts"]["controls"]) == {"swapped"}
    assert (out / "controls" / "swapped" / "model" / "config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["generate"]["max_new_tokens"] == 6


def test_rerun_skips_finished_stages(finished_run, talker_dir, instructions_file, tmp_path):
    src, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = (out / "generate" / "pairs.jsonl").stat().st_mtime_ns
    res = run_pipeline(None, out=out, progress=False, log=None)  # no config: the run directory's own
    assert res.ran == [] and res.skipped == list(STAGES)
    assert (out / "generate" / "pairs.jsonl").stat().st_mtime_ns == before
    same = run_pipeline(_config(talker_dir, instructions_file), out=out, progress=False, log=None)
    assert same.ran == []


def test_changed_setting_reruns_exactly_the_downstream_stages(finished_run, talker_dir, instructions_file, tmp_path):
    src, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    changed = _config(talker_dir, instructions_file, generate={"gamma_pos": 0.2})
    with pytest.raises(ValueError, match=r"different config \(generate\.gamma_pos: 1\.0 -> 0\.2\)"):
        run_pipeline(changed, out=out, progress=False, log=None)
    assert yaml.safe_load((out / "config.yaml").read_text())["generate"]["gamma_pos"] == 1.0  # untouched
    res = run_pipeline(changed, out=out, update=True, progress=False, log=None)
    assert res.ran == ["generate", "train", "controls", "evaluate", "compare"]
    assert res.skipped == ["extract", "layers", "synthesize", "score", "distill"]
    pairs = [json.loads(x) for x in (out / "generate" / "pairs.jsonl").read_text().splitlines()]
    assert {p["gamma_pos"] for p in pairs} == {0.2}


def test_a_deleted_stage_folder_reruns_it_and_its_downstream(finished_run, tmp_path):
    src, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    shutil.rmtree(out / "score")
    res = run_pipeline(None, out=out, progress=False, log=None)
    assert res.ran == ["score", "generate", "train", "controls", "evaluate", "compare"]
    assert res.skipped == ["extract", "layers", "synthesize", "distill"]


def test_a_stage_killed_after_writing_its_outputs_resumes(finished_run, tmp_path):
    """Killed between writing its outputs and marking itself finished: the rerun redoes it over them."""
    src, _ = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"]["extract"]["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    messages = []
    res = run_pipeline(None, out=out, progress=False, log=messages.append)
    assert any("extract: resuming" in m for m in messages)
    assert res.ran == ["extract", "layers", "score", "generate", "train", "controls", "evaluate", "compare"]
    assert res.skipped == ["synthesize", "distill"]


def test_stage_keys_follow_the_dependencies():
    base = stage_keys(RunConfig())
    for section, value, expected in [
        ("extract", {"n_instructions": 32}, {"extract", "layers", "score", "generate", "train", "controls",
                                             "evaluate", "compare"}),
        ("synthesize", {"n": 8}, {"synthesize", "score", "generate", "train", "controls", "evaluate", "compare"}),
        ("evaluate", {"n": 4}, {"evaluate"}),
        ("distill", {"n_problems": 8}, {"distill"}),
    ]:
        keys = stage_keys(RunConfig.model_validate({section: value}))
        assert {s for s in STAGES if keys[s] != base[s]} == expected, section
    moved = stage_keys(RunConfig.model_validate({"seed": 1}))
    assert all(moved[s] != base[s] for s in STAGES)  # the seed feeds every stage
    assert stage_keys(RunConfig.model_validate({"device": "cpu"})) == base  # where it runs is not a setting


def test_interrupted_generation_resumes_without_losing_or_duplicating_rows(talker_dir, instructions_file, tmp_path,
                                                                          monkeypatch):
    cfg = _config(talker_dir, instructions_file, score={"top_k": 6}, generate={"batch_size": 1})
    reference = run_pipeline(cfg, out=tmp_path / "ref", stop_after="generate", progress=False, log=None)
    assert reference.ran[-1] == "generate"
    real_append = icon2_lens.runs.batches.append_jsonl
    calls = []

    def failing_append(path, rows):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after two batches were written
        real_append(path, rows)

    monkeypatch.setattr(icon2_lens.runs.batches, "append_jsonl", failing_append)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, out=out, stop_after="generate", progress=False, log=None)
    monkeypatch.setattr(icon2_lens.runs.batches, "append_jsonl", real_append)
    pairs_path = out / "generate" / "pairs.jsonl"
    assert len(pairs_path.read_text().splitlines()) == 2
    assert json.loads((out / "manifest.json").read_text())["stages"]["generate"]["status"] == "interrupted"
    with pairs_path.open("a") as f:
        f.write('{"prompt": [{"role"')  # a torn line, as SIGKILL in the middle of a write leaves
    messages = []
    res = run_pipeline(cfg, out=out, stop_after="generate", progress=False, log=messages.append)
    assert res.ran == ["generate"] and any("generate: resuming" in m for m in messages)
    rows = [json.loads(x) for x in pairs_path.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))  # none lost, none duplicated
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "generate" / "pairs.jsonl").read_text().splitlines()]
    assert rows == ref_rows  # the same rows as the uninterrupted run


@pytest.mark.parametrize("cfg, message", [
    ({"extract": {"n_instrucions": 8}}, "unknown key 'extract.n_instrucions'"),
    ({"modle": "x"}, "unknown key 'modle'"),
    ({"synthesize": {"n": "many"}}, "synthesize.n: Input should be a valid integer"),
    ({"generate": {"scale": "huge"}}, "generate.scale: Input should be 'relative', 'unit' or 'contrast'"),
    ({"train": {"lora": "yes"}}, "train.lora: Input should be a valid boolean"),
    ({"score": {"top_k": 4, "threshold": 0.5}}, "set only one of top_fraction, top_k, threshold"),
    ({"extract": 5}, "extract: Input should be a valid dictionary"),
    ([1, 2], "expected a mapping"),
])
def test_bad_configs_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(cfg)


def test_another_selection_rule_replaces_the_default_top_k():
    cfg = load_config({"score": {"top_fraction": 0.1}})
    assert (cfg.score.top_fraction, cfg.score.top_k) == (0.1, None)
    assert load_config({"score": {"threshold": 0.5}}).score.top_k is None
    assert load_config({}).score.top_k == 24


def test_config_files_and_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  gama_pos: 0.1\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "unknown key 'generate.gama_pos'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a bad config
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert main(["run", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert load_config(printed) == RunConfig() and printed["synthesize"]["n"] == 64


def test_run_directory_checks(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no run"):
        run_pipeline(None, out=other, log=None)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not a stage"):
        run_pipeline(None, out=tmp_path / "x", stop_after="pairs", log=None)
