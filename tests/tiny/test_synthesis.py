"""Magpie-style synthesis: the pre-query template, the clean-up rules, and resumable generation."""

from __future__ import annotations

import json

import pytest
import torch

import icon2_lens as il
from icon2_lens.prompts import PreQuery, pre_query_template
from icon2_lens.synthesis import DROP_REASONS, clean_generations, normalize_text, synthesis_report

from conftest import CHATML, build_tokenizer

# ---- chat templates, written out here (no per-model templates in the package) ---------------------

# SmolLM2-like: ChatML that inserts a default system prompt when the conversation has none.
SMOL = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a default bot.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-style: header tokens, trimmed content, <|eot_id|>, a default date system header.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma-style: no system role (folded into the first user turn), 'assistant' rendered as 'model'.
GEMMA = (
    "{{ '<bos>' }}"
    "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# name -> (template, extra special tokens, end-of-turn marker token, prefix without / with system "Be brief.")
TEMPLATES = {
    "chatml": (CHATML, [], "<|im_end|>", "<s><|im_start|>user\n",
               "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"),
    "smol": (SMOL, [], "<|im_end|>", "<|im_start|>system\nYou are a default bot.<|im_end|>\n<|im_start|>user\n",
             "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"
               "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n"),
    "gemma": (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<bos><start_of_turn>user\n",
              "<bos><start_of_turn>user\nBe brief.\n\n"),
}


@pytest.fixture(scope="module")
def toks():
    out = {}
    for name, (template, special, *_rest) in TEMPLATES.items():
        tok = build_tokenizer(template)
        if special:
            tok.add_special_tokens({"additional_special_tokens": special})
        out[name] = tok
    return out


def _conversation(tok, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs += [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! What can I do?"}]
    return tok.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_pre_query_prefix_ends_where_user_text_starts(toks, name):
    tok = toks[name]
    _, _, marker, want_prefix, _ = TEMPLATES[name]
    pq = pre_query_template(tok)
    assert isinstance(pq, PreQuery)
    assert pq.prefix == want_prefix
    rendered = _conversation(tok)
    assert rendered.startswith(pq.prefix + "Hello there")
    rest = rendered[len(pq.prefix + "Hello there"):]
    assert rendered == pq.prefix + "Hello there" + rest
    assert rest.startswith(pq.end_of_turn)
    assert pq.end_of_turn.startswith(marker)
    # the stop token is the first token of the end-of-turn text, and it is the single marker token
    assert pq.end_of_turn_id == tok(pq.end_of_turn, add_special_tokens=False)["input_ids"][0]
    assert tok.convert_ids_to_tokens(pq.end_of_turn_id) == marker
    # the prefix tokenises to the same ids as the start of the rendered conversation
    prefix_ids = tok(pq.prefix, add_special_tokens=False)["input_ids"]
    assert tok(rendered, add_special_tokens=False)["input_ids"][:len(prefix_ids)] == prefix_ids


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_pre_query_with_system_prompt(toks, name):
    tok = toks[name]
    _, _, _, _, want_prefix = TEMPLATES[name]
    pq = pre_query_template(tok, system_prompt="Be brief.")
    assert pq.prefix == want_prefix
    assert "Be brief." in pq.prefix
    rendered = _conversation(tok, system="Be brief.")
    rest = rendered[len(pq.prefix + "Hello there"):]
    assert rendered == pq.prefix + "Hello there" + rest and rest.startswith(pq.end_of_turn)


def test_pre_query_keeps_default_system_prompt(toks):
    assert "You are a default bot." in pre_query_template(toks["smol"]).prefix
    assert "You are a default bot." not in pre_query_template(toks["smol"], system_prompt="Be brief.").prefix
    assert "Cutting Knowledge Date" in pre_query_template(toks["llama3"]).prefix
    assert "Cutting Knowledge Date" not in pre_query_template(toks["llama3"], system_prompt="X").prefix
    # an empty system prompt is a system message too (it replaces the default one)
    empty = pre_query_template(toks["smol"], system_prompt="").prefix
    assert empty == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"


def test_pre_query_errors():
    with pytest.raises(ValueError, match="chat_template"):
        pre_query_template(build_tokenizer(None))
    twice = "{% for m in messages %}{{ m['content'] + m['content'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(ValueError, match="exactly once"):
        pre_query_template(build_tokenizer(twice))
    nothing_after = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="end-of-turn"):
        pre_query_template(build_tokenizer(nothing_after))


# Llama-2 / Mistral-v0.1-style: a space between the user text and the end-of-turn marker.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_pre_query_space_before_end_marker_renders_consistently():
    tok = build_tokenizer(LLAMA2)
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    pq = pre_query_template(tok)
    assert pq.prefix == "<s>[INST] " and pq.end_of_turn == " [/INST]"
    rendered = _conversation(tok)
    assert rendered == pq.prefix + "Hello there" + " [/INST] Hi! What can I do? <|im_end|>"


def test_pre_query_stop_token_is_not_ordinary_text():
    tok = build_tokenizer(LLAMA2)
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    pq = pre_query_template(tok)
    for text in ["What is 2 + 2?", "Add 7 and 9 please.", "Explain DNS - briefly."]:
        assert pq.end_of_turn_id not in tok(text, add_special_tokens=False)["input_ids"], text
    assert tok.convert_ids_to_tokens(pq.end_of_turn_id) == "[/INST]"


def test_pre_query_of_tiny_model(tiny_model):
    pq = il.prompts.pre_query_template(tiny_model.tokenizer)
    assert pq.prefix == "<s><|im_start|>user\n" and pq.end_of_turn == "<|im_end|>\n"
    assert pq.end_of_turn_id == tiny_model.tokenizer.convert_tokens_to_ids("<|im_end|>")


# ---- clean_generations ------------------------------------------------------------------------


def _reasons(rows, **kw):
    kept, dropped = clean_generations(rows, **kw)
    return [r["instruction"] for r in kept], [(r["instruction"], r["drop_reason"]) for r in dropped]


def _g(text, finished=True, **extra):
    return {"raw": text, "finished": finished, **extra}


def test_normalize_text():
    assert normalize_text("  Write a POEM, please! ") == "write a poem please"
    assert normalize_text("Hello,\n\tWORLD...  again?") == "hello world again"
    assert normalize_text("C'est l'été!") == "c est l été"
    assert normalize_text("snake_case stays") == "snake_case stays"  # \w keeps underscores
    assert normalize_text("!!!") == ""


def test_clean_truncated_and_empty():
    kept, dropped = _reasons([
        _g("Write a poem about the sea.", finished=False),  # no end-of-turn: truncated even if it reads well
        _g(""),
        _g("   \n\t "),
        _g("", finished=False),  # truncated wins over empty (rules are applied in order)
        _g("Write a poem about the sea."),
    ])
    assert kept == ["Write a poem about the sea."]
    assert dropped == [("Write a poem about the sea.", "truncated"), ("", "empty"), ("", "empty"), ("", "truncated")]


def test_clean_template_debris():
    rows = [
        _g("Explain DNS.<|im_end|> please"),
        _g("Explain DNS <MYEOT> please"),
        _g("<|im_start|>user\nExplain DNS to me"),
        _g("Explain DNS to me [INST] now"),
        _g("assistant\nDNS is the phone book of the internet."),
        _g("User: explain DNS to me"),
        _g("  model: explain DNS to me"),
        _g("Explain DNS <end_of_turn> to me"),
        _g("Explain how the user login flow works in Django."),  # 'user' inside the text is fine
    ]
    kept, dropped = _reasons(rows, special_tokens=["<MYEOT>"])
    assert kept == ["Explain how the user login flow works in Django."]
    assert [r for _, r in dropped] == ["template_debris"] * 8
    # without special_tokens, a token string the regexes do not know is not debris
    kept, _ = _reasons([_g("Explain DNS <MYEOT> please")])
    assert kept == ["Explain DNS <MYEOT> please"]


def test_clean_length_limits():
    rows = [_g("Hi"), _g("Name a river."), _g("Write a poem about rivers."), _g(" ".join(["word"] * 9))]
    kept, dropped = _reasons(rows)  # defaults: 3..200 words
    assert kept == ["Name a river.", "Write a poem about rivers.", " ".join(["word"] * 9)]
    assert dropped == [("Hi", "too_short")]
    kept, dropped = _reasons(rows, min_words=4, max_words=6)
    assert kept == ["Write a poem about rivers."]
    assert dropped == [("Hi", "too_short"), ("Name a river.", "too_short"), (" ".join(["word"] * 9), "too_long")]
    kept, dropped = _reasons([_g("Summarise"), _g(" ".join(f"w{i}" for i in range(201)))], min_words=1)
    assert kept == ["Summarise"] and dropped[0][1] == "too_long"


def test_clean_not_instruction():
    answers = [
        "Sure! Here is a short poem about the sea.",
        "Hello! How can I help you today?",
        "I'm SmolLM, a helpful AI assistant.",
        "Certainly, the capital of France is Paris.",
        "Here is a summary of the article you sent.",
        "As an AI language model, I cannot browse.",
        "Thank you for your question about DNS.",
        "Please tell me more. How may I assist you today?",  # matched anywhere
    ]
    questions = ["Write a short poem about the sea.", "What is the capital of France?",
                 "Nowadays, how do people learn languages?", "Okapis: where do they live?"]
    kept, dropped = _reasons([_g(t) for t in answers + questions])
    assert [t for t, _ in dropped] == answers
    assert {r for _, r in dropped} == {"not_instruction"}
    assert kept == questions  # "no"/"ok" only count as whole words


def test_clean_duplicates():
    long_a = "Write a short story about a lighthouse keeper who finds a message in a bottle on the shore."
    long_b = long_a.replace("bottle", "bottla")  # one character changed
    rows = [
        _g("Explain how DNS works.", index=10, tag="a"),
        _g(long_a, index=11, tag="b"),
        _g("explain HOW dns works!!", index=12, tag="c"),  # exact duplicate after normalisation
        _g(long_b, index=13, tag="d"),  # near duplicate of index 11
        _g("What is the capital of France?", index=14, tag="e"),
    ]
    kept, dropped = clean_generations(rows)
    assert [r["index"] for r in kept] == [10, 11, 14]  # first occurrence kept, order preserved
    assert [r["tag"] for r in kept] == ["a", "b", "e"]  # extra keys carried over
    assert [(r["index"], r["drop_reason"], r["duplicate_of"]) for r in dropped] == [
        (12, "duplicate", 10), (13, "near_duplicate", 11)]
    assert dropped[0]["tag"] == "c" and dropped[0]["raw"] == "explain HOW dns works!!"
    assert all("duplicate_of" not in r for r in kept)
    # 1.0 disables near duplicates; exact duplicates are still caught
    kept, dropped = clean_generations(rows, near_duplicate_threshold=1.0)
    assert [r["index"] for r in kept] == [10, 11, 13, 14]
    assert [(r["index"], r["drop_reason"]) for r in dropped] == [(12, "duplicate")]
    # without an index, duplicate_of is the kept row's position in the input
    kept, dropped = clean_generations([_g("Name a river now."), _g("Hello there!", finished=False),
                                       _g("name a RIVER now")])
    assert dropped[-1]["drop_reason"] == "duplicate" and dropped[-1]["duplicate_of"] == 0


def test_clean_a_dropped_row_is_not_a_duplicate_source():
    rows = [_g("Write a poem about rain.", finished=False), _g("Write a poem about rain.")]
    kept, dropped = clean_generations(rows)
    assert [r["instruction"] for r in kept] == ["Write a poem about rain."]
    assert [r["drop_reason"] for r in dropped] == ["truncated"]


def test_clean_strips_and_keeps_input_rows_unchanged():
    row = _g("  Name three rivers in Africa.\n", index=3)
    kept, _ = clean_generations([row])
    assert kept[0]["instruction"] == "Name three rivers in Africa." and kept[0]["raw"] == row["raw"]
    assert "instruction" not in row  # the caller's dicts are not modified
    # a row without 'finished' counts as finished
    kept, _ = clean_generations([{"raw": "Name three rivers."}])
    assert len(kept) == 1


@pytest.mark.parametrize("kw", [dict(min_words=0), dict(min_words=5, max_words=4), dict(near_duplicate_threshold=0.0),
                                dict(near_duplicate_threshold=1.5), dict(near_duplicate_threshold=-0.1)])
def test_clean_bad_options(kw):
    with pytest.raises(ValueError):
        clean_generations([_g("Name three rivers.")], **kw)


def test_drop_reasons_order():
    assert DROP_REASONS == ("truncated", "empty", "template_debris", "too_short", "too_long", "not_instruction",
                            "duplicate", "near_duplicate")


# ---- synthesize_instructions on tiny models -----------------------------------------------------




def _synth(model, n, out=None, **kw):
    kw = {"batch_size": 4, "max_new_tokens": 6, "min_words": 1, "progress": False, **kw}
    return il.synthesize_instructions(model, n, out=out, **kw)


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _raw(folder):
    return [json.loads(x) for x in _lines(folder / "raw.jsonl")]


def _no_time(rows):
    """Raw rows without the per-row timing (the only field that differs between identical runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("kw", [
    dict(n=0), dict(n=-3), dict(n=2.0), dict(n=True), dict(n="8"),
    dict(temperature=0.0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
    dict(batch_size=0), dict(max_new_tokens=0), dict(min_words=0), dict(near_duplicate_threshold=0.0),
])
def test_synthesize_bad_arguments(tiny_model, tmp_path, kw):
    n = kw.pop("n", 8)
    with pytest.raises(ValueError):
        _synth(tiny_model, n, out=tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()  # validated before anything is written


def test_synthesize_report_counts(tiny_model, tmp_path):
    out = tmp_path / "s"
    ds = _synth(tiny_model, 8, out=out)
    rep = synthesis_report(ds)
    raw = _raw(out)
    assert rep["generated"] == len(raw) == 8
    assert set(rep["dropped"]) == set(DROP_REASONS)
    assert rep["kept"] + sum(rep["dropped"].values()) == rep["generated"]
    assert rep["kept"] == len(ds)
    assert rep["dropped"]["truncated"] == sum(not r["finished"] for r in raw)
    assert rep["generated_tokens"] == sum(r["n_tokens"] for r in raw)
    assert all(r["n_tokens"] <= 6 for r in raw)
    assert rep["kept_share"] == pytest.approx(rep["kept"] / 8)
    assert [r["index"] for r in raw] == list(range(8)) and [r["batch"] for r in raw] == [0] * 4 + [1] * 4
    assert len({r["seed"] for r in raw}) == 2  # one seed per batch
    assert json.loads((out / "report.json").read_text()) == rep
    settings = json.loads((out / "synthesis.json").read_text())
    assert settings["prefix"] == "<s><|im_start|>user\n" and settings["temperature"] == 1.0
    assert settings["batch_size"] == 4 and settings["max_new_tokens"] == 6


def test_synthesize_kept_rows_and_files(talker, tmp_path):
    out = tmp_path / "s"
    ds = _synth(talker, 32, out=out, batch_size=16, max_new_tokens=16)
    rep = synthesis_report(ds)
    assert rep["kept"] >= 4 and rep["dropped"]["truncated"] >= 1  # both paths are exercised
    assert ds.column_names == ["instruction", "raw", "index", "seed", "n_tokens", "temperature", "top_p",
                               "max_new_tokens", "system_prompt", "model"]
    assert set(ds["temperature"]) == {1.0} and set(ds["top_p"]) == {0.99} and set(ds["max_new_tokens"]) == {16}
    assert set(ds["system_prompt"]) == {None} and set(ds["model"]) == {"tiny-talker"}
    raw = {r["index"]: r for r in _raw(out)}
    for row in ds:
        src = raw[row["index"]]
        assert src["finished"] and row["raw"] == src["raw"] and row["instruction"] == src["raw"].strip()
        assert row["n_tokens"] == src["n_tokens"] and row["seed"] == src["seed"]
    # the files
    written = [json.loads(x) for x in _lines(out / "instructions.jsonl")]
    assert written == ds.to_list()
    dropped = [json.loads(x) for x in _lines(out / "dropped.jsonl")]
    assert len(dropped) == sum(rep["dropped"].values())
    assert all(r["drop_reason"] in DROP_REASONS for r in dropped)
    assert sorted([r["index"] for r in dropped] + list(ds["index"])) == list(range(32))
    assert all((r["drop_reason"] == "truncated") == (not r["finished"]) for r in dropped)
    # a synthesize output folder is an instruction source
    assert il.load_instructions(out) == [x for x in ds["instruction"] if x.strip()]


def test_synthesize_without_out_equals_with_out(talker, tmp_path):
    a = _synth(talker, 16, batch_size=8, max_new_tokens=12)
    b = _synth(talker, 16, out=tmp_path / "s", batch_size=8, max_new_tokens=12)
    assert a.to_list() == b.to_list() and len(a) > 0


def test_synthesize_seed_determinism(tiny_model, tmp_path):
    _synth(tiny_model, 8, out=tmp_path / "a", seed=3)
    _synth(tiny_model, 8, out=tmp_path / "b", seed=3)
    _synth(tiny_model, 8, out=tmp_path / "c", seed=4)
    a, b, c = _raw(tmp_path / "a"), _raw(tmp_path / "b"), _raw(tmp_path / "c")
    assert _no_time(a) == _no_time(b)
    assert [r["raw"] for r in a] != [r["raw"] for r in c]
    assert {r["seed"] for r in a}.isdisjoint({r["seed"] for r in c})


def test_synthesize_restores_caller_rng_and_leaves_model_alone(tiny_model):
    texts = [il.render_chat(tiny_model.tokenizer, "Name a river.")]
    h_before = il.read_last_token(tiny_model, texts, progress=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _synth(tiny_model, 4)
    assert torch.equal(torch.get_rng_state(), state)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    # no hooks or state left behind on the model
    assert torch.equal(il.read_last_token(tiny_model, texts, progress=False), h_before)
    assert not tiny_model.bridge.original_model.training


def test_synthesize_resume_extends_run(tiny_model, tmp_path):
    out = tmp_path / "s"
    _synth(tiny_model, 8, out=out)
    first = _lines(out / "raw.jsonl")
    ds = _synth(tiny_model, 12, out=out)
    lines = _lines(out / "raw.jsonl")
    assert len(lines) == 12 and lines[:8] == first
    assert synthesis_report(ds)["generated"] == 12
    straight = tmp_path / "straight"
    _synth(tiny_model, 12, out=straight)
    assert _no_time(_raw(out)) == _no_time(_raw(straight))
    # a smaller n on a longer run reuses its first rows and leaves raw.jsonl alone
    ds = _synth(tiny_model, 4, out=out)
    assert synthesis_report(ds)["generated"] == 4 and _lines(out / "raw.jsonl") == lines
    # nothing left to generate: the rerun does not append
    _synth(tiny_model, 12, out=out)
    assert _lines(out / "raw.jsonl") == lines


def test_synthesize_repairs_torn_line(tiny_model, tmp_path):
    out = tmp_path / "s"
    _synth(tiny_model, 8, out=out)
    before = (out / "raw.jsonl").read_bytes()
    with (out / "raw.jsonl").open("a") as f:
        f.write('{"raw": "half a li')  # an interrupted write
    ds = _synth(tiny_model, 8, out=out)
    assert (out / "raw.jsonl").read_bytes() == before
    assert [r["index"] for r in _raw(out)] == list(range(8))
    assert synthesis_report(ds)["generated"] == 8


def test_synthesize_repairs_partial_batch(tiny_model, tmp_path):
    out = tmp_path / "s"
    _synth(tiny_model, 8, out=out)
    lines = _lines(out / "raw.jsonl")
    (out / "raw.jsonl").write_text("".join(lines[:6]))  # the second batch of 4 half-written
    _synth(tiny_model, 8, out=out)
    now = _lines(out / "raw.jsonl")
    assert now[:4] == lines[:4]
    rows = _raw(out)
    assert [r["index"] for r in rows] == list(range(8))  # no lost or duplicated indices
    assert _no_time(rows) == _no_time([json.loads(x) for x in lines])  # the batch is regenerated identically


def test_synthesize_repairs_bad_json_line(tiny_model, tmp_path):
    out = tmp_path / "s"
    _synth(tiny_model, 8, out=out)
    lines = _lines(out / "raw.jsonl")
    (out / "raw.jsonl").write_text("".join(lines[:5]) + "not json\n" + "".join(lines[6:]))
    _synth(tiny_model, 8, out=out)
    rows = _raw(out)
    assert [r["index"] for r in rows] == list(range(8))
    assert _no_time(rows) == _no_time([json.loads(x) for x in lines])


@pytest.mark.parametrize("kw,name", [(dict(temperature=0.7), "temperature"), (dict(top_p=0.9), "top_p"),
                                     (dict(max_new_tokens=7), "max_new_tokens"), (dict(batch_size=2), "batch_size"),
                                     (dict(seed=1), "seed"), (dict(system_prompt="Be brief."), "system_prompt")])
def test_synthesize_refuses_other_settings(tiny_model, tmp_path, kw, name):
    out = tmp_path / "s"
    _synth(tiny_model, 4, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=name):
        _synth(tiny_model, 4, out=out, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # clean-up options are not generation settings: changing them is allowed and re-cleans
    ds = _synth(tiny_model, 4, out=out, min_words=2)
    assert synthesis_report(ds)["generated"] == 4


def test_synthesize_refuses_raw_without_settings(tiny_model, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "raw.jsonl").write_text('{"raw": "x", "finished": true}\n')
    with pytest.raises(ValueError, match="synthesis.json"):
        _synth(tiny_model, 4, out=out)
    assert (out / "raw.jsonl").read_text() == '{"raw": "x", "finished": true}\n'


def test_synthesize_n_not_multiple_of_batch(tiny_model, tmp_path):
    out = tmp_path / "s"
    ds = _synth(tiny_model, 10, out=out)
    rep = synthesis_report(ds)
    assert rep["generated"] == 10
    assert rep["kept"] + sum(rep["dropped"].values()) == 10
    dropped = [json.loads(x) for x in _lines(out / "dropped.jsonl")]
    assert sorted([r["index"] for r in dropped] + list(ds["index"])) == list(range(10))
    assert len(_raw(out)) == 12  # whole batches are stored; a rerun with n=12 reuses them
    _synth(tiny_model, 12, out=out)
    assert len(_raw(out)) == 12


def test_synthesize_system_prompt_goes_into_prefix(tiny_model, tmp_path):
    out = tmp_path / "s"
    ds = _synth(tiny_model, 4, out=out, system_prompt="You write questions.")
    settings = json.loads((out / "synthesis.json").read_text())
    assert settings["prefix"] == "<s><|im_start|>system\nYou write questions.<|im_end|>\n<|im_start|>user\n"
    assert settings["system_prompt"] == "You write questions."
    assert synthesis_report(ds)["generated"] == 4


def test_synthesis_report_needs_a_synthesis_dataset():
    from datasets import Dataset

    with pytest.raises(ValueError, match="no synthesis report"):
        synthesis_report(Dataset.from_dict({"instruction": ["x"]}))


def test_clean_apology_from_a_user_is_kept():
    # measured on SmolLM2 (n=512): a user turn starting "I'm sorry for ..." was dropped by a too-broad rule
    user = "I'm sorry for my lack of detail regarding the Proclamation of 1842. Please describe what it entails."
    assistant = "I'm sorry, but I can't help with that request."
    kept, dropped = _reasons([_g(user), _g(assistant)])
    assert kept == [user]
    assert dropped == [(assistant, "not_instruction")]
