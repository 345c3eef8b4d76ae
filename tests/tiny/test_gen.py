"""The engine seam (icon2_lens.gen): same tokens as before it existed, per-row seeds, log-probs, logits, hygiene."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import icon2_lens as il
from icon2_lens import gen
from icon2_lens.gen import Decoding, SteerSpec

from conftest import INSTRUCTIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from make_generation_fixture import recorded  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tiny_model):
    return il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)


def test_tokens_identical_to_the_fixture_recorded_before_the_seam(tiny_model, dirs):
    expected, got = recorded(tiny_model, dirs, [1, 2], 12, "tiny")
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key


def test_engines_implement_the_protocol_and_are_made_once(tiny_model):
    for kind in ("hf", "bridge"):
        eng = gen.engine(tiny_model, kind)
        assert isinstance(eng, gen.Generator)
        assert eng is gen.engine(tiny_model, kind)
    assert gen.engine(tiny_model).shared  # the fast path shares the bridge's tensors
    hf = gen.hf_model(tiny_model)
    assert hf.model.embed_tokens.weight.data_ptr() == next(
        p for n, p in tiny_model.bridge.original_model.named_parameters() if "embed_tokens" in n).data_ptr()
    with pytest.raises(ValueError, match="Unknown engine"):
        gen.engine(tiny_model, "vllm")  # type: ignore[arg-type]


def test_fallback_copy_is_announced_with_its_memory(tiny_model, tiny_model_dir, monkeypatch):
    model = il.load_model(tiny_model_dir, device="cpu")
    monkeypatch.setattr(gen.hf, "shared_hf_model", lambda m: None)
    with pytest.warns(UserWarning, match=r"second copy of the weights \(\d+ MiB"):
        eng = gen.engine(model)
    assert not eng.shared
    p = [il.render_chat(model.tokenizer, "Hi")]
    assert eng.generate(p, Decoding(max_new_tokens=5)) == gen.engine(tiny_model).generate(  # same function
        p, Decoding(max_new_tokens=5))


def test_per_row_seeds_do_not_depend_on_the_batch(tiny_model):
    eng = gen.engine(tiny_model)
    p = il.render_chat(tiny_model.tokenizer, "Write a haiku about the sea.")
    dec = Decoding(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95)
    together = eng.generate([p, p, p], dec, seed=[11, 12, 11])
    alone = [eng.generate([p], dec, seed=[s])[0] for s in (11, 12)]
    assert together[0] == together[2] == alone[0] and together[1] == alone[1]
    assert together[0].token_ids != together[1].token_ids  # different seeds, different samples
    with pytest.raises(ValueError, match="row seeds"):
        eng.generate([p, p], dec, seed=[1])


def test_row_seed_sampling_follows_the_model_distribution(tiny_model):
    """Gumbel-max with per-row streams samples from softmax(logits / T): first-token frequencies match."""
    eng = gen.engine(tiny_model)
    p = il.render_chat(tiny_model.tokenizer, "Hi")
    probs = torch.softmax(eng.next_token_logits([p])[0] / 2.0, -1)
    n = 400
    rows = eng.generate([p] * n, Decoding(max_new_tokens=1, do_sample=True, temperature=2.0), seed=list(range(n)))
    counts = torch.bincount(torch.tensor([r.token_ids[0] if r.token_ids else -1 for r in rows if r.token_ids]),
                            minlength=probs.shape[0]).float()
    top = probs.argsort(descending=True)[:3]
    for t in top:  # each of the 3 likeliest tokens within 4 binomial standard deviations
        sd = (n * probs[t] * (1 - probs[t])).sqrt()
        assert abs(counts[t] - n * probs[t]) < 4 * sd + 1


def test_next_token_logits_match_one_by_one_and_the_bridge(tiny_model):
    texts = [il.render_chat(tiny_model.tokenizer, q) for q in INSTRUCTIONS]
    hf = gen.engine(tiny_model).next_token_logits(texts, batch_size=4)
    single = torch.cat([gen.engine(tiny_model).next_token_logits([t]) for t in texts])
    bridge = gen.engine(tiny_model, "bridge").next_token_logits(texts, batch_size=3)
    assert hf.shape == (len(texts), len(tiny_model.tokenizer))
    torch.testing.assert_close(hf, single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf, bridge, atol=1e-4, rtol=1e-4)


def test_continuation_logprobs_equal_a_manual_forward(tiny_model):
    tok = tiny_model.tokenizer
    prompts = [il.render_chat(tok, q) for q in INSTRUCTIONS[:3]]
    conts = ["Paris.", "A short and clear answer about it.", "No"]
    got = gen.engine(tiny_model).continuation_logprobs(prompts, conts, batch_size=2)
    hf = gen.hf_model(tiny_model)
    for p, c, lp in zip(prompts, conts, got):
        pi, ci = tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = hf(torch.tensor([pi + ci])).logits[0].float()
        want = torch.log_softmax(logits, -1)[len(pi) - 1:-1].gather(-1, torch.tensor(ci)[:, None])[:, 0]
        assert lp.shape == (len(ci),)
        torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)
    bridge = gen.engine(tiny_model, "bridge").continuation_logprobs(prompts, conts)
    for a, b in zip(got, bridge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_steer_spec_validation_and_hooks_removed_on_error(tiny_model, dirs):
    with pytest.raises(ValueError, match="resid_pre and resid_post"):
        SteerSpec({1: torch.zeros(1, 64)}, hook="resid_mid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions"):
        SteerSpec({1: torch.zeros(1, 64)}, positions="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one layer"):
        SteerSpec({})
    eng = gen.engine(tiny_model)
    p = [il.render_chat(tiny_model.tokenizer, "Hi")] * 2
    with pytest.raises(ValueError, match="out of range"):
        eng.generate(p, Decoding(max_new_tokens=2), steer=SteerSpec({9: torch.zeros(1, 64)}))
    with pytest.raises(ValueError, match="3 rows but there are 2"):
        eng.generate(p, Decoding(max_new_tokens=2), steer=SteerSpec({1: torch.zeros(3, 64)}))
    layers = gen.decoder_layers(eng.hf_model)
    assert sum(len(m._forward_hooks) for m in layers) == 0
    spec = il.steering.steer_spec(dirs, "helpful", 5.0, layers=[1, 2], scale="unit")
    boom = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), eng.steering(spec):
        assert sum(len(m._forward_hooks) for m in layers) == 2
        raise boom
    assert sum(len(m._forward_hooks) for m in layers) == 0
    plain = eng.generate(p, Decoding(max_new_tokens=6))
    steered = eng.generate(p, Decoding(max_new_tokens=6), steer=spec)
    assert plain != steered and sum(len(m._forward_hooks) for m in layers) == 0


def test_decoding_refuses_bad_settings():
    for bad, match in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
                       ({"top_p": 0.0}, "top_p"), ({"repetition_penalty": 0.0}, "repetition_penalty")]:
        with pytest.raises(ValueError, match=match):
            Decoding(**bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Decoding().max_new_tokens == 128
