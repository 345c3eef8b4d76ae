"""math.selection: the rules of select_instructions over plain lists of scores and labels."""

from __future__ import annotations

import pytest

from icon2_lens.math.selection import (
    DEFAULT_TOP_FRACTION,
    balanced_quotas,
    rank_best_first,
    select_balanced,
    select_indices,
    select_threshold,
    select_top,
)

CONS = [0.2, 0.9, 0.5, 0.9, -1.0, 0.7, 0.1, 0.3, 0.6, 0.4, 0.0, 0.8]
CRIT = ["a", "b", "a", "c", "b", "a", "a", "a", "c", "a", "b", "a"]


def test_rank_is_best_first_and_stable_on_ties():
    assert rank_best_first([0.5, 1.0, 0.5, 1.0]) == [1, 3, 0, 2]
    assert rank_best_first([]) == []


def test_top_k_top_fraction_and_threshold():
    assert select_top(CONS, 3) == [1, 3, 11]
    assert select_indices(CONS, CRIT, top_k=3) == [1, 3, 11]
    assert select_indices(CONS, CRIT, top_fraction=0.25) == [1, 3, 11]  # ceil(0.25 * 12) = 3
    assert select_indices(CONS, CRIT, top_fraction=0.26) == [1, 3, 11, 5]  # ceil(3.12) = 4
    assert select_indices(CONS, CRIT, top_k=100) == rank_best_first(CONS)
    assert select_indices(CONS, CRIT, threshold=0.6) == [1, 3, 11, 5, 8]  # >= is inclusive
    assert select_threshold(CONS, 0.9) == [1, 3]


def test_default_rule_is_the_top_ten_percent():
    assert DEFAULT_TOP_FRACTION == 0.1
    assert select_indices(CONS, CRIT) == [1, 3]  # ceil(1.2) = 2
    assert select_indices([0.0], ["a"]) == [0]


def test_balanced_quotas_by_hand():
    assert balanced_quotas({"a": 10, "b": 10}, 5) == {"a": 3, "b": 2}  # the remainder goes to the earlier group
    assert balanced_quotas({"a": 10, "b": 1, "c": 10}, 9) == {"a": 4, "b": 1, "c": 4}  # b passes its share on
    assert balanced_quotas({"a": 2, "b": 1}, 10) == {"a": 2, "b": 1}  # k above the total: everything
    assert balanced_quotas({"a": 3, "b": 3}, 0) == {"a": 0, "b": 0}


def test_balanced_selection_by_hand():
    # a (7 rows): 0.8@11, 0.7@5, 0.5@2, 0.4@9, ...; b (3): 0.9@1, 0.0@10, -1.0@4; c (2): 0.9@3, 0.6@8
    # top_k=6 over a, b, c: quotas 2, 2, 2
    assert select_indices(CONS, CRIT, top_k=6, balance_criteria=True) == [1, 3, 11, 5, 8, 10]
    # top_fraction per criterion: ceil(0.3 * 7) = 3, ceil(0.9) = 1, ceil(0.6) = 1
    assert select_indices(CONS, CRIT, top_fraction=0.3, balance_criteria=True) == [1, 3, 11, 5, 2]
    assert select_balanced(CONS, CRIT, top_k=6) == [1, 3, 11, 5, 8, 10]
    # every criterion is represented even when one dominates the top
    assert {CRIT[i] for i in select_indices(CONS, CRIT, top_k=3, balance_criteria=True)} == {"a", "b", "c"}


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 2, "threshold": 0.1}, "Give one selection rule"),
    ({"top_fraction": 0.0}, "top_fraction must be in"),
    ({"top_fraction": 1.5}, "top_fraction must be in"),
    ({"top_k": 0}, "top_k must be a positive integer"),
    ({"top_k": 2.0}, "top_k must be a positive integer"),
    ({"top_k": True}, "top_k must be a positive integer"),
    ({"threshold": 0.1, "balance_criteria": True}, "balance_criteria works with"),
    ({"threshold": 5.0}, r"No instruction reaches consistency >= 5.0 \(the highest is 0.9\)"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_indices(CONS, CRIT, **kwargs)


def test_empty_scores_are_refused():
    with pytest.raises(ValueError, match="empty"):
        select_indices([], [])
