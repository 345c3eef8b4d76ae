"""math.probe.orthogonalize_criteria: each criterion's direction with the others projected out, per layer (pure)."""

from __future__ import annotations

import pytest
import torch

from icon2_lens.math.probe import orthogonalize_criteria


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture
def correlated() -> torch.Tensor:
    """4 criteria x 3 layers x d 16, unit vectors sharing a common component (cosines about 0.5), like real ones."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(1, 3, 16, generator=g)
    return _unit(common + torch.randn(4, 3, 16, generator=g))


def test_orthogonal_to_the_others_at_each_layer_and_unit_norm(correlated):
    cos = torch.einsum("ald,bld->lab", correlated, correlated)
    assert cos[:, 0, 1:].abs().max() > 0.2  # the inputs really are correlated
    out = orthogonalize_criteria(correlated)
    assert out.shape == correlated.shape and out.dtype == correlated.dtype
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 3), atol=1e-5, rtol=0)
    for c in range(4):
        for other in range(4):
            if other != c:
                # orthogonal to the other criteria's *original* directions at the same layer
                dots = (out[c] * correlated[other]).sum(-1)
                torch.testing.assert_close(dots, torch.zeros(3), atol=1e-5, rtol=0)
    # it still points along its own criterion
    assert ((out * correlated).sum(-1) > 0).all()


def test_layers_are_independent(correlated):
    out = orthogonalize_criteria(correlated)
    torch.testing.assert_close(orthogonalize_criteria(correlated[:, 1:2]), out[:, 1:2])


def test_input_untouched(correlated):
    before = correlated.clone()
    orthogonalize_criteria(correlated)
    assert torch.equal(correlated, before)


def test_direction_in_the_span_of_others_becomes_zero():
    e = torch.eye(3)
    v = torch.stack([e[0], e[1], _unit(e[0] + e[1])])[:, None, :].repeat(1, 2, 1)  # [3, 2 layers, 3]
    out = orthogonalize_criteria(v)
    assert torch.equal(out[2], torch.zeros(2, 3))
    # e0 and e1 each have the other and (e0+e1) projected out: nothing is left either
    assert torch.equal(out[0], torch.zeros(2, 3)) and torch.equal(out[1], torch.zeros(2, 3))


def test_dependent_others_remove_only_their_span():
    # the others span the e0/e1 plane with three vectors; the fourth keeps its e2 part
    e = torch.eye(3)
    w = torch.stack([e[0], e[1], _unit(e[0] + e[1]), _unit(torch.tensor([1.0, 1.0, 1.0]))])[:, None, :]
    torch.testing.assert_close(orthogonalize_criteria(w)[3, 0], e[2], atol=1e-6, rtol=0)


def test_repeated_other_direction_changes_nothing():
    g = torch.Generator().manual_seed(0)
    v = _unit(torch.randn(3, 1, 8, generator=g))
    with_repeat = torch.cat([v[:2], v[:1], v[2:]])  # criterion 2 repeats criterion 0
    # the repeat adds nothing to the span: criterion 3 must come out as without it
    torch.testing.assert_close(orthogonalize_criteria(with_repeat)[3], orthogonalize_criteria(v)[2], atol=1e-5,
                               rtol=0)


def test_two_criteria_by_hand():
    v = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    v = v / v.norm(dim=-1, keepdim=True)
    out = orthogonalize_criteria(v)
    torch.testing.assert_close(out[1, 0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0, 0], _unit(torch.tensor([1.0, -1.0])))


def test_single_criterion_unchanged(correlated):
    one = correlated[:1]
    torch.testing.assert_close(orthogonalize_criteria(one), one, atol=1e-6, rtol=0)


def test_already_orthogonal_unchanged():
    e = torch.eye(4)[:3, None, :].repeat(1, 2, 1)
    torch.testing.assert_close(orthogonalize_criteria(e), e)
