"""icon2_lens.preference without a model: the shipped held-out set, user files, the metrics and their Markdown."""

from __future__ import annotations

import hashlib
import io
import json
import re
import statistics
from collections import Counter

import pytest
import torch

from icon2_lens.instructions import BUILTIN_SETS, builtin_instructions
from icon2_lens.layers import builtin_paraphrases, builtin_response_pairs
from icon2_lens.preference import (
    PairLogprobs,
    PreferencePair,
    check_held_out,
    load_preference_set,
    model_contrasts,
    preference_metrics,
    preference_set_sha256,
)
from icon2_lens.reports import preference_figure, preference_markdown

CRITERIA = ("helpful", "honest", "harmless")
# The shipped set is frozen: a figure reported on it is only comparable with another on the same pairs. If you change
# the set on purpose, record the new hashes here (and say so in the changelog).
SHA_ALL = "d4379dace21217890e5d966277f7330b31d6592c3052d4dca37ed381a6c5294b"
SHA_TEST = "be3501cbb403ff637e2445c6ff9fd3fa06bbc9650366f970812810164f3dfaa9"
SHA_DEV = "2fdecc2c97693d21f5e07d9a2aa408226bedf39dab8f37c9d4129bab6dd0716b"


def _key(text: str) -> str:
    """Normalised hash: lower case, punctuation stripped, whitespace collapsed."""
    t = re.sub(r"[^\w\s]", "", text.lower())
    return hashlib.sha256(" ".join(t.split()).encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def shipped():
    return load_preference_set(split="all")


# ---- the shipped set ------------------------------------------------------------------------------------


def test_shipped_sizes_per_criterion_and_split(shipped):
    counts = Counter((p.criterion, p.split) for p in shipped)
    assert counts == {**{(c, "test"): 40 for c in CRITERIA}, **{(c, "dev"): 20 for c in CRITERIA}}
    test, dev = load_preference_set(), load_preference_set(split="dev")
    assert len(test) == 120 and {p.split for p in test} == {"test"}
    assert len(dev) == 60 and {p.split for p in dev} == {"dev"}
    assert Counter(p.criterion for p in test) == {c: 40 for c in CRITERIA}
    assert {p.prompt for p in test}.isdisjoint(p.prompt for p in dev)


def test_shipped_fields_are_non_empty_strings(shipped):
    for p in shipped:
        for f in (p.prompt, p.chosen, p.rejected, p.criterion, p.split):
            assert isinstance(f, str) and f.strip(), p
        assert p.chosen.strip() != p.rejected.strip()


def test_shipped_lengths_are_matched(shipped):
    """Both sides of every pair about as long: a model cannot score well by preferring longer (or shorter) text."""
    for p in shipped:
        ratio = len(p.chosen.split()) / len(p.rejected.split())
        assert 0.8 <= ratio <= 1.25, (p.criterion, p.prompt, ratio)
    for c in CRITERIA:
        ps = [p for p in shipped if p.criterion == c]
        mc = statistics.mean(len(p.chosen.split()) for p in ps)
        mr = statistics.mean(len(p.rejected.split()) for p in ps)
        assert abs(mc - mr) <= 0.05 * max(mc, mr), (c, mc, mr)


def test_shipped_prompts_unique(shipped):
    assert len({_key(p.prompt) for p in shipped}) == len(shipped)


def test_shipped_is_held_out_from_everything_else_shipped(shipped):
    """Disjoint (by normalised hash) from the layer report's response pairs, every built-in instruction and the
    paraphrased system prompts: the set never chose a layer, a gamma or a training instruction."""
    prompts = {_key(p.prompt) for p in shipped}
    response_qs = {_key(q) for pairs in builtin_response_pairs().values() for q, _, _ in pairs}
    assert response_qs and prompts.isdisjoint(response_qs)
    # also none of the response pairs' answers is reused as a prompt or an answer here
    response_answers = {_key(a) for pairs in builtin_response_pairs().values() for _, g, b in pairs for a in (g, b)}
    answers = {_key(a) for p in shipped for a in (p.chosen, p.rejected)}
    assert answers.isdisjoint(response_answers)
    assert "all" in BUILTIN_SETS
    instructions = {_key(q) for q in builtin_instructions("all")}
    assert len(instructions) > 300 and prompts.isdisjoint(instructions)
    para = {_key(x) for pairs in builtin_paraphrases().values() for pos_neg in pairs for x in pos_neg}
    assert para and prompts.isdisjoint(para)
    # the library's own check agrees
    assert check_held_out(shipped, builtin_instructions("all")) == []
    assert check_held_out(shipped, [q for pairs in builtin_response_pairs().values() for q, _, _ in pairs]) == []


def test_shipped_hash_is_frozen(shipped):
    assert preference_set_sha256(shipped) == preference_set_sha256(load_preference_set(split="all"))
    assert preference_set_sha256(shipped) == SHA_ALL
    assert preference_set_sha256(load_preference_set()) == SHA_TEST
    assert preference_set_sha256(load_preference_set(split="dev")) == SHA_DEV


def test_sha_depends_on_content_and_order(shipped):
    a = list(shipped[:3])
    assert preference_set_sha256(a) != preference_set_sha256(a[::-1])
    changed = [PreferencePair(a[0].prompt, a[0].chosen + " ", a[0].rejected, a[0].criterion), *a[1:]]
    assert preference_set_sha256(changed) != preference_set_sha256(a)
    relabelled = [PreferencePair(a[0].prompt, a[0].chosen, a[0].rejected, "other"), *a[1:]]
    assert preference_set_sha256(relabelled) != preference_set_sha256(a)
    # the split is not part of the content
    resplit = [PreferencePair(p.prompt, p.chosen, p.rejected, p.criterion, "x") for p in a]
    assert preference_set_sha256(resplit) == preference_set_sha256(a)


def test_unknown_split():
    with pytest.raises(ValueError, match="Unknown split"):
        load_preference_set(split="train")  # type: ignore[arg-type]


# ---- user files -----------------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_user_file_with_and_without_criterion(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "Q1?", "chosen": "good one", "rejected": "bad one", "criterion": "helpful"},
        "",  # blank lines are skipped
        {"prompt": "Q2?", "chosen": "good two", "rejected": "bad two"},
    ])
    pairs = load_preference_set(f)
    assert pairs == [PreferencePair("Q1?", "good one", "bad one", "helpful", ""),
                     PreferencePair("Q2?", "good two", "bad two", "all", "")]
    assert load_preference_set(str(f)) == pairs
    # a list of dicts works the same
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    assert load_preference_set(rows) == pairs


