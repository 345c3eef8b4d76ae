"""`icon2_lens.compare` on the tiny model: the layout other tools read, costs, reuse on rerun, re-run on change."""

from __future__ import annotations

import json

import pytest

import icon2_lens as il
from icon2_lens.cli import main
from icon2_lens.pipeline.compare import CompareConfig, judge_statistics

from conftest import INSTRUCTIONS

ICON2 = {"extract": {"n_instructions": 6, "batch_size": 16},
         "layers": {"n_heldout": 4, "n_paraphrase_instructions": 1, "batch_size": 16},
         "score": {"allow_invalid": True}}  # a random tiny model has no valid criterion
TRAIN = il.TrainConfig(max_steps=1, finished_only=False)  # 4-token answers never finish


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "instructions.txt"
    path.write_text("\n".join(INSTRUCTIONS) + "\n")
    return path


def _cfg(pool, **over) -> CompareConfig:
    base = {"methods": ["icon2", "system_prompts"], "n": 3, "pool": str(pool), "max_new_tokens": 4,
            "batch_size": 2, "n_preference": 2, "n_boot": 50}
    return CompareConfig(**{**base, **over})


def test_compare_writes_the_layout_reuses_and_reruns_on_change(talker_dir, pool, tmp_path):
    out = tmp_path / "cmp"
    res = il.compare(_cfg(pool), out=out, model=talker_dir, train_config=TRAIN, icon2=ICON2, progress=False, log=None)
    for method in ("icon2", "system_prompts"):
        rows = [json.loads(x) for x in (out / method / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        costs = json.loads((out / method / "costs.json").read_text())
        assert costs["phases"]["generation"]["generated_tokens"] > 0
        assert (out / method / "model" / "config.json").is_file()
        il.load_model(out / method / "model")  # an HF folder load_model opens
    assert json.loads((out / "icon2" / "costs.json").read_text())["phases"]["labelling"]["forward_passes"] > 0
    assert (out / "controls" / "swapped" / "model" / "config.json").is_file()
    summary = json.loads((out / "compare.json").read_text())
    assert summary == res.summary
    icon2 = summary["methods"]["icon2"]
    assert icon2["kept_pairs"] == 3 and icon2["costs"]["ratio_to_icon2"]["generated_tokens_per_pair"] == 1.0
    sp = summary["methods"]["system_prompts"]["costs"]
    assert sp["generated_tokens_per_pair"] == pytest.approx(sp["total"]["generated_tokens"] / 3)
    assert set(summary["models"]) == {"icon2", "system_prompts", "swapped"}
    cell = summary["models"]["system_prompts"]["quality"]["all"]
    assert cell["n"] == 6 and cell["margin_shift_ci_low"] <= cell["margin_shift_mean"] <= cell["margin_shift_ci_high"]
    assert summary["models"]["system_prompts"]["vs_icon2"]["all"]["direction"] == "too few pairs"  # n=6 < 8
    text = res.report.read_text()
    assert "Cost per kept pair" in text and "| system_prompts |" in text and "App. I" in text
    assert (out / "reward_accuracy.png").is_file() and (out / "quality.png").is_file()

    again = il.compare(_cfg(pool), out=out, model=talker_dir, train_config=TRAIN, icon2=ICON2, progress=False,
                       log=None)
    assert again.ran == [] and again.summary["models"] == summary["models"]

    changed = il.compare(_cfg(pool, max_new_tokens=5), out=out, model=talker_dir, train_config=TRAIN, icon2=ICON2,
                         progress=False, log=None)
    assert "pairs:system_prompts" in changed.ran and "train:system_prompts" in changed.ran
    assert "train:icon2" in changed.ran  # Icon2's pairs changed too (its generate budget is the shared one)
    rows = [json.loads(x) for x in (out / "system_prompts" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # started over, nothing appended to the old rows


def test_compare_config_is_checked(pool):
    with pytest.raises(ValueError, match="Unknown method"):
        CompareConfig(methods=["icon2", "banana"])
    with pytest.raises(ValueError, match="n_pool"):
        CompareConfig(n=64, n_pool=32)
    with pytest.raises(ValueError, match="n must be positive"):
        CompareConfig(n=0)


def test_judge_statistics_sum_over_rows():
    rows = [{"judge": {"comparisons": 4, "parsed": 3, "first_position": 3}},
            {"judge": {"comparisons": 4, "parsed": 4, "first_position": 1}}, {"judge": None}]
    s = judge_statistics(rows)
    assert s["comparisons"] == 8 and s["parse_rate"] == 7 / 8 and s["first_position_share"] == 4 / 7
    assert judge_statistics([{"kept": True}]) is None


def test_baseline_cli_makes_pairs_and_refuses_bad_input(talker_dir, tmp_path, capsys):
    listing = tmp_path / "q.txt"
    listing.write_text("\n".join(INSTRUCTIONS[:3]) + "\n")
    out = tmp_path / "sp"
    code = main(["baseline", "system_prompts", "--model", str(talker_dir), "--instructions", str(listing), "--out",
                 str(out), "--max-new-tokens", "4", "--criterion", "helpful", "--no-progress"])
    assert code == 0
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["criterion"] for r in rows] == ["helpful"] * 3
    assert rows[0]["system_chosen"] == "You are a helpful assistant."
    assert json.loads((out / "costs.json").read_text())["rows"] == 3
    ds = il.make_pairs("system_prompts", il.load_model(talker_dir), str(listing), max_new_tokens=4, criterion="helpful",
                       progress=False)
    assert [r["content"] for r in ds["chosen"][0]] == [rows[0]["chosen"][0]["content"]]  # CLI == library
    code = main(["baseline", "system_prompts", "--model", str(talker_dir), "--instructions", str(listing), "--out",
                 str(tmp_path / "bad"), "--criterion", "banana", "--no-progress"])
    assert code == 2 and "Unknown criterion 'banana'" in capsys.readouterr().err


def test_a_run_with_methods_compares_them_on_its_own_pairs(talker_dir, pool, tmp_path):
    cfg = {"model": str(talker_dir), **ICON2, "synthesize": {"source": str(pool)},
           "score": {"top_k": 3, "allow_invalid": True}, "generate": {"max_new_tokens": 4, "batch_size": 2},
           "train": {"max_steps": 1, "finished_only": False}, "controls": {"kinds": []},
           "evaluate": {"n": 0, "n_preference": 2, "n_boot": 50},
           "compare": {"methods": ["icon2", "system_prompts"], "controls": [], "n_preference": 2, "n_boot": 50}}
    res = il.run_pipeline(cfg, out=tmp_path / "run", progress=False, log=None)
    assert res.ran[-2:] == ["compare", "distill"]  # distill: off, it does nothing
    folder = tmp_path / "run" / "compare"
    summary = json.loads((folder / "compare.json").read_text())
    assert set(summary["methods"]) == {"icon2", "system_prompts"}
    icon2_rows = (folder / "icon2" / "pairs.jsonl").read_text()
    assert icon2_rows == (tmp_path / "run" / "generate" / "pairs.jsonl").read_text()  # the run's own pairs
    sp = [json.loads(x) for x in (folder / "system_prompts" / "pairs.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in sp] == [json.loads(x)["instruction"] for x in icon2_rows.splitlines()]
    assert summary["config"]["max_new_tokens"] == 4  # the run's generate budget, not the compare default


@pytest.mark.parametrize("method,extra", [
    ("sampling_ranking", ["--k", "2"]),
    ("self_rewarding", ["--k", "2"]),
    ("self_refine", ["--n-samples", "2", "--feedback-tokens", "4"]),
    ("sao", ["--judge-format", "forced", "--persona-tokens", "4"]),
])
def test_every_baseline_runs_from_the_cli(method, extra, talker_dir, tmp_path):
    listing = tmp_path / "q.txt"
    listing.write_text("\n".join(INSTRUCTIONS[:2]) + "\n")
    out = tmp_path / method
    argv = ["baseline", method, "--model", str(talker_dir), "--instructions", str(listing), "--out", str(out),
            "--max-new-tokens", "4", "--no-progress", *extra]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["method"] for r in rows} == {method}
    assert json.loads((out / "generation.json").read_text())["method"] == method
    assert "generation" in json.loads((out / "costs.json").read_text())["phases"]
    assert main(argv) == 0  # a rerun continues the finished run: nothing added
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 2
