"""RewardModelScorer on a tiny reward model whose config has no pad_token_id (EVIDENCE.md item 7)."""

from __future__ import annotations

import pytest
import torch

from icon2_lens.judges import RewardModelScorer, Scorer

from conftest import build_tokenizer

QUESTIONS = ["Name three rivers in Africa.", "Write a limerick about a cat.", "How many legs does a spider have?",
             "Suggest a name for a bakery."]
ANSWERS = ["The Nile, the Congo and the Niger.", "A cat sat on a hat, and that was that.", "Eight.", "Crumb & Co."]


def _reward_folder(folder, *, tokenizer_pad: bool):
    """A tiny LlamaForSequenceClassification (one label) saved without ``pad_token_id`` in its config."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    if not tokenizer_pad:
        tok.pad_token = None
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert config.pad_token_id is None
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tokenizer_pad", [True, False], ids=["tokenizer-pad", "no-pad-anywhere"])
def test_reward_model_without_pad_id_scores_batches(tmp_path, tokenizer_pad):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _reward_folder(tmp_path / "rm", tokenizer_pad=tokenizer_pad)
    scorer = RewardModelScorer(folder, device="cpu", batch_size=3)
    assert isinstance(scorer, Scorer)
    tok = scorer.tokenizer
    want_pad = "<pad>" if tokenizer_pad else tok.eos_token  # no pad token: the end-of-sequence token pads
    assert tok.pad_token == want_pad and scorer.model.config.pad_token_id == tok.convert_tokens_to_ids(want_pad)
    got = scorer(QUESTIONS, ANSWERS, ["helpful"] * 4)  # batches of 3 and 1 rows of different lengths: padded
    assert len(got) == 4 and all(isinstance(x, float) for x in got)
    # each score equals an unpadded forward of the row alone (a fresh copy of the model, config as saved)
    rm = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert rm.config.pad_token_id is None  # the folder is untouched
    plain = AutoTokenizer.from_pretrained(folder)
    for q, r, s in zip(QUESTIONS, ANSWERS, got):
        text = plain.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                         tokenize=False)
        with torch.inference_mode():
            want = rm(**plain(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
        assert s == pytest.approx(want, abs=1e-4)