def test_user_file_split_filter(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "A?", "chosen": "a1", "rejected": "a2", "split": "dev"},
        {"prompt": "B?", "chosen": "b1", "rejected": "b2", "split": "test"},
        {"prompt": "C?", "chosen": "c1", "rejected": "c2", "split": "test"},
    ])
    assert [p.prompt for p in load_preference_set(f)] == ["B?", "C?"]
    assert [p.prompt for p in load_preference_set(f, split="dev")] == ["A?"]
    assert [p.prompt for p in load_preference_set(f, split="all")] == ["A?", "B?", "C?"]
    # a file without splits is used whole, whatever the split asked for
    g = _write(tmp_path / "g.jsonl", [{"prompt": "A?", "chosen": "a1", "rejected": "a2"}])
    assert len(load_preference_set(g, split="dev")) == 1
    only_dev = _write(tmp_path / "d.jsonl", [{"prompt": "A?", "chosen": "a1", "rejected": "a2", "split": "dev"}])
    with pytest.raises(ValueError, match=r"no pairs.*test"):
        load_preference_set(only_dev)


def test_null_split_means_no_split():
    pairs = load_preference_set([{"prompt": "A?", "chosen": "a1", "rejected": "a2", "split": None}])
    assert [p.split for p in pairs] == [""]


