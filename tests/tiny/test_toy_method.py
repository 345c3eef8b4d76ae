"""docs/extending.md's promise: a new pair-making method is one module plus one registration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from icon2_lens.pipeline import run_pipeline
from icon2_lens.pipeline.stages import STAGES

sys.path.insert(0, str(Path(__file__).parent))
import toy_method  # noqa: E402

from conftest import INSTRUCTIONS  # noqa: E402


def test_toy_method_is_seeded_resumable_and_shardable(tiny_model, tmp_path):
    cfg = toy_method.ToyConfig(max_new_tokens=4)
    ref = toy_method.make_pairs(tiny_model, INSTRUCTIONS[:5], cfg, seed=3, out=tmp_path / "ref")
    assert [r["index"] for r in ref] == list(range(5)) and all(r["method"] == "toy" for r in ref)
    assert ref[0]["chosen"] != ref[0]["rejected"]
    again = toy_method.make_pairs(tiny_model, INSTRUCTIONS[:5], cfg, seed=3, out=tmp_path / "ref")  # resumed: done
    assert again == ref
    parts = [toy_method.make_pairs(tiny_model, INSTRUCTIONS[:5], cfg, seed=3, out=tmp_path / f"s{i}", shard=(i, 2))
             for i in range(2)]
    assert sorted((r for p in parts for r in p), key=lambda r: r["index"]) == ref
    lines = (tmp_path / "ref" / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(5))  # nothing duplicated by the rerun


def test_toy_method_runs_in_the_pipeline_from_one_registry_entry(talker_dir, tmp_path):
    listing = tmp_path / "instructions.txt"
    listing.write_text("\n".join(INSTRUCTIONS) + "\n")
    order = list(STAGES)
    stages = {name: STAGES[name] for name in order[:order.index("score") + 1]}
    stages["toy"] = toy_method.SPEC  # the registration
    cfg = {"model": str(talker_dir), "extract": {"n_instructions": 6, "batch_size": 16},
           "layers": {"n_heldout": 4, "n_paraphrase_instructions": 1, "batch_size": 16},
           "synthesize": {"source": str(listing)}, "toy": {"max_new_tokens": 4},
           "score": {"top_k": 3, "allow_invalid": True}}  # a random tiny model has no valid criterion
    res = run_pipeline(cfg, out=tmp_path / "run", stages=stages, progress=False, log=None)
    assert res.ran == [*order[:order.index("score") + 1], "toy"]
    pairs = [json.loads(x) for x in (tmp_path / "run" / "toy" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and json.loads((tmp_path / "run" / "toy" / "costs.json").read_text())["rows"] == 3
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "toy:" in saved and "temperature: 2.0" in saved  # the section's defaults come from ToyConfig
    again = run_pipeline(None, out=tmp_path / "run", stages=stages, progress=False, log=None)
    assert again.ran == [] and "toy" in again.skipped
    with pytest.raises(ValueError, match="unknown key 'toy.temp'"):
        run_pipeline({**cfg, "toy": {"temp": 1.0}}, out=tmp_path / "other", stages=stages, progress=False, log=None)
