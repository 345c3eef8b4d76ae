"""Reading the last-token residual: pad-safety, agreement with HF, hook hygiene, BOS handling."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.activations import LastTokenReader, hook_names, resolve_layers, tokenize_texts


def _hook_counts(model) -> tuple[int, int]:
    """(torch forward hooks, TransformerLens handles) over every hook point of the bridge."""
    points = {id(hp): hp for hp in model.bridge.hook_dict.values()}.values()
    return (
        sum(len(hp._forward_hooks) for hp in points),
        sum(len(hp.fwd_hooks) for hp in points),
    )


def _right_padded_manual(model, ids: list[list[int]], hook: str = "resid_post") -> torch.Tensor:
    """Read the last real token of a right-padded batch by hand through run_with_hooks."""
    n, width = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((n, width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    store: dict[int, torch.Tensor] = {}

    def make(layer):
        def fn(act, hook):
            store[layer] = act.detach().clone()

        return fn

    with torch.no_grad():
        model.bridge.run_with_hooks(
            input_ids, attention_mask=mask, return_type=None,
            fwd_hooks=[(f"blocks.{layer}.hook_{hook}", make(layer)) for layer in range(model.n_layers)],
        )
    last = torch.tensor([len(x) - 1 for x in ids])
    return torch.stack([store[layer][torch.arange(n), last] for layer in range(model.n_layers)], 1)


def test_tiny_tokenizer_covers_any_text(tiny_model):
    """Byte-level BPE: unseen words, accents and emoji round-trip, so arbitrary instructions work."""
    tok = tiny_model.tokenizer
    for text in ["Zxqv ünïcødé 🙂 never seen", "tab\tand\nnewline", "数学の問題"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    ids = tokenize_texts(tiny_model, ["<|im_start|>user\nHi<|im_end|>"])[0]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids[-1] == end  # special tokens stay whole
    assert ids.count(start) == 1 and ids.count(end) == 1


def test_prompts_have_different_lengths(tiny_model, chat_prompts):
    lengths = [len(x) for x in tokenize_texts(tiny_model, chat_prompts)]
    assert len(set(lengths)) >= 4, lengths  # otherwise the padding tests test nothing


def test_batched_equals_one_by_one_equals_right_padded(tiny_model, chat_prompts):
    batched = il.read_last_token(tiny_model, chat_prompts, batch_size=len(chat_prompts), progress=False)
    single = il.read_last_token(tiny_model, chat_prompts, batch_size=1, progress=False)
    odd = il.read_last_token(tiny_model, chat_prompts, batch_size=2, progress=False)
    manual = _right_padded_manual(tiny_model, tokenize_texts(tiny_model, chat_prompts))
    assert batched.shape == (len(chat_prompts), tiny_model.n_layers, tiny_model.d_model)
    assert batched.dtype == torch.float32 and batched.device.type == "cpu"
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(odd, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(manual, single, atol=1e-5, rtol=0)
    # the rows are not all the same (the read actually depends on the prompt)
    assert (single[0] - single[2]).abs().max() > 1e-3


def test_order_of_texts_is_kept(tiny_model, chat_prompts):
    fwd = il.read_last_token(tiny_model, chat_prompts, progress=False)
    rev = il.read_last_token(tiny_model, chat_prompts[::-1], progress=False)
    torch.testing.assert_close(rev.flip(0), fwd, atol=1e-5, rtol=0)


def test_no_doubled_bos(tiny_model, chat_prompts):
    tok = tiny_model.tokenizer
    bos = tok.bos_token_id
    for text, ids in zip(chat_prompts, tokenize_texts(tiny_model, chat_prompts)):
        assert text.startswith(tok.bos_token)  # the template carries the BOS itself
        assert ids[0] == bos
        assert ids.count(bos) == 1
    # the fixture's tokenizer does add a BOS with special tokens: the check above is meaningful
    assert tok(chat_prompts[0])["input_ids"][:2] == [bos, bos]


def test_read_equals_hf_hidden_states(tiny_model, chat_prompts):
    hf = tiny_model.hf_model()
    assert hf is not getattr(tiny_model.bridge, "original_model", None)
    text = chat_prompts[2]
    ids = torch.tensor(tokenize_texts(tiny_model, [text]))
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
    got = il.read_last_token(tiny_model, [text], hook="resid_post", progress=False)
    for layer in range(tiny_model.n_layers - 1):
        torch.testing.assert_close(got[0, layer], hidden[layer + 1][0, -1], atol=1e-4, rtol=0)
    # resid_pre of layer l is the embedding / resid_post of layer l-1
    pre = il.read_last_token(tiny_model, [text], hook="resid_pre", progress=False)
    torch.testing.assert_close(pre[0, 0], hidden[0][0, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(pre[0, 1:], got[0, :-1], atol=1e-5, rtol=0)


def test_resid_mid_equals_hf_post_attention_residual(tiny_model, chat_prompts):
    """resid_mid of block l = the residual after attention = input of HF post_attention_layernorm."""
    hf = tiny_model.hf_model()
    store = {}
    for layer, block in enumerate(hf.model.layers):
        block.post_attention_layernorm.register_forward_hook(
            lambda mod, inp, out, layer=layer: store.__setitem__(layer, inp[0][0, -1].detach())
        )
    text = chat_prompts[1]
    with torch.no_grad():
        hf(torch.tensor(tokenize_texts(tiny_model, [text])))
    mid = il.read_last_token(tiny_model, [text], hook="resid_mid", progress=False)
    for layer in range(tiny_model.n_layers):
        torch.testing.assert_close(mid[0, layer], store[layer], atol=1e-4, rtol=0)


def test_layer_subset_and_negative_layers(tiny_model, chat_prompts):
    full = il.read_last_token(tiny_model, chat_prompts, progress=False)
    sub = il.read_last_token(tiny_model, chat_prompts, layers=[2, 0], progress=False)
    torch.testing.assert_close(sub, full[:, [2, 0]], atol=1e-5, rtol=0)
    last = il.read_last_token(tiny_model, chat_prompts, layers=[-1], progress=False)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_hooks_removed_after_read(tiny_model, chat_prompts):
    assert _hook_counts(tiny_model) == (0, 0)
    il.read_last_token(tiny_model, chat_prompts, progress=False)
    assert _hook_counts(tiny_model) == (0, 0)


def test_hooks_removed_after_exception(tiny_model, chat_prompts):
    ids = tokenize_texts(tiny_model, chat_prompts)
    with pytest.raises(RuntimeError, match="boom"):
        with LastTokenReader(tiny_model, hook="resid_post", layers=[0, 1]) as reader:
            assert _hook_counts(tiny_model)[1] == 2  # hooks are in place inside
            reader.read(ids[:2])
            raise RuntimeError("boom")
    assert _hook_counts(tiny_model) == (0, 0)


def test_bridge_still_runs_full_forward_after_early_stop(tiny_model, chat_prompts):
    """Stopping the forward at the last hook must not leave the bridge in a broken state."""
    ids = torch.tensor(tokenize_texts(tiny_model, chat_prompts[:1]))
    hf = tiny_model.hf_model()
    il.read_last_token(tiny_model, chat_prompts, layers=[1], progress=False)
    with torch.no_grad():
        logits = tiny_model.bridge(ids)
        ref = hf(ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_read_outside_context_is_refused(tiny_model):
    reader = LastTokenReader(tiny_model)
    with pytest.raises(RuntimeError, match="inside"):
        reader.read([[1, 2, 3]])


def test_bad_read_inputs(tiny_model, chat_prompts):
    with pytest.raises(ValueError, match="No texts"):
        il.read_last_token(tiny_model, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        il.read_last_token(tiny_model, chat_prompts, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="Unknown hook"):
        il.read_last_token(tiny_model, chat_prompts, hook="attn_out", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        il.read_last_token(tiny_model, chat_prompts, layers=[99], progress=False)
    with LastTokenReader(tiny_model) as reader, pytest.raises(ValueError, match="nothing"):
        reader.read([[1, 2], []])
    assert _hook_counts(tiny_model) == (0, 0)


def test_resolve_layers_and_hook_names(tiny_model):
    assert resolve_layers(tiny_model, None) == [0, 1, 2, 3]
    assert resolve_layers(tiny_model, range(1, 3)) == [1, 2]
    assert resolve_layers(tiny_model, [-1, 0]) == [3, 0]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(tiny_model, [-5])
    with pytest.raises(ValueError, match="repeat"):
        resolve_layers(tiny_model, [1, 1])
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(tiny_model, [])
    with pytest.raises(TypeError):
        resolve_layers(tiny_model, [1.0])
    want = ["blocks.0.hook_resid_mid", "blocks.2.hook_resid_mid"]
    for spelling in ("resid_mid", "hook_resid_mid", "blocks.{layer}.hook_resid_mid"):
        assert hook_names(tiny_model, spelling, [0, 2]) == want
    for bad in ("foo", "attn.hook_z", "blocks.0.hook_resid_post", ""):
        with pytest.raises(ValueError, match="Unknown hook"):
            hook_names(tiny_model, bad, [0])