def test_user_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*JSONL"):
        load_preference_set(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_set(tmp_path / "folder")


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"line 2: not JSON"),
    ('["a", "b", "c"]', r"line 2: expected an object"),
    ('{"prompt": "q", "chosen": "a"}', r"line 2: missing rejected"),
    ('{"chosen": "a", "rejected": "b"}', r"line 2: missing prompt"),
    ('{"prompt": "q", "chosen": 3, "rejected": "b"}', r"line 2: chosen must be non-empty plain strings"),
    ('{"prompt": ["q"], "chosen": "a", "rejected": "b"}', r"line 2: prompt must be non-empty plain strings"),
    ('{"prompt": "q", "chosen": "a", "rejected": "  "}', r"line 2: rejected must be non-empty plain strings"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "criterion": 5}', r"line 2: 'criterion' must be a string"),
    ('{"prompt": "q", "chosen": "same", "rejected": " same "}', r"line 2: 'chosen' and 'rejected' are the same"),
])
def test_user_file_errors_name_the_line(tmp_path, line, message):
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "ok?", "chosen": "yes", "rejected": "no"}, line])
    with pytest.raises(ValueError, match=message) as exc:
        load_preference_set(f)
    assert str(f) in str(exc.value)


def test_empty_file_and_empty_list(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no pairs"):
        load_preference_set(f)
    with pytest.raises(ValueError, match="no pairs"):
        load_preference_set([])


def test_check_held_out_ignores_case_and_space():
    pairs = [PreferencePair("How do I Boil an  egg?", "a", "b"), PreferencePair("Other question", "a", "b"),
             PreferencePair("  what IS dns?\n", "a", "b")]
    used = ["how do i boil an egg?", "What is DNS?", "Something else"]
    assert check_held_out(pairs, used) == ["How do I Boil an  egg?", "  what IS dns?\n"]
    assert check_held_out(pairs, []) == []
    assert check_held_out(pairs, ["How do I boil an egg"]) == []  # different text (no '?'): not the same prompt


# ---- metrics on made-up log-probs -----------------------------------------------------------------------

PAIRS = [PreferencePair("q1", "one two", "one two three", "helpful"),
         PreferencePair("q2", "one", "one two", "helpful"),
         PreferencePair("q3", "a b c", "a b", "honest"),
         PreferencePair("q4", "a", "b", "honest")]


def _lp(chosen, rejected, ct=(2.0, 2.0, 3.0, 4.0), rt=(2.0, 2.0, 3.0, 2.0)) -> PairLogprobs:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return PairLogprobs(t(chosen), t(rejected), t(ct), t(rt))


BASE = _lp([-4.0, -6.0, -3.0, -8.0], [-6.0, -4.0, -6.0, -4.0])      # margins 1, -1, 1, 0
TRAINED = _lp([-2.0, -4.0, -3.0, -16.0], [-6.0, -4.0, -9.0, -10.0])  # margins 2, 0, 2, 1
SWAPPED = _lp([-6.0, -8.0, -3.0, -8.0], [-4.0, -4.0, -3.0, -4.0])   # margins -1, -2, 0, 0


def test_margin_is_length_normalised():
    torch.testing.assert_close(BASE.margin, torch.tensor([1.0, -1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(TRAINED.margin, torch.tensor([2.0, 0.0, 2.0, 1.0], dtype=torch.float64))


def test_preference_metrics_by_hand():
    m = preference_metrics({"base": BASE, "trained": TRAINED}, PAIRS, n_boot=200)
    assert m["reference"] == "base" and m["level"] == 0.9 and m["n_boot"] == 200
    base, trained = m["models"]["base"], m["models"]["trained"]
    assert list(base) == ["all", "helpful", "honest"]
    assert base["all"]["n"] == 4 and base["helpful"]["n"] == 2
    assert base["all"]["preference_accuracy"] == 0.5  # a zero margin is not a win
    assert base["helpful"]["preference_accuracy"] == 0.5 and base["honest"]["preference_accuracy"] == 0.5
    assert base["all"]["margin_mean"] == pytest.approx(0.25)
    assert trained["all"]["preference_accuracy"] == 0.75 and trained["all"]["margin_mean"] == pytest.approx(1.25)
    for cell in (base["all"], trained["all"]):
        assert cell["margin_ci_low"] <= cell["margin_mean"] <= cell["margin_ci_high"]
    # the reference has no shift and no implicit reward of its own
    assert base["all"]["implicit_reward_accuracy"] is None and "margin_shift_mean" not in base["all"]
    # the shift is the difference of margins, per criterion
    for crit in ("all", "helpful", "honest"):
        diff = trained[crit]["margin_mean"] - base[crit]["margin_mean"]
        assert trained[crit]["margin_shift_mean"] == pytest.approx(diff)
        assert trained[crit]["margin_shift_ci_low"] <= trained[crit]["margin_shift_mean"] <= \
            trained[crit]["margin_shift_ci_high"]
    assert trained["all"]["margin_shift_mean"] == pytest.approx(1.0)
    assert trained["all"]["margin_rose_share"] == 1.0  # every pair's margin rose by exactly 1
    assert trained["all"]["margin_shift_ci_low"] == trained["all"]["margin_shift_ci_high"] == pytest.approx(1.0)
    # implicit reward (summed, not length-normalised): (c - c_ref) - (r - r_ref) = 2, 2, 3, -2 -> 3 of 4 positive
    # (pair 4's normalised margin rose, its summed log-ratio fell: the two measures can disagree)
    assert trained["all"]["implicit_reward_accuracy"] == 0.75
    assert trained["helpful"]["implicit_reward_accuracy"] == 1.0
    assert trained["honest"]["implicit_reward_accuracy"] == 0.5
    # lengths, tokens and words, beside every figure
    assert base["all"]["chosen_tokens_mean"] == pytest.approx(2.75) and base["all"]["rejected_tokens_mean"] == 2.25
    assert base["helpful"]["chosen_words_mean"] == 1.5 and base["helpful"]["rejected_words_mean"] == 2.5
    assert json.loads(json.dumps(m)) == m


def test_preference_metrics_without_reference_and_errors():
    m = preference_metrics({"a": BASE, "b": TRAINED}, PAIRS, reference=None, n_boot=50)
    for cells in m["models"].values():
        assert cells["all"]["implicit_reward_accuracy"] is None and "margin_shift_mean" not in cells["all"]
    with pytest.raises(ValueError, match="Reference model 'base'"):
        preference_metrics({"a": BASE}, PAIRS)
    with pytest.raises(ValueError, match="log-probs of 4 pairs, the set has 3"):
        preference_metrics({"base": BASE}, PAIRS[:3])


def test_a_set_without_criteria_has_only_all():
    plain = [PreferencePair(p.prompt, p.chosen, p.rejected) for p in PAIRS]
    m = preference_metrics({"base": BASE}, plain, n_boot=20)
    assert list(m["models"]["base"]) == ["all"]


PAIRS8 = [PreferencePair(f"q{i}", "a", "b", "helpful") for i in range(8)]


def test_model_contrasts_distinguishable():
    con = model_contrasts({"trained": TRAINED, "swapped": SWAPPED, "same": TRAINED}, PAIRS, subject="trained",
                          controls=["swapped", "same"], n_boot=200)
    assert set(con) == {"swapped", "same"}
    s = con["swapped"]["all"]
    # per pair: 3, 2, 2, 1 -> mean 2, all positive
    assert s["mean"] == pytest.approx(2.0) and s["n"] == 4 and s["low"] > 0
    # 4 pairs are too few to call it: MIN_PAIRS_FOR_INTERVAL
    assert s["distinguishable"] is False and s["direction"] == "too few pairs"
    big = model_contrasts({"trained": _lp([-1.0] * 8, [-4.0] * 8, (1.0,) * 8, (1.0,) * 8), "swapped": _lp([-4.0] * 8, [-1.0] * 8, (1.0,) * 8, (1.0,) * 8)},
                          PAIRS8, subject="trained", controls=["swapped"], n_boot=200)["swapped"]["all"]
    assert big["distinguishable"] is True and big["direction"] == "above"
    rev = model_contrasts({"trained": _lp([-4.0] * 8, [-1.0] * 8, (1.0,) * 8, (1.0,) * 8), "swapped": _lp([-1.0] * 8, [-4.0] * 8, (1.0,) * 8, (1.0,) * 8)},
                          PAIRS8, subject="trained", controls=["swapped"], n_boot=200)["swapped"]["all"]
    assert rev["distinguishable"] is True and rev["direction"] == "below"
    assert con["swapped"]["helpful"]["mean"] == pytest.approx(2.5)
    same = con["same"]["all"]
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0) and same["distinguishable"] is False
    # a noisy difference straddling zero is not distinguishable
    noisy = _lp([-2.0, -6.0, -3.0, -8.0], [-6.0, -2.0, -6.0, -4.0])  # margins 2, -2, 1, 0 vs base 1, -1, 1, 0
    c2 = model_contrasts({"trained": noisy, "base": BASE}, PAIRS, subject="trained", controls=["base"], n_boot=500)
    assert c2["base"]["all"]["low"] < 0 < c2["base"]["all"]["high"] and not c2["base"]["all"]["distinguishable"]
    with pytest.raises(ValueError, match="Need log-probs"):
        model_contrasts({"trained": TRAINED}, PAIRS, subject="trained", controls=["random"])


def _evaluation_like() -> dict:
    lps = {"base": BASE, "trained": TRAINED, "swapped": SWAPPED}
    p = preference_metrics(lps, PAIRS, n_boot=100)
    p["contrasts"] = {"subject": "trained",
                      "controls": model_contrasts(lps, PAIRS, subject="trained", controls=["swapped"], n_boot=100)}
    p["set"] = {"n": 4, "sha256": preference_set_sha256(PAIRS), "criteria": ["helpful", "honest"]}
    return p


def test_preference_markdown_renders_every_model_criterion_and_contrast():
    p = _evaluation_like()
    text = "\n".join(preference_markdown(p))
    assert "n = 4" in text and preference_set_sha256(PAIRS)[:12] in text and "90% bootstrap interval" in text
    for model in ("base", "trained", "swapped"):
        for crit in ("all", "helpful", "honest"):
            assert re.search(rf"^\| {model} \| {crit} \| ", text, re.M), (model, crit)
    base_row = next(r for r in text.splitlines() if r.startswith("| base | all |"))
    assert "| - |" in base_row and "n/a" in base_row  # no shift, no implicit reward for the reference
    trained_row = next(r for r in text.splitlines() if r.startswith("| trained | all |"))
    assert "+1.0000 [+1.0000, +1.0000]" in trained_row and "0.750" in trained_row
    assert "### trained against its controls" in text
    for crit in ("all", "helpful", "honest"):
        assert re.search(rf"^\| swapped \| {crit} \| \d+ \| [+-]\d\.\d{{4}} \[.*\] \| (yes|no: .*) \|$", text, re.M)
    assert re.search(r"^\| swapped \| all \| 4 \| \+2\.0000 .* \| no: too few pairs for an interval \|$", text, re.M)
    # without contrasts: no contrast section
    p.pop("contrasts")
    assert "against its controls" not in "\n".join(preference_markdown(p))


def test_preference_figure_draws():
    fig = preference_figure({"preference": _evaluation_like()})
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "helpful", "honest"]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["swapped", "trained"]  # not the reference
