"""Preference pairs: TRL's conversational format, one batch per instruction pair, resume, DPO, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

import icon2_lens as il
from icon2_lens import pairs as pairs_mod
from icon2_lens.directions import DirectionSet
from icon2_lens.evaluation import pair_report
from icon2_lens.pairs import _table_rows, generate_pairs, generate_steered
from icon2_lens.prompts import render_chat

from conftest import INSTRUCTIONS

REAL_GENERATE = pairs_mod.generate_steered
LAYERS = [1, 2]
GP, GN = 1.0, -1.0  # strong enough to make chosen and rejected differ on the tiny random model

TABLE = [
    {"instruction": "Name three rivers in Africa.", "criterion": "helpful", "consistency": 1.5},
    {"instruction": "Write a limerick about a cat.", "criterion": "honest", "consistency": 0.25},
    {"instruction": "How many legs does a spider have?", "criterion": "helpful", "consistency": -0.5},
    {"instruction": "Suggest a name for a bakery.", "criterion": "honest", "consistency": 2.0},
    {"instruction": "Hi", "criterion": "helpful", "consistency": 0.0},
    {"instruction": "Explain recursion to a child, with one short example.", "criterion": "honest",
     "consistency": 0.75},
]
OTHER_TABLE = [{"instruction": f"Tell me fact number {i} about owls.", "criterion": "helpful"} for i in range(6)]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    return d.with_meta(suggested_layers=LAYERS)


RUN_KEYS = ("gamma_pos", "gamma_neg", "layers", "seed", "out", "progress", "shard")


def _split(opts):
    """generate_pairs keywords (run options and gamma/layer overrides) and PairsConfig fields."""
    cfg = {("engine" if k == "path" else k): v for k, v in opts.items() if k not in RUN_KEYS}
    return {k: v for k, v in opts.items() if k in RUN_KEYS}, il.PairsConfig(**cfg)


def _gen(model, d, table, **kw):
    # relative scale: these tests are about batching and resuming, and a push of one residual norm per layer makes
    # the tiny random model's pairs differ (the demo's default, contrast, is tested in test_steering_contrast)
    opts = dict(gamma_pos=GP, gamma_neg=GN, scale="relative", max_new_tokens=4, batch_size=2, progress=False)
    opts.update(kw)
    run, cfg = _split(opts)
    return generate_pairs(model, d, table, cfg, **run)


@pytest.fixture(scope="module")
def ref(tiny_model, dirs):
    """An uninterrupted run over TABLE (3 batches of 2)."""
    return _gen(tiny_model, dirs, TABLE)


def _record(monkeypatch, *, fail_on: int | None = None):
    calls: list[dict] = []

    def wrapper(model, prompts, **kw):
        calls.append({"prompts": list(prompts), **kw})
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("interrupted")
        out = REAL_GENERATE(model, prompts, **kw)
        calls[-1]["out"] = out
        return out

    monkeypatch.setattr(pairs_mod, "generate_steered", wrapper)
    return calls


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _pair_texts(rows):
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]


# ---- format and batching ---------------------------------------------------------------------------


def test_trl_conversational_format_and_provenance(ref, dirs):
    assert len(ref) == len(TABLE)
    for i, (r, t) in enumerate(zip(ref, TABLE)):
        assert r["prompt"] == [{"role": "user", "content": t["instruction"]}]
        assert [m["role"] for m in r["chosen"]] == ["assistant"] and [m["role"] for m in r["rejected"]] == ["assistant"]
        assert isinstance(r["chosen"][0]["content"], str) and isinstance(r["rejected"][0]["content"], str)
        assert r["instruction"] == t["instruction"] and r["criterion"] == t["criterion"]
        assert r["consistency"] == pytest.approx(t["consistency"])
        assert (r["gamma_pos"], r["gamma_neg"]) == (GP, GN)
        assert r["layers"] == LAYERS  # the suggested range was used and recorded
        assert (r["scale"], r["positions"], r["max_new_tokens"], r["do_sample"]) == ("relative", "all", 4, False)
        assert r["repetition_penalty"] == pytest.approx(1.1)  # DEFAULT_DECODING
        assert r["index"] == i and r["batch"] == i // 2
        assert isinstance(r["chosen_finished"], bool) and isinstance(r["rejected_finished"], bool)
        assert 1 <= r["chosen_tokens"] <= 4 and 1 <= r["rejected_tokens"] <= 4
    seeds = list(ref["seed"])
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and len({seeds[0], seeds[2], seeds[4]}) == 3
    assert sum(a != b for a, b in _pair_texts(ref)) >= 3  # the two sides really differ
    from trl.data_utils import is_conversational

    assert is_conversational(ref[0])


def test_chosen_and_rejected_come_from_one_batch(tiny_model, dirs, ref, monkeypatch):
    calls = _record(monkeypatch)
    ds = _gen(tiny_model, dirs, TABLE)
    assert len(calls) == 3  # one generate call per batch of 2 instructions
    tok = tiny_model.tokenizer
    for b, call in enumerate(calls):
        chunk = TABLE[2 * b:2 * b + 2]
        k = len(chunk)
        prompts = [render_chat(tok, t["instruction"]) for t in chunk]
        assert call["prompts"] == prompts + prompts
        assert call["gammas"] == [GP] * k + [GN] * k
        assert call["criteria"] == [t["criterion"] for t in chunk] * 2
        assert call["directions"] is dirs and call["layers"] == LAYERS
        for i in range(k):
            row = ds[2 * b + i]
            assert row["chosen"][0]["content"] == call["out"][i]["text"]
            assert row["rejected"][0]["content"] == call["out"][k + i]["text"]
            assert row["chosen_finished"] == call["out"][i]["finished"]
            assert row["rejected_tokens"] == call["out"][k + i]["n_tokens"]
    assert _pair_texts(ds) == _pair_texts(ref)  # deterministic
    # the chosen side is the +gamma_pos generation of that instruction alone, the rejected the gamma_neg one
    t = TABLE[3]
    alone = [REAL_GENERATE(tiny_model, [render_chat(tok, t["instruction"])], directions=dirs, criteria=t["criterion"],
                           gammas=g, layers=LAYERS, max_new_tokens=4, repetition_penalty=1.1)[0]["text"]
             for g in (GP, GN)]
    assert alone == [ds[3]["chosen"][0]["content"], ds[3]["rejected"][0]["content"]]


def test_criterion_forces_one_and_consistency_is_optional(tiny_model, dirs, monkeypatch):
    calls = _record(monkeypatch)
    table = [{"instruction": t["instruction"], "criterion": t["criterion"]} for t in TABLE[:3]]
    table[1]["consistency"] = 3.5
    ds = _gen(tiny_model, dirs, table, criterion="honest", batch_size=4)
    assert len(calls) == 1 and calls[0]["criteria"] == ["honest"] * 6
    assert list(ds["criterion"]) == ["honest"] * 3
    assert list(ds["consistency"]) == [None, 3.5, None]
    # a table without a criterion column works with criterion=
    bare = _gen(tiny_model, dirs, [{"instruction": t["instruction"]} for t in TABLE[:3]], criterion="honest",
                batch_size=4)
    assert _pair_texts(bare) == _pair_texts(ds)




def test_finished_flags_and_cut_at_end_of_turn(talker, dirs):
    """Text stops before <|im_end|>; finished/n_tokens say where; sampling is seeded and leaves the caller's RNG."""
    tok = talker.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [render_chat(tok, t["instruction"]) for t in TABLE]
    n = 10
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    rows = generate_steered(talker, prompts, max_new_tokens=n, do_sample=True, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert generate_steered(talker, prompts, max_new_tokens=n, do_sample=True, seed=0) == rows
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(x) for x in ids])[:, None]).long()
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(0)
        out = il.gen.hf_model(talker).generate(input_ids, attention_mask=mask, max_new_tokens=n, do_sample=True,
                                                 temperature=1.0, top_p=1.0, top_k=0, eos_token_id=[end],
                                                 pad_token_id=tok.pad_token_id)
    finished = 0
    for row, seq in zip(rows, out[:, width:].tolist()):
        if end in seq:
            k = seq.index(end)
            finished += 1
            assert row["finished"] and row["n_tokens"] == k + 1
            assert row["text"] == tok.decode(seq[:k], skip_special_tokens=True).strip()
        else:
            assert not row["finished"] and row["n_tokens"] == n
            assert row["text"] == tok.decode(seq, skip_special_tokens=True).strip()
        assert "<|im_end|>" not in row["text"]
    assert 1 <= finished < len(rows)  # both kinds occur
    # pairs record the flags and token counts of each side (dirs fit: same shape and fingerprint)
    ds = _gen(talker, dirs, TABLE, max_new_tokens=n, do_sample=True, batch_size=3)
    flags = list(ds["chosen_finished"]) + list(ds["rejected_finished"])
    tokens = list(ds["chosen_tokens"]) + list(ds["rejected_tokens"])
    assert any(flags) and not all(flags)
    assert all(t == n for f, t in zip(flags, tokens) if not f) and all(1 <= t <= n for t in tokens)
    assert pair_report(ds)["chosen"]["finished_share"] == sum(ds["chosen_finished"]) / len(ds)


