"""Batching in the judges is exact: PairwiseJudge's left padding on a model with absolute positions (GPT-2),
and RewardModelScorer on rows that end in the end-of-sequence token when the pad token is that token."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer

import icon2_lens as il
from icon2_lens.judges import PairwiseJudge, RewardModelScorer

PROMPTS = ["Hi", "Write a haiku about the sea, please, in the style of an old sailor.", "What is 2+2?"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 (learned ABSOLUTE position embeddings) loaded through icon2_lens.load_model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tok = build_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return il.load_model(folder, device="cpu")


def test_left_padded_logits_equal_one_by_one_with_absolute_positions(gpt2):
    eng = il.gen.engine(gpt2)
    texts = [il.render_chat(gpt2.tokenizer, p) for p in PROMPTS]
    lengths = [len(gpt2.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert len(set(lengths)) == 3
    batched = eng.next_token_logits(texts, batch_size=8)
    alone = torch.cat([eng.next_token_logits([t]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)
    # the check has teeth: without position ids the padded rows of GPT-2 read shifted positions
    from icon2_lens.gen.batching import encode, padded_batch

    ids, mask = padded_batch(gpt2.tokenizer, encode(gpt2.tokenizer, texts), "cpu")
    with torch.inference_mode():
        naive = eng.hf_model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    assert (naive - alone).abs().max() > 1e-2


def test_pairwise_judge_batches_equal_one_by_one_on_gpt2(gpt2):
    qs, a = PROMPTS, ["Yes.", "Salt wind, old rope, gulls.", "4"]
    b = ["No, never, not in a hundred years.", "Sea.", "5"]
    batched = PairwiseJudge(gpt2, batch_size=8)
    texts = [il.render_chat(gpt2.tokenizer, PairwiseJudge.PROMPT.format(q=q, a=x, b=y))
             for q, x, y in zip(qs, a, b, strict=True)]
    logits = il.gen.engine(gpt2).next_token_logits(texts, batch_size=8)
    alone = torch.cat([il.gen.engine(gpt2).next_token_logits([t]) for t in texts])
    torch.testing.assert_close(logits, alone, atol=1e-4, rtol=0)
    assert batched.orders(qs, a, b) == PairwiseJudge(gpt2, batch_size=1).orders(qs, a, b)


# A chat template that ends every message with the end-of-sequence token (no newline after it): each
# reward-model input ends in EOS, which is also the pad token when the tokenizer has none.
EOS_LAST = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>'}}{% endfor %}")

QUESTIONS = ["Name three rivers in Africa.", "Write a limerick about a cat.", "How many legs does a spider have?"]
ANSWERS = ["The Nile, the Congo and the Niger.", "A cat sat on a hat, and that was that.", "Eight."]


def test_reward_model_scores_the_trailing_eos_and_batches_equal_one_by_one(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    folder = tmp_path / "rm"
    tok = build_tokenizer(EOS_LAST)
    tok.pad_token = None
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert config.pad_token_id is None
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)

    scorer = RewardModelScorer(folder, device="cpu", batch_size=3)
    assert scorer.tokenizer.pad_token == scorer.tokenizer.eos_token  # the "pad = EOS" fallback
    batched = scorer(QUESTIONS, ANSWERS, ["helpful"] * 3)  # one batch of 3 rows of different lengths
    one_by_one = [RewardModelScorer(folder, device="cpu")([q], [r], ["helpful"])[0]
                  for q, r in zip(QUESTIONS, ANSWERS, strict=True)]
    assert batched == pytest.approx(one_by_one, abs=1e-4)

    # the reference: each row alone, unpadded, read at its last token (the EOS), by a fresh copy of the model
    rm = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    plain = AutoTokenizer.from_pretrained(folder)
    eos = plain.convert_tokens_to_ids(plain.eos_token)
    for q, r, s in zip(QUESTIONS, ANSWERS, batched, strict=True):
        text = plain.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                         tokenize=False)
        enc = plain(text, add_special_tokens=False, return_tensors="pt")
        assert enc["input_ids"][0, -1].item() == eos
        with torch.inference_mode():
            want = rm(**enc).logits[0, 0].item()  # pad id None, one row: HF reads the last token
            rm.config.pad_token_id = eos  # what HF does with pad = EOS: the row is read one token early
            early = rm(**enc).logits[0, 0].item()
            rm.config.pad_token_id = None
        assert s == pytest.approx(want, abs=1e-4)
        assert abs(early - want) > 1e-3  # so the check has teeth
