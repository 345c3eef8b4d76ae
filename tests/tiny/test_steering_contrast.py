"""scale="contrast": gamma in units of the criterion's P+/P- projection gap, spread over the steering layers."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.math.gamma import cumulative_push
from icon2_lens.steering import SCALES, steer_spec, steering_vectors

from conftest import INSTRUCTIONS


@pytest.fixture(scope="module")
def dirs(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    return d.with_meta(suggested_layers=[1, 2])


def test_contrast_scale_per_layer_norm_is_gamma_gap_over_layers(dirs):
    assert SCALES == ("relative", "unit", "contrast")
    layers = [0, 1, 3]
    c = dirs.index("honest")
    gap = dirs.stats["proj_gap"][c]
    assert (gap > 0).all()  # the sign convention: the mean difference projects positively
    vecs = steering_vectors(dirs, "honest", 0.6, layers=layers, scale="contrast")
    for layer in layers:
        li = dirs.layers.index(layer)
        assert vecs[layer].norm().item() == pytest.approx(0.6 * gap[li].item() / 3, rel=1e-5)
        torch.testing.assert_close(vecs[layer][0], 0.6 * gap[li] / 3 * dirs.vectors[c, li])
    # gamma 1 on one layer adds exactly that layer's gap; negative gammas point the other way
    one = steering_vectors(dirs, "honest", 1.0, layers=[2], scale="contrast")[2][0]
    li = dirs.layers.index(2)
    assert torch.dot(one, dirs.vectors[c, li]).item() == pytest.approx(gap[li].item(), rel=1e-5)
    neg = steering_vectors(dirs, "honest", -1.0, layers=[2], scale="contrast")[2][0]
    torch.testing.assert_close(neg, -one)
    # per-row criteria and gammas
    rows = steering_vectors(dirs, ["helpful", "honest"], [0.5, -0.5], layers=[1, 2], scale="contrast")
    for layer in (1, 2):
        li = dirs.layers.index(layer)
        for i, (name, g) in enumerate([("helpful", 0.5), ("honest", -0.5)]):
            ci = dirs.index(name)
            want = g * dirs.stats["proj_gap"][ci, li].abs() / 2 * dirs.vectors[ci, li]
            torch.testing.assert_close(rows[layer][i], want)


def test_contrast_scale_uses_the_gap_magnitude(dirs):
    flipped = il.DirectionSet(vectors=dirs.vectors.clone(), criteria=list(dirs.criteria),
                              stats={**dirs.stats, "proj_gap": -dirs.stats["proj_gap"]}, meta=dict(dirs.meta))
    a = steering_vectors(dirs, "helpful", 0.3, layers=[1, 2], scale="contrast")
    b = steering_vectors(flipped, "helpful", 0.3, layers=[1, 2], scale="contrast")
    for layer in (1, 2):
        torch.testing.assert_close(a[layer], b[layer])


def test_contrast_push_is_at_most_gamma_gaps_and_spec_carries_it(dirs):
    layers = [0, 1, 2, 3]
    c = dirs.index("helpful")
    vecs = steering_vectors(dirs, "helpful", 1.0, layers=layers, scale="contrast")
    push = cumulative_push(vecs, float(dirs.stats["resid_norm"][c, 3]), float(dirs.stats["proj_gap"][c, 3]))
    mean_gap = dirs.stats["proj_gap"][c].mean().item()
    assert push["per_layer_norm_sum"] == pytest.approx(mean_gap, rel=1e-5)  # one mean gap if all were parallel
    assert push["norm"] <= push["per_layer_norm_sum"] + 1e-6
    spec = steer_spec(dirs, "helpful", 1.0, layers=layers, scale="contrast")
    for layer in layers:
        torch.testing.assert_close(spec.vectors[layer], vecs[layer])
    with pytest.raises(ValueError, match="'relative', 'unit' or 'contrast'"):
        steering_vectors(dirs, "helpful", 1.0, layers=layers, scale="gap")


def test_contrast_scale_steers_the_model(tiny_model, dirs):
    prompt = il.prompts.render_chat(tiny_model.tokenizer, "Explain how DNS works.")
    base = il.pairs.generate_steered(tiny_model, [prompt], max_new_tokens=6)[0]["text"]
    strong = il.pairs.generate_steered(tiny_model, [prompt], directions=dirs, criteria="helpful", gammas=50.0,
                                       layers=[1, 2], scale="contrast", max_new_tokens=6)[0]["text"]
    zero = il.pairs.generate_steered(tiny_model, [prompt], directions=dirs, criteria="helpful", gammas=0.0,
                                     layers=[1, 2], scale="contrast", max_new_tokens=6)[0]["text"]
    assert zero == base and strong != base
