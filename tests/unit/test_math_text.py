"""math.text: diversity, degeneration, judge verdicts, normalisation and near-duplicate similarity."""

from __future__ import annotations

import pytest

from icon2_lens.math.text import (
    degeneration_stats,
    distinct_n,
    is_degenerate,
    jaccard,
    normalize_text,
    parse_verdict,
    shingles,
)


def test_distinct_n_by_hand():
    assert distinct_n("") == 1.0 and distinct_n("one") == 1.0
    assert distinct_n("a b a b a b", 2) == 2 / 5
    assert distinct_n("a b c a b c", 1) == 0.5
    assert distinct_n("a b c a b c", 3) == 3 / 4


def test_is_degenerate_rules():
    assert is_degenerate("") and is_degenerate(" \n")
    assert is_degenerate("a b a b a b a b")  # 8 words, distinct-2 2/7 < 0.5
    assert not is_degenerate("a b a b a b a")  # only 7 words
    assert is_degenerate("x" * 20) and not is_degenerate("x" * 19)  # one character 20+ times
    assert is_degenerate("ab" * 10) and not is_degenerate("ab" * 9 + "a")  # a unit 10+ times
    assert not is_degenerate("one two three four five six seven eight")
    assert is_degenerate("one two three four five six seven eight", min_distinct2=1.01)


def test_degeneration_stats_by_hand():
    s = degeneration_stats(["a b c d", "go go go go go go go go"])
    # distinct-1: (1 + 1/8) / 2; distinct-2: (1 + 1/7) / 2; repetition: (0 + (1 - 1/6)) / 2; degenerate: 1 of 2
    assert s["distinct1"] == pytest.approx((1 + 1 / 8) / 2)
    assert s["distinct2"] == pytest.approx((1 + 1 / 7) / 2)
    assert s["repetition_rate"] == pytest.approx((1 - 1 / 6) / 2)
    assert s["degenerate_share"] == 0.5 and s["mean_words"] == 6.0
    with pytest.raises(ValueError, match="No texts"):
        degeneration_stats([])


@pytest.mark.parametrize("text, want", [
    ("A", "A"), ("Response B", "B"), ("**A**", "A"), ("The answer is B.", "B"), ("ranking: A > B", "A"),
    ("Ranking: (B) > (A)", "B"), ("A and B are both fine", None), ("banana", None), ("", None), ("Apple", None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_normalize_text():
    assert normalize_text("  Write a POEM, please! ") == "write a poem please"
    assert normalize_text("!!!") == ""


def test_shingles_and_jaccard_by_hand():
    assert shingles("abc", k=3) == frozenset({" ab", "abc", "bc "})
    assert shingles("", k=5) == frozenset({"  "})  # never empty
    a, b = shingles("abc", k=3), shingles("abd", k=3)  # share only " ab"
    assert jaccard(a, b) == 1 / 5
    assert jaccard(a, b, shared=1) == 1 / 5
    assert jaccard(a, a) == 1.0 and jaccard(frozenset(), frozenset()) == 0.0
