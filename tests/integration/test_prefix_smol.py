"""Shared-prefix reading on the embedded SmolLM2 (issue 14 item 3): the same residuals, directions and scores as
full prompts through the bridge, with most of each prompt's tokens computed once per batch."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.activations import LastTokenReader, tokenize_texts
from icon2_lens.criteria import resolve_criteria
from icon2_lens.gen.prefix import PrefixReader, common_prefix_length
from icon2_lens.prompts import scoring_texts, stimulus_texts

pytestmark = pytest.mark.integration

N = 8


@pytest.fixture(scope="module")
def instructions():
    return il.instructions.builtin_instructions()[:N]


@pytest.mark.parametrize("render", ["stimulus", "scoring"])
def test_residuals_equal_full_forward(smol, instructions, render):
    crit = resolve_criteria(["general"])[0]
    texts = (stimulus_texts(smol.tokenizer, crit.positive, instructions) if render == "stimulus"
             else scoring_texts(smol.tokenizer, instructions))
    ids = tokenize_texts(smol, texts)
    n_prefix = common_prefix_length(ids)
    assert n_prefix >= 20  # a system prompt (criterion's or the template's default) is shared
    with LastTokenReader(smol) as r:
        full = r.read(ids)
    with PrefixReader(smol) as r:
        shared = r.read(ids)
        assert r.tokens_reused == n_prefix * (len(ids) - 1)
    rel = ((shared - full).norm(dim=-1) / full.norm(dim=-1)).max()
    assert float(rel) < 1e-4


def test_directions_and_scores_equal_without_prefix_reuse(smol, instructions):
    a = il.extract_directions(smol, None, instructions, progress=False, reuse_prefix=True)
    b = il.extract_directions(smol, None, instructions, progress=False, reuse_prefix=False)
    assert float((a.vectors * b.vectors).sum(-1).min()) >= 0.9999
    torch.testing.assert_close(a.stats["proj_std"], b.stats["proj_std"], rtol=1e-3, atol=1e-4)
    more = il.instructions.builtin_instructions()[N:2 * N]
    kw = dict(progress=False, allow_invalid=True)
    sa = il.score_instructions(smol, a, more, reuse_prefix=True, **kw)
    sb = il.score_instructions(smol, a, more, reuse_prefix=False, **kw)
    for c in a.criteria:
        torch.testing.assert_close(torch.tensor(sa[f"score_{c}"]), torch.tensor(sb[f"score_{c}"]), rtol=1e-3, atol=1e-3)
    assert sa["criterion"] == sb["criterion"]
