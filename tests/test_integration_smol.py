"""Integration tests on the embedded SmolLM2-135M-Instruct (kept small: a few hundred prompts in all)."""

from __future__ import annotations

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
    return il.builtin_instructions()


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
