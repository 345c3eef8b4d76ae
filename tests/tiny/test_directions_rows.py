"""extract_directions with the rows and the Gram accumulator agree on the tiny model."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.criteria import resolve_criteria
from icon2_lens.directions import accumulate_contrasts

from conftest import INSTRUCTIONS

CRITS = ["helpful", "honest"]


@pytest.mark.parametrize("stability", [False, True])
def test_rows_and_gram_extraction_agree(tiny_model, stability):
    kw = dict(batch_size=4, progress=False, stability=stability)
    rows = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, storage="rows", **kw)
    gram = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, storage="gram", **kw)
    auto = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, **kw)
    cos = torch.nn.functional.cosine_similarity(rows.vectors, gram.vectors, dim=-1)
    assert float(cos.min()) >= 0.9999
    assert torch.equal(auto.vectors, rows.vectors)  # 6 instructions < d_model 64: auto keeps the rows
    assert rows.stats.keys() == gram.stats.keys()
    for k in gram.stats:
        torch.testing.assert_close(rows.stats[k], gram.stats[k], rtol=1e-4, atol=1e-4, msg=k)
    if stability:
        assert "stability" in rows.stats
    for key in ("method", "layers", "n_instructions", "hook"):
        assert rows.meta[key] == gram.meta[key]


def test_accumulate_contrasts_sizes_the_rows_per_group(tiny_model):
    groups = [0, 1, 0, 1, 0, 0]
    _, accs = accumulate_contrasts(tiny_model, resolve_criteria(CRITS), INSTRUCTIONS, batch_size=4,
                                   groups=groups, progress=False)
    assert [[(a.form, a.n, a.rows_capacity) for a in g] for g in accs] == [[("rows", 4, 4)] * 2, [("rows", 2, 2)] * 2]
    _, accs = accumulate_contrasts(tiny_model, resolve_criteria(CRITS), INSTRUCTIONS, batch_size=4,
                                   progress=False, storage="gram")
    assert {a.form for a in accs[0]} == {"gram"}


def test_a_bfloat16_model_keeps_its_positives_in_bfloat16(tiny_model_dir):
    model = il.load_model(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    _, accs = accumulate_contrasts(model, il.DEFAULT_CRITERIA[:2], INSTRUCTIONS, batch_size=4, progress=False)
    acc = accs[0][0]
    assert acc.form == "rows" and acc.pos_rows[0].dtype == torch.bfloat16 and acc.diff_rows[0].dtype == torch.float32
    rows = il.extract_directions(model, ["helpful"], INSTRUCTIONS, batch_size=4, progress=False)
    gram = il.extract_directions(model, ["helpful"], INSTRUCTIONS, batch_size=4, progress=False, storage="gram")
    assert float((rows.vectors * gram.vectors).sum(-1).min()) >= 0.9999
