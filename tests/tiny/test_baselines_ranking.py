"""Sampling-Ranking and Self-Rewarding (icon2_lens.baselines.sampling_ranking / self_rewarding) on the tiny model:
selection logic, judge statistics, seeding, resuming, sharding and the cost phases."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import INSTRUCTIONS, build_tokenizer

import icon2_lens as il
from icon2_lens.baselines import sampling_ranking as sr
from icon2_lens.baselines import self_rewarding as sw
from icon2_lens.gen import Generation, engine

QS = INSTRUCTIONS[:5]


class Length:
    """A deterministic pointwise scorer: longer is better."""

    name = "length"

    def __call__(self, instructions, responses, criteria):
        return [float(len(r)) for r in responses]


class Constant:
    name = "constant"

    def __call__(self, instructions, responses, criteria):
        return [1.0] * len(responses)


def _sr_cfg(**kw: Any) -> sr.SamplingRankingConfig:
    return sr.SamplingRankingConfig(**{"k": 3, "max_new_tokens": 4, "batch_size": 2, **kw})


def _sw_cfg(**kw: Any) -> sw.SelfRewardingConfig:
    return sw.SelfRewardingConfig(**{"k": 3, "max_new_tokens": 4, "batch_size": 2, **kw})


def _samples(model, rows: list[dict[str, Any]], cfg) -> dict[int, list[Generation]]:
    """Regenerate each row's k samples from its batch seed (one generate call per batch, k copies per row)."""
    eng = engine(model)
    out: dict[int, list[Generation]] = {}
    for b in sorted({r["batch"] for r in rows}):
        batch = [r for r in rows if r["batch"] == b]
        prompts = [il.render_chat(model.tokenizer, r["instruction"]) for r in batch for _ in range(cfg.k)]
        gen = eng.generate(prompts, cfg.decoding(do_sample=True), seed=batch[0]["seed"])
        for i, r in enumerate(batch):
            out[r["index"]] = gen[i * cfg.k:(i + 1) * cfg.k]
    return out


def _check_common(rows: list[dict[str, Any]], method: str, k: int) -> None:
    assert [r["index"] for r in rows] == list(range(len(QS)))
    assert [r["instruction"] for r in rows] == QS
    for r in rows:
        assert r["method"] == method and isinstance(r["kept"], bool) and r["k"] == k
        assert set(r["judge"]) == {"comparisons", "parsed", "first_position"}
        assert len(r["scores"]) == k and 0 <= r["n_finished_samples"] <= k


# --- pure helpers -----------------------------------------------------------------------------------------------


def test_selection_helpers():
    assert sr.best_and_worst([0.2, 0.9, -1.0, 0.9, -1.0]) == (1, 2)  # first of equal maxima / minima
    assert sr.best_and_worst([3.0, 3.0, 3.0]) is None  # a tie
    assert sr.best_and_worst([None, 2.0, None, 1.0]) == (1, 3)
    assert sr.best_and_worst([None, 2.0]) is None and sr.best_and_worst([]) is None
    assert sr.distinct(["x", "y", "x"]) == (["x", "y"], [0, 1, 0])
    assert sr.judge_stats(6, 6, 2) == {"comparisons": 6, "parsed": 6, "first_position": 2}
    assert sr.judge_stats(9, 4) == {"comparisons": 9, "parsed": 4, "first_position": None}
    with pytest.raises(ValueError):
        sr.judge_stats(2, 3)


def test_win_scores_cancel_position_bias():
    # 0 beats 1 in both orders; 2 is always shown-first-wins (pure position bias against both)
    p = [[None, 0.9, 0.6], [0.2, None, 0.6], [0.6, 0.6, None]]
    s = sw.win_scores(p)
    assert s == pytest.approx([(0.85 + 0.5) / 2, (0.15 + 0.5) / 2, 0.5])
    assert sw.win_scores([[None, 0.7], [0.7, None]]) == [0.5, 0.5]  # a judge that only reads the position: a tie
    assert sr.best_and_worst(sw.win_scores([[None, 0.7], [0.7, None]])) is None
    assert sw.win_scores([[None]]) == [0.5]
    assert sum(sw.win_scores(p)) == pytest.approx(1.5)  # each comparison's probability mass is shared