# ---- resume -----------------------------------------------------------------------------------------


def test_interrupted_run_resumes_each_instruction_once(tiny_model, dirs, ref, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = _record(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        _gen(tiny_model, dirs, TABLE, out=out)
    assert len(calls) == 3
    written = _lines(out / "pairs.jsonl")
    assert [r["index"] for r in written] == [0, 1, 2, 3]  # two complete batches
    settings = json.loads((out / "generation.json").read_text())
    assert settings["gamma_pos"] == GP and settings["batch_size"] == 2 and settings["layers"] == LAYERS
    calls = _record(monkeypatch)
    ds = _gen(tiny_model, dirs, TABLE, out=out)
    assert len(calls) == 1 and calls[0]["prompts"][0] == render_chat(tiny_model.tokenizer, TABLE[4]["instruction"])
    assert list(ds["index"]) == list(range(len(TABLE)))
    assert list(ds["instruction"]) == [t["instruction"] for t in TABLE]
    assert _pair_texts(ds) == _pair_texts(ref)
    assert [r["index"] for r in _lines(out / "pairs.jsonl")] == list(range(len(TABLE)))
    # a finished run: a rerun generates nothing and returns the same pairs
    calls = _record(monkeypatch)
    again = _gen(tiny_model, dirs, TABLE, out=out)
    assert calls == [] and again.to_list() == ds.to_list()


@pytest.mark.parametrize("cut", ["torn_line", "partial_batch"])
def test_torn_line_and_partial_batch_are_repaired(tiny_model, dirs, ref, tmp_path, monkeypatch, cut):
    out = tmp_path / "run"
    _record(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError):
        _gen(tiny_model, dirs, TABLE, out=out)
    path = out / "pairs.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4
    if cut == "torn_line":
        with open(path, "a", encoding="utf-8") as f:
            f.write(lines[0][:40])  # half a row, no newline: a crash in the middle of a write
        want_calls = 1
    else:
        path.write_text("".join(lines[:3]), encoding="utf-8")  # the second batch only half written
        want_calls = 2
    calls = _record(monkeypatch)
    ds = _gen(tiny_model, dirs, TABLE, out=out)
    assert len(calls) == want_calls
    assert list(ds["index"]) == list(range(len(TABLE)))
    assert _pair_texts(ds) == _pair_texts(ref)
    rows = _lines(path)  # every line parses: the torn line is gone
    assert [r["index"] for r in rows] == list(range(len(TABLE)))


def test_rerun_with_other_settings_or_table_is_refused(tiny_model, dirs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _record(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError):
        _gen(tiny_model, dirs, TABLE, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = _record(monkeypatch)
    for kw, names in (({"gamma_pos": 0.5}, "gamma_pos"), ({"max_new_tokens": 5}, "max_new_tokens"),
                      ({"layers": [1, 2, 3]}, "layers"), ({"batch_size": 3}, "batch_size"),
                      ({"positions": "generated", "seed": 1}, "positions: 'all' there, 'generated' now, seed")):
        with pytest.raises(ValueError, match=f"other settings \\({names}:"):
            _gen(tiny_model, dirs, TABLE, out=out, **kw)
    with pytest.raises(ValueError, match="another table"):
        _gen(tiny_model, dirs, OTHER_TABLE, out=out)
    assert calls == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the folder is left alone
    # pairs.jsonl without generation.json is not somebody's run to continue
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pairs.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="without generation.json"):
        _gen(tiny_model, dirs, TABLE, out=foreign)


# ---- TRL --------------------------------------------------------------------------------------------


def test_one_dpo_step_in_trl(ref, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = model.lm_head.weight.detach().clone()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                     report_to="none", max_length=64, logging_steps=1, save_strategy="no", beta=0.1)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ref, processing_class=tok)
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and math.isfinite(logged[0]["loss"])
    assert not torch.equal(model.lm_head.weight.detach(), before)  # the step changed the policy
    assert torch.equal(ref_model.lm_head.weight, before)  # and not the reference


# ---- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,table,match", [
    ({"criterion": "kindness"}, TABLE, "Criterion 'kindness' is not in the directions"),
    ({}, [{"instruction": "Hi", "criterion": "harmless"}], "Criterion 'harmless' is not in the directions"),
    ({"layers": [4]}, TABLE, "Layer 4 is not in the directions"),
    ({"layers": [1, 9]}, TABLE, "Layer 9 is not in the directions"),
    ({"layers": [-1]}, TABLE, "Layer -1 is not in the directions"),
    ({"max_new_tokens": 0}, TABLE, "max_new_tokens must be positive"),
    ({"max_new_tokens": -3}, TABLE, "max_new_tokens must be positive"),
    ({}, [], "The table is empty"),
    ({"gamma_pos": 0.1, "gamma_neg": 0.1}, TABLE, "gamma_neg must be below gamma_pos"),
    ({"gamma_pos": -0.1, "gamma_neg": 0.1}, TABLE, "gamma_neg must be below gamma_pos"),
    ({"batch_size": 0}, TABLE, "batch_size must be positive"),
    ({}, [{"prompt": "Hi", "criterion": "helpful"}], "needs an 'instruction' column"),
    ({}, [{"instruction": "Hi"}], "no 'criterion' column"),
])
def test_bad_input(tiny_model, dirs, tmp_path, monkeypatch, kw, table, match):
    calls = _record(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        _gen(tiny_model, dirs, table, out=out, **kw)
    assert calls == [] and not out.exists()


def test_layers_outside_sub_directions_and_other_models(tiny_model, other_tiny_model, dirs):
    cols = [2, 3]
    sub = DirectionSet(vectors=dirs.vectors[:, cols].clone(), criteria=list(dirs.criteria),
                       stats={k: v[:, cols].clone() for k, v in dirs.stats.items()},
                       meta={**dirs.meta, "layers": cols, "suggested_layers": None})
    with pytest.raises(ValueError, match="Layer 1 is not in the directions"):
        _gen(tiny_model, sub, TABLE, layers=[1, 2])
    with pytest.raises(ValueError, match="no suggested layers"):
        _gen(tiny_model, sub, TABLE)
    with pytest.raises(ValueError, match="fingerprint"):
        _gen(other_tiny_model, dirs, TABLE)


def test_empty_layer_selection_is_refused(tiny_model, dirs):
    with pytest.raises(ValueError, match="layer"):
        _gen(tiny_model, dirs, TABLE[:2], layers=[])


def test_table_files_and_folders(tiny_model, dirs, ref, tmp_path):
    jsonl = tmp_path / "selected.jsonl"
    jsonl.write_text("".join(json.dumps(t) + "\n" for t in TABLE))
    from_file = _gen(tiny_model, dirs, jsonl)
    assert _pair_texts(from_file) == _pair_texts(ref)
    assert _table_rows(tmp_path, None, dirs) == _table_rows(TABLE, None, dirs)  # a `score` folder
    with pytest.raises(FileNotFoundError, match="selected.jsonl"):
        _table_rows(tmp_path / "nothing", None, dirs)
    from datasets import Dataset

    assert _table_rows(Dataset.from_list(TABLE), "honest", dirs) == [{**t, "criterion": "honest"} for t in TABLE]
    assert TABLE[0]["criterion"] == "helpful"  # the caller's rows are not changed
