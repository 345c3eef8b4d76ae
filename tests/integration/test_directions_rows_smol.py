"""The rows accumulator (the default below d_model instructions) gives today's Gram directions on SmolLM2."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il

pytestmark = pytest.mark.integration


def test_rows_and_gram_extraction_agree_on_smollm2(smol):
    instructions = il.instructions.builtin_instructions()[:32]
    kw = dict(batch_size=32, progress=False)
    rows = il.extract_directions(smol, il.DEFAULT_CRITERIA, instructions, storage="rows", **kw)
    gram = il.extract_directions(smol, il.DEFAULT_CRITERIA, instructions, storage="gram", **kw)
    cos = torch.nn.functional.cosine_similarity(rows.vectors, gram.vectors, dim=-1)
    print(f"rows vs gram cosine: min {float(cos.min()):.7f}, mean {float(cos.mean()):.7f}")
    assert float(cos.min()) >= 0.9999
    for k in gram.stats:
        torch.testing.assert_close(rows.stats[k], gram.stats[k], rtol=1e-3, atol=1e-3 * float(gram.stats[k].abs().max()),
                                   msg=k)
