"""Integration tests on the embedded SmolLM2-135M-Instruct (kept small: a few hundred prompts in all)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import icon2_lens as il
from icon2_lens.activations import tokenize_texts
from icon2_lens.models import cache_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def instructions():
    return il.instructions.builtin_instructions()


@pytest.fixture(scope="module")
def report12(smol, instructions):
    dirs = il.extract_directions(smol, ["helpful", "honest"], instructions[:12], batch_size=24, progress=False)
    # (a) only: (b) and (c) are covered by test_response_pairs_separate_for_helpful
    report = il.layer_report(smol, dirs, n_heldout=8, paraphrases={}, response_pairs={}, batch_size=16,
                             progress=False)
    return dirs, report


def test_load_from_cache(smol):
    t = time.perf_counter()
    again = il.load_model(device="cpu")
    assert time.perf_counter() - t < 30
    folders = [p for p in (cache_dir() / "models").iterdir() if (p / "config.json").is_file()]
    assert any(p.name.startswith("SmolLM2-135M-Instruct") for p in folders)
    for m in (smol, again):
        assert m.info.kind == "embedded" and m.info.model_id == "SmolLM2-135M-Instruct"
        assert (m.info.n_layers, m.info.d_model) == (30, 576)
        assert m.info.architecture == "LlamaForCausalLM"
        assert m.tokenizer.chat_template
    assert again.info.fingerprint == smol.info.fingerprint
    assert again.info.hf_path == smol.info.hf_path
    assert Path(again.info.hf_path).parent == cache_dir() / "models"


def test_chat_text_has_a_single_leading_template_token(smol):
    text = il.render_chat(smol.tokenizer, "Hi", system="You are a helpful assistant.")
    ids = tokenize_texts(smol, [text])[0]
    first = smol.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert text.startswith("<|im_start|>")
    assert ids[0] == first and ids[1] != first


def test_batched_equals_one_by_one(smol, instructions):
    texts = [il.render_chat(smol.tokenizer, x, system="You are a helpful assistant.")
             for x in ["Hi", instructions[0], instructions[2], "Explain, in detail and with examples, how vaccines train the immune system."]]
    assert len({len(x) for x in tokenize_texts(smol, texts)}) == 4
    batched = il.read_last_token(smol, texts, batch_size=4, progress=False)
    single = il.read_last_token(smol, texts, batch_size=1, progress=False)
    assert batched.shape == (4, 30, 576)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)


def test_read_equals_hf_hidden_states(smol):
    text = il.render_chat(smol.tokenizer, "What is the capital of France?")
    ids = torch.tensor(tokenize_texts(smol, [text]))
    hf = smol.hf_model()
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
    got = il.read_last_token(smol, [text], layers=[0, 14, 28], progress=False)
    for j, layer in enumerate([0, 14, 28]):
        torch.testing.assert_close(got[0, j], hidden[layer + 1][0, -1], atol=1e-3, rtol=1e-4)


def test_heldout_stimuli_separate(smol, report12):
    dirs, report = report12
    assert dirs.vectors.shape == (2, 30, 576)
    torch.testing.assert_close(dirs.vectors.norm(dim=-1), torch.ones(2, 30))
    assert report.counts["helpful"]["a"] == 8
    good = (report.heldout >= 0.9).float().mean(1)  # share of layers, per criterion
    assert (good >= 0.8).all(), report.table()
    assert len(report.suggested_layers) == 10


def test_response_pairs_separate_for_helpful(smol, instructions):
    dirs = il.extract_directions(smol, ["helpful"], instructions[:32], batch_size=16, progress=False)
    # built-in response pairs for helpful; paraphrases left out to keep the test small
    report = il.layer_report(smol, dirs, n_heldout=4, paraphrases={}, batch_size=16, progress=False)
    assert report.counts["helpful"]["c"] >= 8
    assert not torch.isnan(report.response).any()
    upper = report.response[0, 10:]
    assert (upper > 0.5).any(), report.table()
    assert upper[5:].mean() > 0.6, report.table()  # layers 15-29: ~0.85 measured


# ---- issue 3: synthesis and scoring on the real model --------------------------------------------


@pytest.fixture(scope="module")
def synthesized(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    ds = il.synthesize_instructions(smol, 16, batch_size=8, max_new_tokens=64, seed=0, out=out, progress=False)
    return ds, out


def test_synthesis_gives_clean_distinct_instructions(smol, synthesized):
    from icon2_lens.synthesis import normalize_text

    ds, out = synthesized
    report = il.synthesis.synthesis_report(ds)
    assert report["generated"] == 16 and report["kept"] == len(ds) > 0
    assert report["kept"] + sum(report["dropped"].values()) == 16
    texts = ds["instruction"]
    assert len({normalize_text(t) for t in texts}) == len(texts)  # de-duplicated
    special = [t for t in smol.tokenizer.all_special_tokens if t]
    for t in texts:
        assert t == t.strip() and len(t.split()) >= 3
        assert not any(s in t for s in special), t  # no template debris
        assert "<|" not in t and not t.lower().startswith(("assistant", "user", "system")), t
    # the pre-query template kept SmolLM2's default system prompt
    assert "SmolLM" in il.prompts.pre_query_template(smol.tokenizer).prefix
    assert len(il.load_instructions(out)) == len(ds)  # the output folder loads as an instruction source


def test_scoring_runs_and_is_deterministic(smol, synthesized, instructions):
    ds, _ = synthesized
    dirs = il.extract_directions(smol, ["helpful", "honest"], instructions[:8], batch_size=16, progress=False)
    a = il.score_instructions(smol, dirs, ds, standardize=False, batch_size=8, progress=False)  # raw Eq. 2
    b = il.score_instructions(smol, dirs, ds, standardize=False, batch_size=3, progress=False)
    assert a["instruction"] == ds["instruction"]
    for col in ("score_helpful", "score_honest", "consistency"):
        torch.testing.assert_close(torch.tensor(a[col]), torch.tensor(b[col]), atol=1e-4, rtol=1e-5)
    assert set(a["criterion"]) <= {"helpful", "honest"}
    z = il.score_instructions(smol, dirs, ds, batch_size=8, progress=False)  # the default: standardised
    assert z["consistency"] != a["consistency"]
    top = il.select_instructions(a, top_k=2)
    assert len(top) == 2 and top["consistency"][0] == max(a["consistency"])


# ---- issue 4: steering on the real model ---------------------------------------------------------


def test_steered_generation_fast_path_equals_bridge_and_pairs_differ(smol, instructions):
    from icon2_lens.prompts import render_chat

    dirs = il.extract_directions(smol, ["helpful"], instructions[:8], batch_size=16, progress=False)
    prompts = [render_chat(smol.tokenizer, q) for q in ("How do I make a cup of tea?", "Name three rivers.")]
    kw = dict(directions=dirs, criteria="helpful", gammas=[0.1, -0.1], layers=range(15, 25), max_new_tokens=12)
    fast = il.pairs.generate_steered(smol, prompts, **kw)
    bridge = il.pairs.generate_steered(smol, prompts, path="bridge", **kw)
    assert [r["text"] for r in fast] == [r["text"] for r in bridge]
    pairs = il.generate_pairs(smol, dirs, [{"instruction": "How do I make a cup of tea?", "criterion": "helpful"}],
                              il.PairsConfig(max_new_tokens=16), layers=range(15, 25), progress=False)
    assert pairs[0]["chosen"][0]["content"] != pairs[0]["rejected"][0]["content"]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "How do I make a cup of tea?"}]


def test_generation_costs_count_the_real_generated_tokens(smol):
    prompts = [il.render_chat(smol.tokenizer, q) for q in ("Say hi.", "Write a long story about a dragon.")]
    with il.measure_costs("gen", smol) as meter:
        rows = il.pairs.generate_steered(smol, prompts, max_new_tokens=40)
    assert rows[0]["finished"] and rows[0]["n_tokens"] < 40 <= rows[1]["n_tokens"]  # one stops early
    assert meter.costs.generated_tokens == sum(r["n_tokens"] for r in rows)
    assert meter.costs.forward_passes == 40


def test_pipeline_tiny_config_end_to_end(smol, tmp_path):
    """`icon2-lens run` on the embedded model with a tiny config: every stage, a report, then a no-op rerun."""
    from icon2_lens.cli import main

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "extract: {n_instructions: 8}\n"
        "layers: {n_heldout: 4, n_paraphrase_instructions: 1}\n"
        "synthesize: {n: 8, batch_size: 8, max_new_tokens: 48}\n"
        "score: {top_k: 2}\n"
        "generate: {max_new_tokens: 16, batch_size: 2}\n"
        "train: {max_steps: 1, finished_only: false}\n"  # 16-token answers do not finish
        "controls: {kinds: [swapped]}\n"
        "evaluate: {n: 2, max_new_tokens: 16, batch_size: 2, n_preference: 4, n_boot: 200}\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "per kept pair (2)" in report and "Self-probe shift" in report and "| win | tie | loss |" in report
    assert "Judge-free preference margins" in report and "Independent probe" in report
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert set(metrics["preference"]["models"]) == {"base", "trained", "swapped"}
    assert metrics["preference"]["models"]["trained"]["all"]["n"] == 12  # 4 per criterion
    costs = {s: il.runs.load_costs(out / s) for s in ("extract", "layers", "synthesize", "score", "generate", "train",
                                                 "controls", "evaluate")}
    assert costs["generate"].rows == 2 and costs["generate"].generated_tokens > 0
    assert costs["synthesize"].generated_tokens > 0 and costs["train"].forward_passes == 2
    trained = il.load_model(out / "train" / "trained_model", device="cpu")
    assert trained.info.fingerprint == smol.info.fingerprint
    from icon2_lens.pipeline.run import STAGES

    res = il.run_pipeline(None, out=out, progress=False, log=None)
    assert res.ran == [] and res.skipped == list(STAGES)  # compare and distill too (off: they did nothing)


# ---- the engine seam keeps the tokens of the code before it (tests/tiny/test_gen.py has the tiny-model half) --


def test_smol_tokens_identical_to_the_fixture_recorded_before_the_seam(smol):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from make_generation_fixture import INSTRUCTIONS as SMOL_INSTRUCTIONS
    from make_generation_fixture import recorded

    d = il.extract_directions(smol, ["helpful", "honest"], SMOL_INSTRUCTIONS, batch_size=6, progress=False)
    expected, got = recorded(smol, d, list(range(15, 25)), 24, "smol")
    for key in expected:
        assert got[key] == expected[key], key