def test_additive_parsing():
    assert sw.parse_score("Good. Score: 4") == 4.0 and sw.parse_score("Score: 2.5.") == 2.5
    assert sw.parse_score("Score: five") is None and sw.parse_score("Score: 1.2.3") is None
    assert sw.additive_scores([["Score: 4", "bad", "Score: 2"], ["nothing"]]) == ([3.0, None], 2)
    text = sw.additive_prompt("Q?", "R.")
    assert "User: Q?\n<response>R.</response>\n" in text
    assert text.startswith("Review the user’s question")  # noqa: RUF001 (the paper's quote)


def test_cai_prompt_is_the_constitutional_ai_format():
    text = sw.cai_prompt("Q?", "first", "second")
    assert text == ("Consider the following conversation between a human and an assistant:\nHuman: Q?\n"
                    "Please choose the response that is the most helpful, honest, and harmless.\n"
                    "Options:\n(A) first\n(B) second")


def test_configs_validate():
    assert (sr.SamplingRankingConfig().k, sr.SamplingRankingConfig().temperature) == (5, 0.8)
    assert (sw.SelfRewardingConfig().temperature, sw.SelfRewardingConfig().top_p) == (0.7, 0.9)
    with pytest.raises(ValueError, match="k must"):
        sr.SamplingRankingConfig(k=1)
    with pytest.raises(ValueError, match="Unknown judge"):
        sw.SelfRewardingConfig(judge="vibes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="judge_samples"):
        sw.SelfRewardingConfig(judge_samples=0)


# --- sampling_ranking -------------------------------------------------------------------------------------------


def test_sampling_ranking_picks_best_and_worst_sample(tiny_model, tmp_path):
    cfg = _sr_cfg()
    rows = sr.make_pairs(tiny_model, QS, cfg, scorer_object=Length(), seed=3, out=tmp_path / "ref", progress=False)
    _check_common(rows, "sampling_ranking", 3)
    samples = _samples(tiny_model, rows, cfg)
    for r in rows:
        texts = [g.text for g in samples[r["index"]]]
        assert r["scores"] == [float(len(t)) for t in texts] and r["scorer"] == "length"
        assert r["judge"] == {"comparisons": len(set(texts)), "parsed": len(set(texts)), "first_position": None}
        assert r["n_finished_samples"] == sum(g.finished for g in samples[r["index"]])
        if r["kept"]:
            c, j = r["chosen_rank_index"], r["rejected_rank_index"]
            assert r["chosen"][0]["content"] == texts[c] != r["rejected"][0]["content"] == texts[j]
            assert r["scores"][c] == max(r["scores"]) and r["scores"][j] == min(r["scores"])
            assert r["chosen_finished"] == samples[r["index"]][c].finished
        else:
            assert r["drop_reason"] == "tie" and len(set(r["scores"])) == 1
    assert sum(r["kept"] for r in rows) >= 3

    costs = json.loads((tmp_path / "ref" / "costs.json").read_text())
    assert costs["phases"]["generation"]["generated_tokens"] > 0
    assert costs["phases"]["generation"]["prompt_tokens"] > 0
    assert "labelling" in costs["phases"]  # a fake scorer runs no model: no tokens to count
    assert costs["rows"] == sum(r["kept"] for r in rows)
    assert json.loads((tmp_path / "ref" / "generation.json").read_text())["scorer_name"] == "length"

    # resumable: a rerun into the same folder returns the same rows and writes nothing more
    again = sr.make_pairs(tiny_model, QS, cfg, scorer_object=Length(), seed=3, out=tmp_path / "ref", progress=False)
    assert again == rows
    lines = (tmp_path / "ref" / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(len(QS)))
    # another scorer is another run
    with pytest.raises(ValueError, match="other settings"):
        sr.make_pairs(tiny_model, QS, cfg, scorer_object=Constant(), seed=3, out=tmp_path / "ref", progress=False)
    # seeded: same seed, same rows (no folder); another seed, other samples
    assert sr.make_pairs(tiny_model, QS, cfg, scorer_object=Length(), seed=3, progress=False) == rows
    other = sr.make_pairs(tiny_model, QS, cfg, scorer_object=Length(), seed=4, progress=False)
    assert [r["scores"] for r in other] != [r["scores"] for r in rows]
    # shardable: two shards' rows are the unsharded rows
    parts = [sr.make_pairs(tiny_model, QS, cfg, scorer_object=Length(), seed=3, out=tmp_path / f"s{i}",
                           shard=(i, 2), progress=False) for i in range(2)]
    assert sorted((r for p in parts for r in p), key=lambda r: r["index"]) == rows


def test_sampling_ranking_all_equal_scores_is_a_tie(tiny_model):
    rows = sr.make_pairs(tiny_model, QS[:3], _sr_cfg(), scorer_object=Constant(), progress=False)
    assert all(not r["kept"] and r["drop_reason"] == "tie" and r["chosen"] is None for r in rows)
    assert all(r["scores"] == [1.0] * 3 and r["chosen_rank_index"] is None for r in rows)


def test_sampling_ranking_default_scorer_is_the_reward_probe(tiny_model, tmp_path):
    rows = sr.make_pairs(tiny_model, QS[:3], _sr_cfg(), seed=1, out=tmp_path / "probe", progress=False)
    assert all(r["scorer"] == "reward_probe" for r in rows) and any(r["kept"] for r in rows)
    probe = il.reward_probe.RewardProbeScorer.fit(tiny_model)
    samples = _samples(tiny_model, rows, _sr_cfg())
    for r in rows:
        want = probe([r["instruction"]] * 3, [g.text for g in samples[r["index"]]], ["general"] * 3)
        assert r["scores"] == pytest.approx(want, abs=1e-4)
    costs = json.loads((tmp_path / "probe" / "costs.json").read_text())
    assert all(costs["phases"][p]["prompt_tokens"] > 0 for p in ("generation", "labelling"))
    assert json.loads((tmp_path / "probe" / "generation.json").read_text())["scorer_name"] == "reward_probe"


def test_sampling_ranking_with_a_reward_model_folder(tiny_model, tmp_path):
    """``scorer="folder"`` opens an HF sequence-classification reward model; its forwards are counted as labelling."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rows = sr.make_pairs(tiny_model, QS[:2], _sr_cfg(scorer=str(tmp_path / "rm")), out=tmp_path / "out",
                         progress=False)
    assert all(r["scorer"] == f"reward_model:{tmp_path / 'rm'}" for r in rows) and any(r["kept"] for r in rows)
    costs = json.loads((tmp_path / "out" / "costs.json").read_text())
    assert costs["phases"]["labelling"]["prompt_tokens"] > 0 and costs["phases"]["labelling"]["forward_passes"] >= 1
    saved = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert saved["scorer_name"] == f"reward_model:{tmp_path / 'rm'}" and saved["scorer"] == str(tmp_path / "rm")


# --- self_rewarding ---------------------------------------------------------------------------------------------


def test_self_rewarding_cai_judge(tiny_model, tmp_path):
    cfg = _sw_cfg(judge_batch_size=5)
    rows = sw.make_pairs(tiny_model, QS, cfg, seed=3, out=tmp_path / "ref", progress=False)
    _check_common(rows, "self_rewarding", 3)
    samples = _samples(tiny_model, rows, cfg)
    for r in rows:
        texts = [g.text for g in samples[r["index"]]]
        u = len(set(texts))
        assert r["judge_kind"] == "cai_logprob"
        assert r["judge"]["comparisons"] == r["judge"]["parsed"] == u * (u - 1)  # every pair, both orders
        assert 0 <= r["judge"]["first_position"] <= r["judge"]["parsed"]
        assert all(0.0 <= s <= 1.0 for s in r["scores"])
        if r["kept"]:
            c, j = r["chosen_rank_index"], r["rejected_rank_index"]
            assert r["chosen"][0]["content"] == texts[c] != r["rejected"][0]["content"] == texts[j]
            assert r["scores"][c] == max(r["scores"]) and r["scores"][j] == min(r["scores"])
    assert any(r["kept"] for r in rows)

    # the scores are the judge's own: recompute one row's from the next-token logits
    r = rows[0]
    texts = [g.text for g in samples[0]]
    tok = tiny_model.tokenizer
    a, b = tok("A", add_special_tokens=False)["input_ids"][0], tok("B", add_special_tokens=False)["input_ids"][0]
    p: list[list[float | None]] = [[None] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(3):
            if i != j:
                prompt = il.render_chat(tok, sw.cai_prompt(r["instruction"], texts[i], texts[j]),
                                        assistant="The answer is: (")
                assert prompt.endswith("The answer is: (")
                logits = engine(tiny_model).next_token_logits([prompt])[0]
                p[i][j] = float(logits[[a, b]].double().softmax(-1)[0])
    assert r["scores"] == pytest.approx(sw.win_scores(p), abs=1e-5)

    costs = json.loads((tmp_path / "ref" / "costs.json").read_text())
    assert costs["phases"]["generation"]["generated_tokens"] > 0
    assert costs["phases"]["labelling"]["prompt_tokens"] > costs["phases"]["generation"]["prompt_tokens"]
    assert costs["phases"]["labelling"]["generated_tokens"] == 0  # a log-prob judge generates nothing

    assert sw.make_pairs(tiny_model, QS, cfg, seed=3, out=tmp_path / "ref", progress=False) == rows  # resumed
    lines = (tmp_path / "ref" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == len(QS)
    assert sw.make_pairs(tiny_model, QS, cfg, seed=3, progress=False) == rows  # seeded
    other = sw.make_pairs(tiny_model, QS, cfg, seed=4, progress=False)
    assert [x["chosen"] for x in other] != [x["chosen"] for x in rows]
    parts = [sw.make_pairs(tiny_model, QS, cfg, seed=3, out=tmp_path / f"s{i}", shard=(i, 2), progress=False)
             for i in range(2)]
    assert sorted((x for part in parts for x in part), key=lambda x: x["index"]) == rows


class _ScoringEngine:
    """The real engine for the candidates; a fake additive judge that replies ``Score: len(response) % 4`` (and
    something unparseable for every third judgement)."""

    def __init__(self, real):
        self.real, self.tokenizer, self.judged = real, real.tokenizer, 0

    def generate(self, prompts, decoding, *, seed=0, **kw):
        if "additive 5-point" not in prompts[0]:
            return self.real.generate(prompts, decoding, seed=seed, **kw)
        out = []
        for p, s in zip(prompts, seed, strict=True):  # per-row seeds for the judge
            self.judged += 1
            response = p.split("<response>", 1)[1].split("</response>", 1)[0]
            text = "Hmm." if s % 3 == 0 else f"Fine. Score: {len(response) % 4}"
            out.append(Generation(text, True, 4))
        return out

    def next_token_logits(self, *a, **kw):
        raise AssertionError("the additive judge reads no logits")


def test_self_rewarding_additive_judge(tiny_model, tmp_path, monkeypatch):
    fake = _ScoringEngine(engine(tiny_model))
    monkeypatch.setattr(sw, "engine", lambda model: fake)
    cfg = _sw_cfg(judge="additive", judge_samples=3, judge_batch_size=4)
    rows = sw.make_pairs(tiny_model, QS, cfg, seed=3, out=tmp_path / "add", progress=False)
    _check_common(rows, "self_rewarding", 3)
    samples = _samples(tiny_model, rows, cfg)
    assert fake.judged == sum(r["judge"]["comparisons"] for r in rows)
    assert 0 < sum(r["judge"]["parsed"] for r in rows) < fake.judged  # some replies unparseable, dropped
    assert any(r["kept"] for r in rows)
    for r in rows:
        texts = [g.text for g in samples[r["index"]]]
        assert r["judge_kind"] == "additive" and r["judge"]["first_position"] is None
        assert r["judge"]["comparisons"] == 3 * len(set(texts)) and 0 <= r["judge"]["parsed"] <= 3 * len(set(texts))
        for t, s in zip(texts, r["scores"], strict=True):
            assert s is None or s == len(t) % 4  # every parsed judgement of a text gives the same score
        if r["kept"]:
            c, j = r["chosen_rank_index"], r["rejected_rank_index"]
            assert r["chosen"][0]["content"] == texts[c] and r["rejected"][0]["content"] == texts[j]
            assert r["scores"][c] > r["scores"][j]
        else:
            assert r["drop_reason"] in ("tie", "unparsed")
    again = sw.make_pairs(tiny_model, QS, cfg, seed=3, progress=False)
    assert again == rows  # the judge's per-row seeds: seeded too
    costs = json.loads((tmp_path / "add" / "costs.json").read_text())
    assert costs["phases"]["generation"]["generated_tokens"] > 0 and "labelling" in costs["phases"]


def test_self_rewarding_additive_on_the_model_itself(tiny_model):
    """The real additive path: a random model never writes "Score: N", so every row is dropped as unparsed."""
    cfg = _sw_cfg(judge="additive", judge_max_new_tokens=4)
    rows = sw.make_pairs(tiny_model, QS[:2], cfg, progress=False)
    assert all(not r["kept"] and r["drop_reason"] == "unparsed" for r in rows)
    assert all(r["judge"]["comparisons"] == 9 and r["judge"]["parsed"] == 0 for r in rows)
    assert all(r["scores"] == [None] * 3 for r in rows)
