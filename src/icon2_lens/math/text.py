"""Text metrics (pure, stdlib only): diversity and degeneration, judge verdicts, near-duplicates.

* `distinct_n`, `is_degenerate`, `degeneration_stats`: how varied a response is and whether it has
  collapsed into a loop (used by gamma calibration, pair reports and the evaluation).
* `parse_verdict`: the "A" / "B" of a text-generating pairwise judge.
* `normalize_text`, `shingles`, `jaccard`: the keys of exact- and near-duplicate detection of
  synthesised instructions (character 5-gram sets compared by Jaccard similarity).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

__all__ = [
    "trim_to_sentence",
    "distinct_n",
    "is_degenerate",
    "degeneration_stats",
    "parse_verdict",
    "normalize_text",
    "shingles",
    "jaccard",
]


def distinct_n(text: str, n: int = 2) -> float:
    """Share of distinct word n-grams among all word n-grams of ``text`` (1.0 if it has none).

    Examples:
        >>> distinct_n("the cat sat on the mat", 2)
        1.0
        >>> distinct_n("no no no no no", 2)
        0.25
    """
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


_CHAR_RUN = re.compile(r"(.)\1{19,}", re.S)  # one character 20+ times in a row
_UNIT_RUN = re.compile(r"(.{2,12}?)\1{9,}", re.S)  # a 2-12 character unit 10+ times in a row


def is_degenerate(text: str, *, min_distinct2: float = 0.5) -> bool:
    """Whether a response has degenerated: empty, a loop of repeated words (distinct-2 below
    ``min_distinct2`` over at least 8 words), or a run without spaces (one character 20+ times,
    or a 2-12 character unit 10+ times, in a row).

    Examples:
        >>> is_degenerate("Paris is the capital of France.")
        False
        >>> is_degenerate("the the the the the the the the the the")
        True
        >>> is_degenerate("ok" + "!" * 30)
        True
    """
    t = text.strip()
    if not t:
        return True
    if len(t.split()) >= 8 and distinct_n(t, 2) < min_distinct2:
        return True
    return bool(_CHAR_RUN.search(t) or _UNIT_RUN.search(t))


def degeneration_stats(texts: Sequence[str]) -> dict[str, float]:
    """Distinct-1/2 (mean per text), repetition rate (share of repeated word 3-grams), degenerate share, mean words.

    Examples:
        >>> degeneration_stats(["a b c d", "x x x x x x"])["degenerate_share"]
        0.0
    """
    if not texts:
        raise ValueError("No texts to measure.")
    rep = []
    for t in texts:
        w = t.split()
        grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
        rep.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    n = len(texts)
    return {"distinct1": sum(distinct_n(t, 1) for t in texts) / n,
            "distinct2": sum(distinct_n(t, 2) for t in texts) / n,
            "repetition_rate": sum(rep) / n, "degenerate_share": sum(is_degenerate(t) for t in texts) / n,
            "mean_words": sum(len(t.split()) for t in texts) / n}


def parse_verdict(text: str) -> str | None:
    """The verdict of a text-generating judge: ``"A"``, ``"B"`` or ``None`` when it names neither or both.

    Accepts "A", "Response B", "**A**", "The answer is B.", "ranking: A > B" (the first of a ranking wins);
    refuses garbage and answers that mention both as winners.

    Examples:
        >>> parse_verdict("Response B is better."), parse_verdict("ranking: A > B"), parse_verdict("banana")
        ('B', 'A', None)
    """
    t = text.strip()
    m = re.search(r"ranking\s*:\s*\(?([AB])\)?\s*>", t, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    found = set(re.findall(r"(?<![A-Za-z])([AB])(?![A-Za-z])", t))
    return found.pop() if len(found) == 1 else None


_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed (the key of exact-duplicate detection).

    Examples:
        >>> normalize_text("  Write a POEM, please! ")
        'write a poem please'
    """
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def shingles(norm: str, k: int = 5) -> frozenset[str]:
    """The set of character ``k``-grams of a normalised text, padded with one space each side.

    Examples:
        >>> sorted(shingles("ab", k=3))
        [' ab', 'ab ']
        >>> shingles("", k=5)
        frozenset({'  '})
    """
    s = f" {norm} "
    return frozenset(s[i:i + k] for i in range(max(1, len(s) - k + 1)))


def jaccard(a: AbstractSet[str], b: AbstractSet[str], *, shared: int | None = None) -> float:
    """Jaccard similarity ``|a & b| / |a | b|`` of two shingle sets (0.0 for two empty sets).

    ``shared``: ``|a & b|`` when the caller has counted it already (e.g. from an inverted index).

    Examples:
        >>> jaccard(shingles("write a poem"), shingles("write a poem")), jaccard({"x"}, {"y"})
        (1.0, 0.0)
    """
    inter = len(a & b) if shared is None else shared
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")
#: What may not end a kept text: a list marker ("2.", "b)"), a one-letter or common abbreviation, a colon.
_BAD_END = re.compile(r"(?:^|\s)(?:\d+[.)]|[A-Za-z][.)]|e\.g\.|i\.e\.|etc\.|vs\.|Dr\.|Mr\.|Mrs\.|Ms\.|St\.|No\.)$"
                      r"|[:;,]$")


def trim_to_sentence(text: str, *, min_share: float = 0.5) -> str | None:
    """``text`` cut after its last complete sentence (or line), or ``None`` if that keeps less than
    ``min_share`` of its characters. For responses cut at a token budget: trained with an end-of-turn
    token appended, a trimmed response teaches stopping after a sentence rather than in the middle of one.
    A cut is never made after a list marker (``2.``), an abbreviation (``e.g.``) or a colon.

    Examples:
        >>> trim_to_sentence("The first step is easy. Then the second is to")
        'The first step is easy.'
        >>> trim_to_sentence("Mix the flour and the water well.\\n2. Knead the")
        'Mix the flour and the water well.'
        >>> trim_to_sentence("A long unfinished clause without a stop", min_share=0.5) is None
        True
    """
    for m in reversed(list(_SENTENCE_END.finditer(text))):
        cut = text[:m.end()].rstrip()
        if len(cut) < min_share * len(text.rstrip()):
            return None
        if cut and not _BAD_END.search(cut):
            return cut
    return None
