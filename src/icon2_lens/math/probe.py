"""Probing activations with direction vectors: projection, Eq. 2/3 and the standardised probe (pure).

With ``h^l`` the residual of a text at layer ``l`` and ``u_c^l`` the unit direction of criterion ``c``
(METHOD.md section 3):

    consistency(d, c) = mean over layers l of h^l . u_c^l              (paper's Eq. 2)
    consistency(d)    = max over c;  criterion(d) = argmax over c       (Eq. 3)

The *standardised* probe z-scores each layer's projection with the feature set's projection mean
and standard deviation (``proj_mean``, ``proj_std`` of a `icon2_lens.DirectionSet`) before the mean
over layers, so layers and criteria with larger norms or offsets do not dominate. `probe_scores`
is that one computation, used by scoring, `icon2_lens.evaluation.ProbeScorer` and
`icon2_lens.evaluation.probe_means`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["project", "project_criterion", "consistency_scores", "probe_scores", "assign_criteria",
           "orthogonalize_criteria"]


def project(
    h: Float[Tensor, "batch layer d_model"], vectors: Float[Tensor, "criterion layer d_model"]
) -> Float[Tensor, "batch criterion layer"]:
    """Per-layer projection ``h^l . u_c^l`` of each row on each criterion's directions (float32).

    Examples:
        >>> project(torch.ones(2, 3, 4), torch.ones(1, 3, 4)).shape
        torch.Size([2, 1, 3])
    """
    return torch.einsum("bld,cld->bcl", h.float(), vectors.float())


def project_criterion(
    h: Float[Tensor, "n layer d_model"], u: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "n layer"]:
    """Per-layer projection ``h^l . u^l`` of each row on one criterion's directions (in ``h``'s dtype).

    Examples:
        >>> project_criterion(torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]), torch.tensor([[0.0, 1.0]]))
        tensor([[2.],
                [4.]])
    """
    return (h * u.unsqueeze(0)).sum(-1)


def consistency_scores(
    proj: Float[Tensor, "batch criterion layer"],
    *,
    mean: Float[Tensor, "criterion layer"] | None = None,
    std: Float[Tensor, "criterion layer"] | None = None,
) -> Float[Tensor, "batch criterion"]:
    """Eq. 2: the mean over layers of the projections, optionally z-scored per layer first.

    Examples:
        >>> consistency_scores(torch.tensor([[[1.0, 3.0]]]))
        tensor([[2.]])
        >>> consistency_scores(torch.tensor([[[1.0, 3.0]]]),
        ...                    mean=torch.tensor([[1.0, 1.0]]), std=torch.tensor([[1.0, 2.0]]))
        tensor([[0.5000]])
    """
    if (mean is None) != (std is None):
        raise ValueError("Pass both mean and std to standardise, or neither.")
    if mean is not None and std is not None:
        if (std <= 0).any():
            raise ValueError("Standardisation needs positive projection std at every selected layer.")
        proj = (proj - mean) / std
    return proj.mean(-1)


def probe_scores(
    h: Float[Tensor, "batch layer d_model"],
    vectors: Float[Tensor, "criterion layer d_model"],
    *,
    mean: Float[Tensor, "criterion layer"] | None = None,
    std: Float[Tensor, "criterion layer"] | None = None,
) -> Float[Tensor, "batch criterion"]:
    """The probe: Eq. 2 on residuals, standardised per layer when ``mean`` and ``std`` are given.

    ``consistency_scores(project(h, vectors), mean=mean, std=std)``; ``vectors``, ``mean`` and ``std``
    hold the same layers as ``h``, in the same order.

    Examples:
        >>> h = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])        # 1 text, 2 layers, d_model 2
        >>> u = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])        # 1 criterion
        >>> probe_scores(h, u), probe_scores(h, u, mean=torch.tensor([[0.0, 1.0]]), std=torch.tensor([[1.0, 2.0]]))
        (tensor([[2.]]), tensor([[1.]]))
    """
    return consistency_scores(project(h, vectors), mean=mean, std=std)


def assign_criteria(scores: Float[Tensor, "batch criterion"]) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Eq. 3: ``(consistency, criterion index)`` = max and argmax over criteria (first on ties).

    Examples:
        >>> assign_criteria(torch.tensor([[0.1, 0.4], [0.3, -1.0]]))
        (tensor([0.4000, 0.3000]), tensor([1, 0]))
    """
    best, idx = scores.max(dim=-1)
    return best, idx


def orthogonalize_criteria(
    vectors: Float[Tensor, "criterion layer d_model"],
) -> Float[Tensor, "criterion layer d_model"]:
    """Each criterion's direction with the other criteria's directions (same layer) projected out, renormalised.

    The criteria's directions are correlated (cosine 0.24-0.62 at a middle layer of SmolLM2), so a
    shift along one shows up along the others; projecting the others out reads what is specific to each.
    A direction inside the span of the others (nothing specific left) becomes zero.

    Examples:
        >>> v = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]]) / torch.tensor([[[1.0]], [[2 ** 0.5]]])
        >>> orthogonalize_criteria(v)[1, 0].tolist()
        [0.0, 1.0]
    """
    n_crit = vectors.shape[0]
    out = torch.zeros_like(vectors)
    for c in range(n_crit):
        others = torch.cat([vectors[:c], vectors[c + 1:]])  # [C-1, L, d]
        for li in range(vectors.shape[1]):
            v = vectors[c, li].double()
            if others.shape[0]:  # an orthonormal basis of the others' span (SVD: dependent others add nothing)
                u_, sv, _ = torch.linalg.svd(others[:, li].double().T, full_matrices=False)  # [d, C-1]
                basis = u_[:, sv > 1e-10 * max(float(sv.max()), 1e-300)]
                v = v - basis @ (basis.T @ v)
            norm = v.norm()
            if norm > 1e-6 * max(float(vectors[c, li].norm()), 1e-12):
                out[c, li] = (v / norm).to(vectors.dtype)
    return out
