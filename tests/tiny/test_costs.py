"""Cost accounting: token and pass counts match what the stage did; hooks never outlive the block."""

from __future__ import annotations

import json
import math

import pytest
import torch

import icon2_lens as il
from icon2_lens.runs.costs import StageCost, cost_table, load_costs, measure_costs
from icon2_lens.pairs import generate_steered

from conftest import PROMPTS


def _hook_counts(model) -> tuple[int, int]:
    return len(model.bridge._forward_pre_hooks), len(il.gen.hf_model(model)._forward_pre_hooks)


def test_generation_counts_equal_the_generated_lengths(talker):
    tok = talker.tokenizer
    prompts = [il.render_chat(tok, p) for p in PROMPTS]
    before = _hook_counts(talker)
    with measure_costs("gen", talker) as meter:
        rows = generate_steered(talker, prompts, max_new_tokens=24, do_sample=True, seed=3)
    c = meter.costs
    lengths = [r["n_tokens"] for r in rows]
    assert any(r["finished"] for r in rows) and min(lengths) < max(lengths)  # rows stop at different steps
    assert c.generated_tokens == sum(lengths)  # end token included, no padding after it
    assert c.forward_passes == max(lengths)  # prefill + one cached step per further token
    assert c.prompt_tokens == sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)  # no padding
    assert c.wall_seconds > 0 and c.peak_rss_mib > 0 and c.device == "cpu"
    assert _hook_counts(talker) == before  # hooks removed


def test_extraction_forwards_count_batches_and_real_tokens(tiny_model):
    texts = [il.render_chat(tiny_model.tokenizer, p) for p in PROMPTS]
    with measure_costs("read", tiny_model) as meter:
        il.read_last_token(tiny_model, texts, batch_size=2, progress=False)
    assert meter.costs.forward_passes == math.ceil(len(texts) / 2)
    assert meter.costs.prompt_tokens == sum(len(tiny_model.tokenizer(t, add_special_tokens=False)["input_ids"])
                                            for t in texts)
    assert meter.costs.generated_tokens == 0


def test_hooks_removed_on_error_and_nothing_saved(tiny_model, tmp_path):
    before = _hook_counts(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with measure_costs("x", tiny_model, out=tmp_path) as meter:
            assert _hook_counts(tiny_model) == (before[0] + 1, before[1] + 1)
            meter.costs.rows = 3
            raise RuntimeError("boom")
    assert _hook_counts(tiny_model) == before
    assert not (tmp_path / "costs.json").exists()  # a failed stage writes no cost file


def test_plain_module_is_watched_and_costs_round_trip(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with measure_costs("plain", hf, out=tmp_path) as meter:
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
            hf(ids)
        meter.costs.rows = 2
    assert (meter.costs.forward_passes, meter.costs.prompt_tokens) == (2, 6 + 8)
    assert len(hf._forward_pre_hooks) == 0
    loaded = load_costs(tmp_path)
    assert loaded == meter.costs and json.loads((tmp_path / "costs.json").read_text())["stage"] == "plain"


def test_cost_table_totals_and_per_row():
    rows = [StageCost("a", prompt_tokens=100, generated_tokens=10, forward_passes=4, wall_seconds=2.0, rows=5),
            StageCost("b", prompt_tokens=300, generated_tokens=30, forward_passes=6, wall_seconds=6.0, rows=4)]
    text = cost_table(rows, per=("kept pair", 4))
    assert "| **total** | 400 | 40 | 10 | 8.0 |" in text
    assert "| per kept pair (4) | 100 | 10 | 2.5 | 2.00 |" in text
    assert "per" not in cost_table(rows)


def test_load_costs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="written when a stage finishes"):
        load_costs(tmp_path)


def test_training_passes_are_counted(tiny_model_dir, tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": f"Q{i}?"}],
              "chosen": [{"role": "assistant", "content": "A good answer."}],
              "rejected": [{"role": "assistant", "content": "no"}]} for i in range(4)]
    with measure_costs("train") as meter:
        res = il.train_dpo(pairs, model_source=tiny_model_dir, output_dir=tmp_path / "m", device="cpu",
                           progress=False, costs=meter)
    # policy and reference each run one forward per step (chosen and rejected concatenated)
    assert meter.costs.forward_passes == 2 * res.steps
    assert meter.costs.prompt_tokens > 0 and meter.costs.generated_tokens == 0
