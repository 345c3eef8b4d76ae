"""judges: the two protocols (pointwise Scorer, pairwise Judge), verdicts, is_pairwise. No model."""

from __future__ import annotations

import pytest

import icon2_lens as il
from icon2_lens import evaluation, judges
from icon2_lens.evaluation import pair_report
from icon2_lens.judges import Judge, PairwiseJudge, Scorer, is_pairwise, verdicts


class LengthScorer:
    """A pointwise scorer: longer is better."""

    name = "length"

    def __call__(self, instructions, responses, criteria):
        return [float(len(r)) for r in responses]


class LengthJudge:
    """A pairwise judge: the longer response wins in both orders, equal lengths flip with the order."""

    name = "length_judge"

    def orders(self, instructions, a, b):
        return [len(x) >= len(y) for x, y in zip(a, b)], [len(y) >= len(x) for x, y in zip(a, b)]

    def compare(self, instructions, a, b):
        return verdicts(*self.orders(instructions, a, b))


class CompareOnly:
    name = "compare_only"

    def compare(self, instructions, a, b):
        return [1.0] * len(a)


def test_fakes_satisfy_their_protocol_and_only_theirs():
    assert isinstance(LengthScorer(), Scorer) and not isinstance(LengthScorer(), Judge)
    assert isinstance(LengthJudge(), Judge) and not isinstance(LengthJudge(), Scorer)
    assert not isinstance(CompareOnly(), Judge)  # no orders: not a full Judge, but still used as one
    judge = PairwiseJudge.__new__(PairwiseJudge)  # structural check only, no model
    assert isinstance(judge, Judge)


def test_is_pairwise():
    assert not is_pairwise(LengthScorer())
    assert not is_pairwise(lambda qs, rs, cs: [0.0] * len(rs))
    assert is_pairwise(LengthJudge()) and is_pairwise(CompareOnly())
    assert is_pairwise(PairwiseJudge.__new__(PairwiseJudge))


@pytest.mark.parametrize(("ab", "ba", "want"), [
    ([True], [False], [1.0]),    # a first: a picked; b first: a picked (the second position)
    ([False], [True], [0.0]),    # b wins in both orders
    ([True], [True], [0.5]),     # always the first position: a tie
    ([False], [False], [0.5]),   # always the second position: a tie
    ([], [], []),
])
def test_verdicts(ab, ba, want):
    assert verdicts(ab, ba) == want


def test_fake_judge_compare():
    assert LengthJudge().compare(["q"] * 3, ["long answer", "x", "same"], ["short", "longer", "size"]) == [1.0, 0.0, 0.5]


def test_pairwise_judge_refuses_pointwise_use():
    with pytest.raises(TypeError, match="compares two responses"):
        PairwiseJudge.__new__(PairwiseJudge)(["q"], ["a"], ["helpful"])


def test_old_import_paths_are_the_same_objects():
    for name in ("Scorer", "Judge", "ProbeScorer", "RewardModelScorer", "PairwiseJudge"):
        assert getattr(evaluation, name) is getattr(judges, name)
    assert il.judges.PairwiseJudge is judges.PairwiseJudge and il.judges.ProbeScorer is judges.ProbeScorer
    assert il.judges.RewardModelScorer is judges.RewardModelScorer


def _pair(chosen, rejected):
    return {"instruction": "q", "criterion": "helpful", "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_pair_report_takes_either_kind():
    pairs = [_pair("a long and fine answer", "short"), _pair("tiny", "a much longer answer here"),
             _pair("same size!", "equal size")]
    pointwise = pair_report(pairs, scorer=LengthScorer())
    assert pointwise["scorer"] == "length" and pointwise["win_share"] == pytest.approx(1 / 3)
    assert pointwise["chosen"]["mean_score"] == pytest.approx((22 + 4 + 10) / 3)
    pairwise = pair_report(pairs, scorer=LengthJudge())  # the tie (equal lengths) is not a win
    assert pairwise["scorer"] == "length_judge" and pairwise["win_share"] == pytest.approx(1 / 3)
    assert "mean_score" not in pairwise["chosen"]
