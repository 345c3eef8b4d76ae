"""Sampling-Ranking and Self-Rewarding on the embedded SmolLM2-135M-Instruct (3 instructions, 32 tokens, k = 3).

The judge statistics are printed (``pytest -s``) and recorded as test properties (``--junitxml``): how often the
additive judge's replies parse, and how often the CAI judge picks the response shown first.
"""

from __future__ import annotations

import json

import pytest

from icon2_lens.baselines import sampling_ranking as sr
from icon2_lens.baselines import self_rewarding as sw

pytestmark = pytest.mark.integration

QS = ["What is the capital of France?", "Give me three tips for sleeping better.",
      "Explain in two sentences why the sky is blue."]


def _budget() -> dict[str, int]:
    return {"k": 3, "max_new_tokens": 32, "batch_size": 3}


def test_sampling_ranking_with_the_default_reward_probe(smol, tmp_path):
    rows = sr.make_pairs(smol, QS, sr.SamplingRankingConfig(**_budget()), seed=0, out=tmp_path / "sr", progress=False)
    assert len(rows) == 3 and all(r["scorer"] == "reward_probe" for r in rows)
    kept = [r for r in rows if r["kept"]]
    assert kept, [r["drop_reason"] for r in rows]
    for r in kept:
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
        assert r["scores"][r["chosen_rank_index"]] > r["scores"][r["rejected_rank_index"]]
    costs = json.loads((tmp_path / "sr" / "costs.json").read_text())
    assert costs["phases"]["generation"]["generated_tokens"] > 0 and costs["phases"]["labelling"]["prompt_tokens"] > 0


def test_self_rewarding_cai_logprob_judge(smol, record_property):
    rows = sw.make_pairs(smol, QS, sw.SelfRewardingConfig(**_budget()), seed=0, progress=False)
    assert len(rows) == 3 and any(r["kept"] for r in rows)
    asked = sum(r["judge"]["comparisons"] for r in rows)
    assert asked == sum(r["judge"]["parsed"] for r in rows) > 0  # a log-prob verdict always exists
    first = sum(r["judge"]["first_position"] for r in rows) / asked
    record_property("cai_first_position_share", first)
    print(f"\nself_rewarding cai_logprob: {asked} comparisons, first-position share {first:.2f}, "
          f"kept {sum(r['kept'] for r in rows)}/3")
    for r in rows:
        if r["kept"]:
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]


def test_self_rewarding_additive_judge_reports_its_parse_rate(smol, record_property):
    # one judgement per candidate (not 3) at the full 128-token budget: 9 judge prompts of ~420 tokens, ~40 s on CPU
    cfg = sw.SelfRewardingConfig(**_budget(), judge="additive", judge_samples=1, judge_batch_size=9)
    rows = sw.make_pairs(smol, QS, cfg, seed=0, progress=False)
    assert len(rows) == 3
    asked = sum(r["judge"]["comparisons"] for r in rows)
    parsed = sum(r["judge"]["parsed"] for r in rows)
    assert asked > 0 and all(r["judge"]["first_position"] is None for r in rows)
    record_property("additive_parse_rate", parsed / asked)
    print(f"\nself_rewarding additive: parsed {parsed}/{asked} judgements ({parsed / asked:.0%}), "
          f"kept {sum(r['kept'] for r in rows)}/3, drops {[r['drop_reason'] for r in rows if not r['kept']]}")
    for r in rows:
        assert r["kept"] or r["drop_reason"] in ("tie", "unparsed")
