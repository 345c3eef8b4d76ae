"""icon2_lens.preference on the tiny model: pair_logprobs (batched == one by one == a plain forward), token counts,
symmetry under swapping, and evaluate_preferences of a model against itself."""

from __future__ import annotations

import json

import pytest
import torch

import icon2_lens as il
from icon2_lens.preference import (
    PreferencePair,
    evaluate_preferences,
    load_preference_set,
    pair_logprobs,
    preference_set_sha256,
)

# Prompts and answers of clearly different lengths (padding and the continuation-only softmax both matter).
PAIRS = [
    PreferencePair("Hi", "Hello! How can I help you today?", "No.", "helpful"),
    PreferencePair("Explain, step by step and with an example, how DNS resolves a name to an address.",
                   "A resolver asks a root server, then the TLD server, then the domain's authoritative server.",
                   "DNS is magic and nobody knows how it works, sorry about that, truly, it is unknowable.", "honest"),
    PreferencePair("What is 2+2?", "4", "5", "honest"),
    PreferencePair("Write a haiku about the sea.", "Grey waves fold and break / salt wind combs the dune grass flat "
                   "/ gulls hang in the light", "sea", "helpful"),
    PreferencePair("Zxqv ünïcødé 🙂 words", "I do not understand the question; could you rephrase it?",
                   "Sure 🙂 ünïcødé!", "harmless"),
]


def _plain_forward(model, pair_prompt: str, answer: str) -> tuple[float, int]:
    """Summed log p(answer | chat prompt) from one unpadded forward of the plain HF model (the reference)."""
    tok = model.tokenizer
    p = tok(il.render_chat(tok, pair_prompt), add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.inference_mode():
        logits = il.gen.hf_model(model)(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
    return float(logp.gather(-1, torch.tensor(a)[:, None]).sum()), len(a)


def test_batched_equals_one_by_one_and_a_plain_forward(tiny_model):
    batched = pair_logprobs(tiny_model, PAIRS, batch_size=3)
    singles = [pair_logprobs(tiny_model, [p], batch_size=1) for p in PAIRS]
    for field in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        one = torch.cat([getattr(s, field) for s in singles])
        torch.testing.assert_close(getattr(batched, field), one, atol=1e-4, rtol=0)
    for i, p in enumerate(PAIRS):
        for side in ("chosen", "rejected"):
            ref, n = _plain_forward(tiny_model, p.prompt, getattr(p, side))
            assert float(getattr(batched, side)[i]) == pytest.approx(ref, abs=1e-3), (i, side)
            assert float(getattr(batched, f"{side}_tokens")[i]) == n
    # a batch holding every pair gives the same too
    whole = pair_logprobs(tiny_model, PAIRS, batch_size=len(PAIRS))
    torch.testing.assert_close(whole.margin, batched.margin, atol=1e-4, rtol=0)


def test_token_counts_are_the_tokenizers(tiny_model):
    lp = pair_logprobs(tiny_model, PAIRS, batch_size=2)
    tok = tiny_model.tokenizer
    assert lp.chosen_tokens.tolist() == [len(tok(p.chosen, add_special_tokens=False)["input_ids"]) for p in PAIRS]
    assert lp.rejected_tokens.tolist() == [len(tok(p.rejected, add_special_tokens=False)["input_ids"]) for p in PAIRS]
    assert lp.chosen.dtype == torch.float64 and lp.chosen.shape == (len(PAIRS),)
    assert (lp.chosen < 0).all() and (lp.rejected < 0).all()
    torch.testing.assert_close(lp.margin, lp.chosen / lp.chosen_tokens - lp.rejected / lp.rejected_tokens)


def test_swapping_negates_the_margin(tiny_model):
    lp = pair_logprobs(tiny_model, PAIRS, batch_size=3)
    swapped = pair_logprobs(tiny_model, [PreferencePair(p.prompt, p.rejected, p.chosen, p.criterion) for p in PAIRS],
                            batch_size=3)
    torch.testing.assert_close(swapped.margin, -lp.margin, atol=1e-4, rtol=0)
    torch.testing.assert_close(swapped.chosen, lp.rejected, atol=1e-4, rtol=0)


def test_no_pairs_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="No preference pairs"):
        pair_logprobs(tiny_model, [])


def test_a_model_against_itself_shifts_exactly_nothing(tiny_model):
    m = evaluate_preferences({"base": tiny_model, "trained": tiny_model}, PAIRS, batch_size=3, n_boot=200)
    assert set(m["models"]) == {"base", "trained"} and m["reference"] == "base"
    for crit, cell in m["models"]["trained"].items():
        assert cell["margin_shift_mean"] == 0.0, crit
        assert (cell["margin_shift_ci_low"], cell["margin_shift_ci_high"]) == (0.0, 0.0), crit
        assert cell["margin_rose_share"] == 0.0 and cell["implicit_reward_accuracy"] == 0.0
        assert cell["margin_mean"] == m["models"]["base"][crit]["margin_mean"]
    assert set(m["models"]["trained"]) == {"all", "helpful", "honest", "harmless"}
    assert m["models"]["trained"]["all"]["n"] == 5 and m["models"]["trained"]["honest"]["n"] == 2
    assert m["contrasts"] == {"subject": "trained", "controls": {}}
    assert m["set"] == {"n": 5, "sha256": preference_set_sha256(PAIRS), "criteria": ["harmless", "helpful", "honest"]}
    assert json.loads(json.dumps(m)) == m


def test_controls_and_a_missing_reference(tiny_model, other_tiny_model):
    m = evaluate_preferences({"base": tiny_model, "trained": other_tiny_model, "same": tiny_model}, PAIRS[:3],
                             n_boot=100)
    con = m["contrasts"]["controls"]
    assert list(con) == ["same"]  # default controls: every model but the reference and the subject
    shift = m["models"]["trained"]["all"]["margin_shift_mean"]
    assert con["same"]["all"]["mean"] == pytest.approx(shift)  # 'same' is the base model: the contrast is the shift
    # no model called 'base': no reference, no shift
    m2 = evaluate_preferences({"a": tiny_model}, PAIRS[:2], n_boot=50)
    assert m2["reference"] is None and "contrasts" not in m2
    assert "margin_shift_mean" not in m2["models"]["a"]["all"]
    with pytest.raises(ValueError, match="No models"):
        evaluate_preferences({}, PAIRS)


def test_shipped_set_on_the_tiny_model(tiny_model):
    pairs = load_preference_set(split="dev")[::6]  # 10 pairs, all three criteria
    m = evaluate_preferences({"base": tiny_model}, pairs, n_boot=50)
    cells = m["models"]["base"]
    assert cells["all"]["n"] == 10 and set(cells) == {"all", "helpful", "honest", "harmless"}
    assert 0.0 <= cells["all"]["preference_accuracy"] <= 1.0
    assert cells["all"]["chosen_tokens_mean"] > 10 and cells["all"]["chosen_words_mean"] > 10
