"""judge_summary: win/tie/loss from both orders, the first-position share and the 'unable to judge' rule (pure)."""

from __future__ import annotations

import pytest

from icon2_lens.judges import JUDGE_POSITION_LIMIT, judge_summary, verdicts


def test_counts_and_first_position_share():
    ab = [True, True, False, False, True]
    ba = [False, True, True, False, False]
    s = judge_summary(ab, ba)
    assert s["n"] == 5
    # item 0: a both orders (win); 1: first both times (flip: tie); 2: b both (loss); 3: second both (tie); 4: win
    assert (s["win"], s["tie"], s["loss"]) == (0.4, 0.4, 0.2)
    assert s["win"] + s["tie"] + s["loss"] == pytest.approx(1.0)
    assert s["first_position_share"] == pytest.approx(5 / 10)
    assert s["able_to_judge"] is True and s["note"] == ""
    assert [1.0, 0.5, 0.0, 0.5, 1.0] == verdicts(ab, ba)


def test_limit_is_point_eight_and_symmetric():
    assert JUDGE_POSITION_LIMIT == 0.8
    # 8 of 10 verdicts first: exactly at the limit, still able; 9 of 10: unable
    at = judge_summary([True] * 4 + [False], [True] * 4 + [False])
    assert at["first_position_share"] == pytest.approx(0.8) and at["able_to_judge"]
    over = judge_summary([True] * 5, [True] * 4 + [False])
    assert over["first_position_share"] == pytest.approx(0.9) and not over["able_to_judge"]
    assert over["note"] == "unable to judge: picks the first position in 90% of verdicts"
    # the other direction: always the second position
    low = judge_summary([False] * 5, [False] * 5)
    assert low["first_position_share"] == 0.0 and not low["able_to_judge"]
    assert low["note"] == "unable to judge: picks the second position in 100% of verdicts"
    edge = judge_summary([False] * 4 + [True], [False] * 4 + [True])  # share 0.2: at the limit, able
    assert edge["first_position_share"] == pytest.approx(0.2) and edge["able_to_judge"]


def test_all_ties_from_position_bias_are_not_a_result():
    s = judge_summary([True] * 20, [True] * 20)
    assert s["tie"] == 1.0 and s["first_position_share"] == 1.0 and s["able_to_judge"] is False


def test_unparsed_replies_are_reported():
    s = judge_summary([False] * 4, [False, False, False, True], unparsed=7)
    assert s["unparsed"] == 7 and not s["able_to_judge"]
    assert s["note"] == ("unable to judge: picks the second position in 88% of verdicts; 7 of 8 replies named neither "
                         "response (counted as not picking the first)")
    assert judge_summary([True], [False])["unparsed"] == 0
    with pytest.raises(ValueError, match="unparsed"):
        judge_summary([True], [False], unparsed=3)


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        judge_summary([], [])
    with pytest.raises(ValueError):
        judge_summary([True, False], [True])
