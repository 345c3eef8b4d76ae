"""math.layerstats: separations, the steering score and the suggested window, by hand."""

from __future__ import annotations

import pytest
import torch

from icon2_lens.math.layerstats import separation, steering_score, suggest_layer_range

NAN = float("nan")


def test_separation_by_hand():
    pos = torch.tensor([[2.0, 0.0, 1.0], [1.0, 0.0, 5.0]])
    neg = torch.tensor([[1.0, 1.0, 1.0], [3.0, -1.0, 4.0]])
    # layer 0: 2>1 yes, 1>3 no; layer 1: 0>1 no, 0>-1 yes; layer 2: a tie (not ordered), 5>4 yes
    torch.testing.assert_close(separation(pos, neg), torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(separation(pos[:1], neg[:1]), torch.tensor([1.0, 0.0, 0.0]))
    for a, b in [(torch.zeros(2, 3), torch.zeros(3, 3)), (torch.zeros(3), torch.zeros(3)), (torch.zeros(0, 2),) * 2]:
        with pytest.raises(ValueError, match="non-empty"):
            separation(a, b)


def test_steering_score_means_b_and_c_ignoring_nans():
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[0.4, 0.8, NAN], [NAN, NAN, NAN]])
    c = torch.tensor([[0.6, NAN, NAN], [0.2, 0.6, NAN]])
    # criterion 0: (0.5, 0.8, nan); criterion 1: (0.2, 0.6, nan); over criteria: (0.35, 0.7, nan)
    s = steering_score(a, b, c)
    torch.testing.assert_close(s[:2], torch.tensor([0.35, 0.7]))
    assert torch.isnan(s[2])


def test_steering_score_falls_back_to_heldout_without_b_and_c():
    a = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
    none = torch.full((2, 2), NAN)
    torch.testing.assert_close(steering_score(a, none, none), torch.tensor([0.75, 0.5]))


def test_suggest_layer_range_by_hand():
    # windows of 2: means 0.7, 0.925, 0.775, 0.55, 0.5
    assert suggest_layer_range(torch.tensor([0.5, 0.9, 0.95, 0.6, 0.5, 0.5]), width=2) == [1, 2]
    assert suggest_layer_range(torch.ones(6), width=2) == [2, 3]  # ties: the window closest to the middle
    assert suggest_layer_range(torch.tensor([NAN, 1.0, 1.0]), width=1, layers=[7, 8, 9]) == [8]  # NaN counts as 0
    assert len(suggest_layer_range(torch.zeros(9))) == 3  # default width: a third
    with pytest.raises(ValueError, match="width must be between 1 and 3"):
        suggest_layer_range(torch.zeros(3), width=4)
