"""Shared-prefix reading (issue 14 item 3): the KV cache of the tokens a batch shares is computed once, and the
residuals equal a full forward pass over the whole prompts, through extraction and scoring."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.activations import LastTokenReader, tokenize_texts
from icon2_lens.criteria import resolve_criteria
from icon2_lens.gen.hf import decoder_layers
from icon2_lens.gen.prefix import PrefixReader, common_prefix_length, last_token_reader
from icon2_lens.prompts import stimulus_texts

from conftest import INSTRUCTIONS, PROMPTS

CRITS = ["helpful", "honest"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


def _read(reader_cls, model, ids, **kw) -> torch.Tensor:
    with reader_cls(model, **kw) as r:
        return r.read(ids)


@pytest.mark.parametrize("ids, expected", [
    ([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], 2),
    ([[7, 8], [7, 8]], 1),                 # one token of each row is left for the batch pass
    ([[1, 2, 3]], 2),
    ([[1, 2], [3, 4]], 0),
    ([], 0),
])
def test_common_prefix_length(ids, expected):
    assert common_prefix_length(ids) == expected


@pytest.mark.parametrize("hook", ["resid_post", "resid_pre", "blocks.{layer}.hook_resid_post"])
def test_shared_system_prompt_equals_full_forward(tiny_model, hook):
    crit = resolve_criteria(["helpful"])[0]
    ids = tokenize_texts(tiny_model, stimulus_texts(tiny_model.tokenizer, crit.positive, INSTRUCTIONS))
    assert common_prefix_length(ids) > 10  # the system prompt is shared
    full = _read(LastTokenReader, tiny_model, ids, hook=hook)
    with PrefixReader(tiny_model, hook=hook) as r:
        shared = r.read(ids)
        assert r.tokens_reused > 0
        again = r.read(ids[:3])  # the kept prefix is reused, same values
    assert shared.shape == full.shape == (len(ids), tiny_model.n_layers, tiny_model.d_model)
    assert _rel(shared, full) < 1e-4
    assert _rel(again, full[:3]) < 1e-4


def test_no_shared_prefix_and_single_rows_equal_full_forward(tiny_model, chat_prompts):
    raw = tokenize_texts(tiny_model, PROMPTS)  # bare texts: no common prefix, a left-padded full pass
    assert common_prefix_length(raw) < 2
    assert _rel(_read(PrefixReader, tiny_model, raw), _read(LastTokenReader, tiny_model, raw)) < 1e-4
    ids = tokenize_texts(tiny_model, chat_prompts)
    full = _read(LastTokenReader, tiny_model, ids)
    with PrefixReader(tiny_model) as r:
        rows = torch.cat([r.read([x]) for x in ids])  # a batch of one: its whole prompt but one token is reused
    assert _rel(rows, full) < 1e-4


def test_rows_that_are_prefixes_of_each_other(tiny_model, chat_prompts):
    ids = tokenize_texts(tiny_model, chat_prompts[:1])[0]
    batch = [ids[:k] for k in (len(ids) - 3, len(ids), len(ids) - 1)]
    assert _rel(_read(PrefixReader, tiny_model, batch), _read(LastTokenReader, tiny_model, batch)) < 1e-4


def test_layer_subset_and_order(tiny_model, chat_prompts):
    ids = tokenize_texts(tiny_model, chat_prompts)
    full = _read(LastTokenReader, tiny_model, ids)
    part = _read(PrefixReader, tiny_model, ids, layers=[-1, 0])
    assert _rel(part, full[:, [tiny_model.n_layers - 1, 0]]) < 1e-4


def test_hooks_removed_on_exit_and_on_error(tiny_model, chat_prompts):
    ids = tokenize_texts(tiny_model, chat_prompts)
    layers = decoder_layers(il.gen.hf_model(tiny_model))
    with PrefixReader(tiny_model) as r:
        assert any(len(m._forward_hooks) for m in layers)
        r.read(ids)
    assert not any(len(m._forward_hooks) or len(m._forward_pre_hooks) for m in layers)
    with pytest.raises(RuntimeError, match="boom"), PrefixReader(tiny_model, hook="resid_pre") as r:
        r.read(ids)
        raise RuntimeError("boom")
    assert not any(len(m._forward_hooks) or len(m._forward_pre_hooks) for m in layers)
    with pytest.raises(RuntimeError, match="inside"):
        PrefixReader(tiny_model).read(ids)
    with pytest.raises(ValueError, match="nothing"), PrefixReader(tiny_model) as r:
        r.read([[]])


def test_resid_mid_uses_the_bridge(tiny_model):
    assert isinstance(last_token_reader(tiny_model, hook="resid_mid"), LastTokenReader)
    assert isinstance(last_token_reader(tiny_model, hook="resid_post"), PrefixReader)
    assert isinstance(last_token_reader(tiny_model, hook="resid_post", reuse_prefix=False), LastTokenReader)
    with pytest.raises(ValueError, match="resid_mid"):
        PrefixReader(tiny_model, hook="resid_mid")


@pytest.mark.parametrize("stability", [False, True])
def test_extract_directions_same_with_and_without_prefix_reuse(tiny_model, stability):
    kw = dict(batch_size=4, progress=False, stability=stability)
    a = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, reuse_prefix=True, **kw)
    b = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, reuse_prefix=False, **kw)
    cos = (a.vectors * b.vectors).sum(-1)
    assert float(cos.min()) >= 0.9999
    for k in b.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], rtol=1e-3, atol=1e-4)


def test_extract_directions_is_deterministic_with_prefix_reuse(tiny_model):
    a = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, batch_size=4, progress=False)
    b = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, batch_size=4, progress=False)
    assert torch.equal(a.vectors, b.vectors)


def test_score_instructions_same_with_and_without_prefix_reuse(tiny_model):
    dirs = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, batch_size=4, progress=False)
    kw = dict(batch_size=4, progress=False, allow_invalid=True)
    a = il.score_instructions(tiny_model, dirs, INSTRUCTIONS + PROMPTS, reuse_prefix=True, **kw)
    b = il.score_instructions(tiny_model, dirs, INSTRUCTIONS + PROMPTS, reuse_prefix=False, **kw)
    for c in CRITS:
        torch.testing.assert_close(torch.tensor(a[f"score_{c}"]), torch.tensor(b[f"score_{c}"]), rtol=1e-3, atol=1e-4)
    assert a["criterion"] == b["criterion"]


@pytest.mark.parametrize("reuse", [True, False])
def test_nan_activations_are_refused_with_what_to_do(tiny_model, chat_prompts, reuse):
    ids = tokenize_texts(tiny_model, chat_prompts)
    if reuse:
        layer = decoder_layers(il.gen.hf_model(tiny_model))[1]
        handle = layer.register_forward_hook(lambda m, a, out: out * float("nan"))
        ctx = None
    else:
        handle = None
        ctx = tiny_model.bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda act, hook: act * float("nan"))])
        ctx.__enter__()
    try:
        with pytest.raises(il.BadInputError, match=r"NaN or infinite activations at layer 1 .*--dtype") as e, \
                last_token_reader(tiny_model, reuse_prefix=reuse) as r:
            r.read(ids)
        assert e.value.option == "dtype"
    finally:
        if handle is not None:
            handle.remove()
        if ctx is not None:
            ctx.__exit__(None, None, None)


def test_no_second_copy_of_the_weights_just_to_read(tiny_model, monkeypatch):
    import icon2_lens.gen.prefix as prefix

    cached = tiny_model.engines.pop("hf", None)
    monkeypatch.setattr(prefix, "shared_hf_model", lambda model: None)  # weights that cannot be shared
    try:
        assert isinstance(last_token_reader(tiny_model), LastTokenReader)
        assert "hf" not in tiny_model.engines
    finally:
        if cached is not None:
            tiny_model.engines["hf"] = cached


def test_cost_meter_counts_prefix_reads_as_prompt_tokens(tiny_model):
    from icon2_lens.runs.costs import measure_costs

    crit = resolve_criteria(["helpful"])[0]
    ids = tokenize_texts(tiny_model, stimulus_texts(tiny_model.tokenizer, crit.positive, INSTRUCTIONS))
    with measure_costs("extract", tiny_model) as meter, PrefixReader(tiny_model) as r:
        r.read(ids)
        r.read(ids[:3])  # the kept prefix: not computed again
    c = meter.costs
    assert c.generated_tokens == 0
    assert c.prompt_tokens == r.tokens_run < sum(len(x) for x in ids) + sum(len(x) for x in ids[:3])
    assert c.forward_passes == 3  # one prefix pass, two batch passes


def test_the_shared_hf_model_is_built_once(tiny_model, monkeypatch):
    import icon2_lens.gen.hf as hf_mod
    import icon2_lens.gen.prefix as prefix

    calls = []
    real = hf_mod.shared_hf_model

    def counted(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(prefix, "shared_hf_model", counted)
    monkeypatch.setattr(hf_mod, "shared_hf_model", counted)
    cached = tiny_model.engines.pop("hf", None)
    try:
        reader = last_token_reader(tiny_model)
        assert isinstance(reader, PrefixReader) and tiny_model.engines["hf"].shared
        assert len(calls) == 1
    finally:
        if cached is not None:
            tiny_model.engines["hf"] = cached
