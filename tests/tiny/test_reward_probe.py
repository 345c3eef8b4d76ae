"""RewardProbeScorer: fitted on human-written better/worse answers, a Scorer, with held-out preference accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import icon2_lens as il
from icon2_lens.judges import Scorer
from icon2_lens.layers import builtin_response_pairs
from icon2_lens.math.probe import probe_scores
from icon2_lens.prompts import render_chat
from icon2_lens.reward_probe import RewardProbeScorer, fit_probe, middle_third, wilson_interval

from conftest import INSTRUCTIONS


@dataclass(frozen=True)
class Pref:
    """The attributes of `icon2_lens.preference.PreferencePair` that the probe reads."""

    prompt: str
    chosen: str
    rejected: str
    criterion: str


PAIRS = {"helpful": [("How do I boil an egg?", "Simmer it for 9 minutes, then cool it.", "Figure it out."),
                     ("Name a river.", "The Nile.", "No.")],
         "honest": [("Is the earth flat?", "No, it is round.", "Yes, it is flat."),
                    ("Can you see me?", "No, I cannot see you.", "Yes, I see you clearly."),
                    ("What is 2+2?", "4.", "5.")]}


@pytest.fixture(scope="module")
def probe(tiny_model):
    return RewardProbeScorer.fit(tiny_model, layers=[1, 2], pairs=PAIRS, batch_size=3)


def _read(model, qs, answers, layers):
    texts = [render_chat(model.tokenizer, q, assistant=a) for q, a in zip(qs, answers)]
    return il.read_last_token(model, texts, layers=layers, progress=False)


def test_middle_third_and_wilson():
    assert middle_third(30) == list(range(10, 20)) and middle_third(4) == [1] and middle_third(1) == [0]
    assert middle_third(12) == [4, 5, 6, 7]
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.85 < lo < 1.0
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0 < hi < 0.3
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_fit_probe_is_the_unit_mean_difference():
    g = torch.randn(5, 3, 8) + torch.tensor([1.0] + [0.0] * 7)
    b = torch.randn(5, 3, 8)
    u, mean, std = fit_probe(g, b)
    want = (g - b).mean(0)
    torch.testing.assert_close(u, want / want.norm(dim=-1, keepdim=True))
    proj = torch.einsum("nld,ld->nl", torch.cat([g, b]), u)
    torch.testing.assert_close(mean, proj.mean(0))
    torch.testing.assert_close(std, proj.std(0, unbiased=False))
    with pytest.raises(ValueError, match="no direction"):
        fit_probe(b, b)
    with pytest.raises(ValueError, match="one shape"):
        fit_probe(g, b[:4])


def test_fit_equals_a_direct_computation(tiny_model, probe):
    assert isinstance(probe, Scorer) and probe.name == "reward_probe"
    assert probe.layers == [1, 2] and probe.mode == "pooled" and probe.groups == ["all"]
    assert probe.vectors.shape == (1, 2, tiny_model.d_model)
    assert probe.fit_counts == {"helpful": 2, "honest": 3} and len(probe.fit_sha256) == 64
    rows = [t for c in sorted(PAIRS) for t in PAIRS[c]]
    good = _read(tiny_model, [q for q, _, _ in rows], [a for _, a, _ in rows], [1, 2])
    bad = _read(tiny_model, [q for q, _, _ in rows], [a for _, _, a in rows], [1, 2])
    u, mean, std = fit_probe(good, bad)
    torch.testing.assert_close(probe.vectors[0], u)
    torch.testing.assert_close(probe.mean[0], mean)
    torch.testing.assert_close(probe.std[0], std)
    # a score is the mean over layers of the standardised projection; pooled: the criterion does not matter
    qs, rs = ["Name a river.", "What is 2+2?", "Hi"], ["The Amazon.", "", "Hello there."]
    got = probe(qs, rs, ["helpful", "honest", "kindness"])
    h = _read(tiny_model, qs, [r if r.strip() else " " for r in rs], [1, 2])
    want = probe_scores(h, u[None], mean=mean[None], std=std[None])[:, 0]
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert probe(qs, rs, ["honest"] * 3) == pytest.approx(got, abs=1e-6)
    assert probe([], [], []) == []
    with pytest.raises(ValueError, match="same length"):
        probe(qs, rs[:2], ["helpful"] * 3)


def test_default_fit_uses_the_builtin_pairs_and_the_middle_third(tiny_model):
    rp = RewardProbeScorer.fit(tiny_model)
    assert rp.layers == middle_third(tiny_model.n_layers) == [1]
    assert rp.fit_counts == {c: len(v) for c, v in builtin_response_pairs().items()}
    assert rp.describe() == {"name": "reward_probe", "mode": "pooled", "layers": [1], "hook": "resid_post",
                             "fit_pairs": rp.fit_counts, "fit_sha256": rp.fit_sha256}


def test_per_criterion_mode(tiny_model, probe):
    per = RewardProbeScorer.fit(tiny_model, layers=[1, 2], pairs=PAIRS, mode="per_criterion")
    assert per.groups == ["helpful", "honest"] and per.vectors.shape[0] == 2
    rows = PAIRS["honest"]
    good = _read(tiny_model, [q for q, _, _ in rows], [a for _, a, _ in rows], [1, 2])
    bad = _read(tiny_model, [q for q, _, _ in rows], [a for _, _, a in rows], [1, 2])
    torch.testing.assert_close(per.vectors[1], fit_probe(good, bad)[0])
    a = per(["Q"] * 2, ["An answer."] * 2, ["helpful", "honest"])
    assert a[0] != pytest.approx(a[1])  # each row along its own criterion
    with pytest.raises(ValueError, match="no direction for \\['kindness'\\]"):
        per(["Q"], ["A"], ["kindness"])
    with pytest.raises(ValueError, match="Unknown mode"):
        RewardProbeScorer.fit(tiny_model, pairs=PAIRS, mode="mixed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No response pairs"):
        RewardProbeScorer.fit(tiny_model, pairs={"helpful": []})


def test_accuracy_counts_pairs_where_chosen_scores_higher(probe):
    prefs = [Pref("Name a river.", "The Nile.", "No.", "helpful"),
             Pref("Is the sky green?", "No, it is blue.", "Yes.", "honest"),
             Pref("What is 3+3?", "6.", "7.", "honest"),
             Pref("Say hi.", "Hi!", "Go away.", "helpful"),
             Pref("Say bye.", "Bye!", "Bye!!", "harmless")]
    acc = probe.accuracy(prefs)
    chosen = probe([p.prompt for p in prefs], [p.chosen for p in prefs], [p.criterion for p in prefs])
    rejected = probe([p.prompt for p in prefs], [p.rejected for p in prefs], [p.criterion for p in prefs])
    wins = [c > r for c, r in zip(chosen, rejected)]
    assert acc["n"] == 5 and acc["accuracy"] == pytest.approx(sum(wins) / 5)
    assert set(acc["per_criterion"]) == {"harmless", "helpful", "honest"}
    assert acc["per_criterion"]["honest"] == {"accuracy": pytest.approx(sum(wins[1:3]) / 2), "n": 2,
                                              "ci_low": pytest.approx(wilson_interval(sum(wins[1:3]), 2)[0]),
                                              "ci_high": pytest.approx(wilson_interval(sum(wins[1:3]), 2)[1])}
    assert acc["ci_low"] <= acc["accuracy"] <= acc["ci_high"] and acc["level"] == 0.9
    # swapping chosen and rejected turns every win into a loss (no ties here)
    swapped = probe.accuracy([Pref(p.prompt, p.rejected, p.chosen, p.criterion) for p in prefs])
    assert swapped["accuracy"] == pytest.approx(1 - acc["accuracy"])
    with pytest.raises(ValueError, match="No preference pairs"):
        probe.accuracy([])


def test_accuracy_on_the_shipped_preference_set(probe):
    pairs = il.load_preference_set(split="test")  # shipped with the package: a missing set is a failure
    acc = probe.accuracy(pairs)
    assert acc["n"] == len(pairs) and sum(v["n"] for v in acc["per_criterion"].values()) == len(pairs)


def test_cosine_with_the_steering_directions(tiny_model, probe):
    dirs = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    cos = probe.cosine_with(dirs)
    assert set(cos) == {"helpful", "honest"} and all(-1 <= v <= 1 for v in cos.values())
    want = torch.nn.functional.cosine_similarity(probe.vectors[0], dirs.vectors[0, [1, 2]], dim=-1).mean()
    assert cos["helpful"] == pytest.approx(want.item(), abs=1e-5)
