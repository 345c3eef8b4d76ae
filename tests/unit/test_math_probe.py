"""math.probe: projection, Eq. 2/3 and the standardised probe on a 2x2 example computed by hand."""

from __future__ import annotations

import pytest
import torch

from icon2_lens.math.probe import assign_criteria, consistency_scores, probe_scores, project, project_criterion

# 2 texts x 2 layers x d_model 2; criterion 0 reads the x axis at both layers, criterion 1 the y axis.
H = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [2.0, 0.0]]])
U = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
# projections [text, criterion, layer]
P = torch.tensor([[[1.0, 3.0], [2.0, 4.0]], [[0.0, 2.0], [1.0, 0.0]]])
MEAN = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
STD = torch.tensor([[1.0, 2.0], [1.0, 1.0]])


def test_project_by_hand():
    torch.testing.assert_close(project(H, U), P)
    assert project(H.double(), U.half()).dtype == torch.float32
    for c in range(2):
        torch.testing.assert_close(project_criterion(H, U[c]), P[:, c])


def test_eq2_and_eq3_raw():
    scores = consistency_scores(P)
    torch.testing.assert_close(scores, torch.tensor([[2.0, 3.0], [1.0, 0.5]]))
    best, idx = assign_criteria(scores)
    torch.testing.assert_close(best, torch.tensor([3.0, 1.0]))
    assert idx.tolist() == [1, 0]


def test_eq2_standardised_per_layer():
    # text 0: c0 ((1-1)/1 + (3-1)/2) / 2 = 0.5, c1 ((2-2)/1 + (4-2)/1) / 2 = 1
    # text 1: c0 ((0-1)/1 + (2-1)/2) / 2 = -0.25, c1 ((1-2)/1 + (0-2)/1) / 2 = -1.5
    z = consistency_scores(P, mean=MEAN, std=STD)
    torch.testing.assert_close(z, torch.tensor([[0.5, 1.0], [-0.25, -1.5]]))
    best, idx = assign_criteria(z)
    torch.testing.assert_close(best, torch.tensor([1.0, -0.25]))
    assert idx.tolist() == [1, 0]


def test_probe_scores_is_project_then_eq2_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    h, u = torch.randn(5, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    mean, std = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5
    assert torch.equal(probe_scores(h, u), consistency_scores(project(h, u)))
    assert torch.equal(probe_scores(h, u, mean=mean, std=std), consistency_scores(project(h, u), mean=mean, std=std))
    torch.testing.assert_close(probe_scores(H, U, mean=MEAN, std=STD), torch.tensor([[0.5, 1.0], [-0.25, -1.5]]))


def test_assign_criteria_first_on_ties():
    best, idx = assign_criteria(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert idx.tolist() == [0, 0] and best.tolist() == [1.0, 0.0]


def test_standardisation_errors():
    with pytest.raises(ValueError, match="both mean and std"):
        consistency_scores(P, mean=MEAN)
    with pytest.raises(ValueError, match="both mean and std"):
        probe_scores(H, U, std=STD)
    with pytest.raises(ValueError, match="positive projection std"):
        consistency_scores(P, mean=MEAN, std=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
