"""Self-Refine and SAO pairs: rows, parsing helpers, judge logic with a fake engine, seeds, resuming, shards."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from conftest import INSTRUCTIONS

from icon2_lens.baselines import sao, self_refine
from icon2_lens.gen import Generation

JUDGE_KEYS = {"comparisons", "parsed", "first_position"}


class FakeEngine:
    """Answers each rendered prompt with ``reply(prompt, position in the call)``; records the calls."""

    def __init__(self, reply: Callable[[str, int], str]):
        self.reply = reply
        self.calls: list[list[str]] = []

    def generate(self, prompts, decoding, *, seed=0, **kw):
        self.calls.append(list(prompts))
        return [Generation(t, True, max(1, len(t.split()))) for t in (self.reply(p, k) for k, p in enumerate(prompts))]


def _fake(monkeypatch, module, reply: Callable[[str, int], str]) -> FakeEngine:
    fake = FakeEngine(reply)
    monkeypatch.setattr(module, "engine", lambda model: fake)
    return fake


# --- pure helpers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, winner", [
    ("ranking: 1 > 2", 1), ("ranking: 2 > 1", 2), ("Ranking: 2 > 1", 2), ("ranking:1>2", 1), ("RANKING : 2>1", 2),
    ("ranking:   2   >   1", 2), ("I think so.\nranking: 2 > 1\nBecause ...", 2),
    ("ranking: 1 > 2, then ranking: 2 > 1", 1), ("ranking: 1 > 1", None), ("ranking: 2 > 2", None),
    ("ranking: X > Y", None), ("ranking: 3 > 1", None), ("Response 1 is better.", None), ("", None),
    ("rank: 1 > 2", None), ("ranking 1 > 2", None), ("ranking: 1 < 2", None), ("asdf ranking: > 2", None),
])
def test_parse_ranking(text, winner):
    assert sao.parse_ranking(text) == winner


def test_judge_verdict_one_order_and_both_orders():
    assert sao.judge_verdict(["ranking: 1 > 2"]) == (1, None, {"comparisons": 1, "parsed": 1, "first_position": 1})
    assert sao.judge_verdict(["ranking: 2 > 1"]) == (2, None, {"comparisons": 1, "parsed": 1, "first_position": 0})
    assert sao.judge_verdict(["banana"]) == (None, "unparsed", {"comparisons": 1, "parsed": 0, "first_position": 0})
    # swapped order: "1" there is response 2
    assert sao.judge_verdict(["ranking: 1 > 2", "ranking: 2 > 1"])[:2] == (1, None)
    assert sao.judge_verdict(["ranking: 2 > 1", "ranking: 1 > 2"]) == (
        2, None, {"comparisons": 2, "parsed": 2, "first_position": 1})
    assert sao.judge_verdict(["ranking: 1 > 2", "ranking: 1 > 2"]) == (
        None, "inconsistent", {"comparisons": 2, "parsed": 2, "first_position": 2})
    assert sao.judge_verdict(["ranking: 2 > 1", "ranking: 2 > 1"])[1] == "inconsistent"
    assert sao.judge_verdict(["ranking: 1 > 2", "no idea"]) == (
        None, "unparsed", {"comparisons": 2, "parsed": 1, "first_position": 1})
    with pytest.raises(ValueError):
        sao.judge_verdict([])


@pytest.mark.parametrize("raw, clean", [
    ("User prompt: Plan a three-day trip to Lisbon.", "Plan a three-day trip to Lisbon."),
    ('User prompt: "Plan a trip."', "Plan a trip."),
    ("user prompt:\n\n“How do I fix a tap?”", "How do I fix a tap?"),
    ("**User prompt:** How do I fix a tap?", "How do I fix a tap?"),
    ('"User prompt: Plan a trip."', "Plan a trip."),
    ('User prompt: "Plan a trip."\n\nThis prompt is specific because ...', "Plan a trip."),
    ("  What is a good name for a cat?  ", "What is a good name for a cat?"),
    ('User prompt: "Unclosed quote here', "Unclosed quote here"),
    ("User prompt: Write about the students' union", "Write about the students' union"),
    ("User prompt:", ""), ("  ", ""), ('User prompt: ""', ""),
])
def test_clean_user_prompt(raw, clean):
    assert sao.clean_user_prompt(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("Improved response: The Nile.", "The Nile."), ("**Response:**\nThe Nile.", "The Nile."),
    ("Refined response:  The Nile.", "The Nile."), ("The Nile.", "The Nile."),
    ("Responses vary by region.", "Responses vary by region."), ("Response:", ""),
])
def test_clean_refinement(raw, clean):
    assert self_refine.clean_refinement(raw) == clean


def test_shipped_personas_load_without_duplicates():
    personas = sao.load_personas()
    assert len(personas) >= 100 and len(set(personas)) == len(personas)
    assert all(p and not p.startswith("#") and "\n" not in p for p in personas)


def test_custom_personas_file_and_missing_file(tmp_path):
    f = tmp_path / "people.txt"
    f.write_text("# my personas\nA baker.\n\nA pilot.\nA baker.\n")
    assert sao.load_personas(f) == ["A baker.", "A pilot."]
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        sao.load_personas(missing)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no personas"):
        sao.load_personas(tmp_path / "empty.txt")


def test_configs_validate():
    with pytest.raises(ValueError, match="n_samples"):
        self_refine.SelfRefineConfig(n_samples=0)
    with pytest.raises(ValueError, match="persona_source"):
        sao.SAOConfig(persona_source="hub")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="judge_tokens"):
        sao.SAOConfig(judge_tokens=0)


# --- SAO's wiring with a fake engine ----------------------------------------------------------------------------

def _sao_reply(judge: Callable[[str], str]) -> Callable[[str, int], str]:
    def reply(prompt: str, k: int) -> str:
        if "impartial judge" in prompt:
            return judge(prompt)
        if "Guess a prompt" in prompt:
            persona = prompt.split("following persona may ask you to do:\n\n", 1)[1].split("\n", 1)[0]
            return f'User prompt: "Help {persona}"'
        if "Describe one specific person" in prompt:
            return f"Persona: A baker number {k}."
        return "good answer" if k % 2 == 0 else "bad answer"  # y1 good, y2 bad
    return reply


def _prefers_good(prompt: str) -> str:
    return "ranking: 1 > 2" if "<Response 1> good answer" in prompt else "ranking: 2 > 1"


def test_sao_consistent_judge_keeps_the_winner_in_both_orders(monkeypatch, tiny_model, tmp_path):
    fake = _fake(monkeypatch, sao, _sao_reply(_prefers_good))
    f = tmp_path / "people.txt"
    f.write_text("A baker.\nA pilot.\nA nurse.\n")
    cfg = sao.SAOConfig(personas=str(f), both_orders=True, batch_size=8)
    rows = sao.make_pairs(tiny_model, [{"instruction": q, "criterion": "helpful"} for q in INSTRUCTIONS[:4]], cfg,
                          progress=False)
    assert [r["kept"] for r in rows] == [True] * 4
    assert all(r["chosen"][0]["content"] == "good answer" and r["rejected"][0]["content"] == "bad answer"
               for r in rows)
    assert all(r["judge"] == {"comparisons": 2, "parsed": 2, "first_position": 1} for r in rows)
    assert {r["persona"] for r in rows} == {"A baker.", "A pilot.", "A nurse."}  # 4 rows cycle through 3
    assert all(r["instruction"] == f"Help {r['persona']}" == r["prompt"][0]["content"] for r in rows)
    assert [r["source_instruction"] for r in rows] == INSTRUCTIONS[:4]
    assert all(r["criterion"] == "helpful" and r["winner"] == 1 and len(r["judge_outputs"]) == 2 for r in rows)
    judge_prompts = [p for call in fake.calls for p in call if "impartial judge" in p]
    assert len(judge_prompts) == 8 and "</ Response 1>" in judge_prompts[0]


def test_sao_position_biased_judge(monkeypatch, tiny_model):
    _fake(monkeypatch, sao, _sao_reply(lambda p: "ranking: 1 > 2"))  # always the first shown
    both = sao.make_pairs(tiny_model, INSTRUCTIONS[:3], sao.SAOConfig(both_orders=True), progress=False)
    assert [r["drop_reason"] for r in both] == ["inconsistent"] * 3
    assert all(r["judge"] == {"comparisons": 2, "parsed": 2, "first_position": 2} for r in both)
    one = sao.make_pairs(tiny_model, INSTRUCTIONS[:3], sao.SAOConfig(), progress=False)  # the paper: one order
    assert all(r["kept"] and r["winner"] == 1 and r["judge"]["first_position"] == 1 for r in one)


def test_sao_drops(monkeypatch, tiny_model):
    _fake(monkeypatch, sao, _sao_reply(lambda p: "I like both."))
    assert {r["drop_reason"] for r in sao.make_pairs(tiny_model, INSTRUCTIONS[:2], progress=False)} == {"unparsed"}

    def no_prompt(prompt: str, k: int) -> str:
        return "User prompt:" if "Guess a prompt" in prompt else "same"
    fake = _fake(monkeypatch, sao, no_prompt)
    rows = sao.make_pairs(tiny_model, INSTRUCTIONS[:2], progress=False)
    assert [r["drop_reason"] for r in rows] == ["no prompt"] * 2 and len(fake.calls) == 1  # nothing else asked
    assert all(r["judge"] == {"comparisons": 0, "parsed": 0, "first_position": 0} for r in rows)
    _fake(monkeypatch, sao, lambda p, k: "User prompt: Hi" if "Guess a prompt" in p else "same")
    assert {r["drop_reason"] for r in sao.make_pairs(tiny_model, INSTRUCTIONS[:2], progress=False)} == {
        "identical responses"}


def test_sao_model_personas(monkeypatch, tiny_model):
    _fake(monkeypatch, sao, _sao_reply(_prefers_good))
    rows = sao.make_pairs(tiny_model, INSTRUCTIONS[:3], sao.SAOConfig(persona_source="model"), progress=False)
    assert [r["persona"] for r in rows] == [f"A baker number {k}." for k in range(3)]
    assert all(r["kept"] for r in rows)
    _fake(monkeypatch, sao, lambda p, k: "" if "Describe one specific person" in p else "x")
    rows = sao.make_pairs(tiny_model, INSTRUCTIONS[:2], sao.SAOConfig(persona_source="model"), progress=False)
    assert {r["drop_reason"] for r in rows} == {"no persona"}


def test_sao_missing_personas_file_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        sao.make_pairs(tiny_model, INSTRUCTIONS[:1], sao.SAOConfig(personas=str(tmp_path / "nope.txt")),
                       progress=False)


# --- Self-Refine's wiring with a fake engine --------------------------------------------------------------------

def test_self_refine_chosen_is_the_refinement(monkeypatch, tiny_model):
    def reply(prompt: str, k: int) -> str:
        if "Give short, specific feedback" in prompt:
            return "Be more specific."
        if "Use the feedback" in prompt:
            return "Improved response: A better answer."
        return f"sample {k}"
    fake = _fake(monkeypatch, self_refine, reply)
    rows = self_refine.make_pairs(tiny_model, INSTRUCTIONS[:3], self_refine.SelfRefineConfig(batch_size=4),
                                  progress=False)
    assert all(r["kept"] and r["chosen"][0]["content"] == "A better answer." for r in rows)
    assert [r["rejected"][0]["content"] for r in rows] == [f"sample {3 * i + r['rejected_index']}"
                                                           for i, r in enumerate(rows)]
    assert all(r["feedback"] == "Be more specific." and r["samples"] == 3 and r["refined_finished"] for r in rows)
    assert all(r["judge"] == {"comparisons": 1, "parsed": 1, "first_position": None} for r in rows)
    refine_prompts = fake.calls[2]
    for i, r in enumerate(rows):  # the refined sample is the one drawn, with its feedback
        assert f"Response:\nsample {3 * i + r['refined_index']}\n" in refine_prompts[i]
        assert "Feedback:\nBe more specific." in refine_prompts[i]


def test_self_refine_drops(monkeypatch, tiny_model):
    _fake(monkeypatch, self_refine, lambda p, k: "" if "Use the feedback" in p or "feedback on this" in p else "x")
    rows = self_refine.make_pairs(tiny_model, INSTRUCTIONS[:2], progress=False)
    assert {r["drop_reason"] for r in rows} == {"empty refinement"}
    assert all(r["judge"] == {"comparisons": 1, "parsed": 0, "first_position": None} for r in rows)
    _fake(monkeypatch, self_refine, lambda p, k: "same")
    assert {r["drop_reason"] for r in self_refine.make_pairs(tiny_model, INSTRUCTIONS[:2], progress=False)} == {
        "unchanged"}


# --- on the tiny model: rows, seeds, resuming, shards, costs ----------------------------------------------------

@pytest.mark.parametrize("module, cfg", [
    (self_refine, self_refine.SelfRefineConfig(max_new_tokens=4, feedback_tokens=4, batch_size=2)),
    (sao, sao.SAOConfig(max_new_tokens=4, judge_tokens=4, batch_size=2)),
    (sao, sao.SAOConfig(max_new_tokens=4, judge_tokens=4, batch_size=2, both_orders=True, persona_source="model",
                        persona_tokens=4)),
], ids=["self_refine", "sao", "sao-model-both"])
def test_seeded_resumable_shardable(module, cfg, tiny_model, tmp_path):
    qs = INSTRUCTIONS[:5]
    ref = module.make_pairs(tiny_model, qs, cfg, seed=3, out=tmp_path / "ref", progress=False)
    assert [r["index"] for r in ref] == list(range(5)) and all(r["method"] == module.METHOD for r in ref)
    costs = json.loads((tmp_path / "ref" / "costs.json").read_text())
    assert {"generation", "labelling"} <= set(costs["phases"])
    assert costs["phases"]["generation"]["generated_tokens"] > 0 and costs["phases"]["labelling"]["prompt_tokens"] > 0
    assert costs["rows"] == sum(r["kept"] for r in ref)
    for r in ref:
        assert isinstance(r["kept"], bool) and set(r["judge"]) == JUDGE_KEYS
        assert r["kept"] == (r["drop_reason"] is None)
        if module is sao:
            assert r["source_instruction"] == qs[r["index"]] and r["persona"]
        else:
            assert r["instruction"] == qs[r["index"]] and r["samples"] == 3
            assert r["judge"]["comparisons"] == 1 and r["judge"]["first_position"] is None
    assert module.make_pairs(tiny_model, qs, cfg, seed=3, progress=False) == ref  # same seed, same rows
    again = module.make_pairs(tiny_model, qs, cfg, seed=3, out=tmp_path / "ref", progress=False)  # resumed: done
    assert again == ref
    lines = (tmp_path / "ref" / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(5))  # nothing duplicated by the rerun
    parts = [module.make_pairs(tiny_model, qs, cfg, seed=3, out=tmp_path / f"s{i}", shard=(i, 2), progress=False)
             for i in range(2)]
    assert sorted((r for p in parts for r in p), key=lambda r: r["index"]) == ref


def test_resume_after_a_partial_run(tiny_model, tmp_path):
    cfg = sao.SAOConfig(max_new_tokens=4, judge_tokens=4, batch_size=2)
    ref = sao.make_pairs(tiny_model, INSTRUCTIONS[:4], cfg, seed=1, out=tmp_path / "a", progress=False)
    path = tmp_path / "a" / "pairs.jsonl"
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:3]))  # batch 1 half written
    again = sao.make_pairs(tiny_model, INSTRUCTIONS[:4], cfg, seed=1, out=tmp_path / "a", progress=False)
    assert again == ref and len(path.read_text().splitlines()) == 4


def test_sao_forced_judge_reads_the_verdict_from_log_probabilities(tiny_model, tmp_path):
    from icon2_lens.baselines import sao as sao_mod

    cfg = sao_mod.SAOConfig(max_new_tokens=4, persona_tokens=4, judge_format="forced", both_orders=True,
                            batch_size=2)
    rows = sao_mod.make_pairs(tiny_model, INSTRUCTIONS[:4], cfg, seed=1, out=tmp_path / "f", progress=False)
    judged = [r for r in rows if r["judge"]["comparisons"]]
    assert judged and all(r["judge"]["parsed"] == r["judge"]["comparisons"] == 2 for r in judged)  # always parses
    for r in judged:
        assert all(o in ("ranking: 1 > 2", "ranking: 2 > 1") for o in r["judge_outputs"])
        assert r["kept"] == (r["judge_outputs"][0] != r["judge_outputs"][1])  # swapped order: consistent = differ
    assert json.loads((tmp_path / "f" / "generation.json").read_text())["judge_format"] == "forced"
    with pytest.raises(ValueError, match="judge_format"):
        sao_mod.SAOConfig(judge_format="banana")  # type: ignore[arg-type]
