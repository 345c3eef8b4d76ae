"""Steering: the vectors, the hooks (shapes, positions, KV cache), the two paths, and hook hygiene."""

from __future__ import annotations

import pytest
import torch

import icon2_lens as il
from icon2_lens.directions import DirectionSet
from icon2_lens.pairs import generate_steered
from icon2_lens.gen import PositionTracker as _Tracker
from icon2_lens.steering import Steering, steer, steering_vectors

from conftest import INSTRUCTIONS

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    return d.with_meta(suggested_layers=LAYERS)


def _sub_dirs(d: DirectionSet, layers: list[int]) -> DirectionSet:
    """The same directions restricted to some layers."""
    cols = [d.layers.index(x) for x in layers]
    return DirectionSet(vectors=d.vectors[:, cols].clone(), criteria=list(d.criteria),
                        stats={k: v[:, cols].clone() for k, v in d.stats.items()},
                        meta={**d.meta, "layers": list(layers), "suggested_layers": None})


def _batch(model, prompts):
    """Left-padded ids and mask, as generate_steered builds them."""
    tok = model.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def _hf_generate(model, ids, mask, n, *, use_cache=True, min_new_tokens=None):
    kw = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    with torch.inference_mode():
        return il.gen.hf_model(model).generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                                 use_cache=use_cache, pad_token_id=model.tokenizer.pad_token_id,
                                                 **kw)


def _recorder(module, store):
    def hook(_mod, _args, output):
        t = output[0] if isinstance(output, tuple) else output
        store.append(t.detach().clone())

    return module.register_forward_hook(hook)


def _hf_layer(model, layer):
    return il.gen.hf_model(model).model.layers[layer]


def _hook_state(model):
    """(hf forward hooks, hf pre-hooks, bridge torch hooks, bridge TL handles) summed over all layers/hook points."""
    layers = il.gen.hf_model(model).model.layers
    points = {id(hp): hp for hp in model.bridge.hook_dict.values()}.values()
    return (sum(len(m._forward_hooks) for m in layers), sum(len(m._forward_pre_hooks) for m in layers),
            sum(len(hp._forward_hooks) for hp in points), sum(len(hp.fwd_hooks) for hp in points))


def _texts(rows):
    return [r["text"] for r in rows]


# ---- steering_vectors -----------------------------------------------------------------------------


def test_relative_and_unit_scale(dirs):
    rel = steering_vectors(dirs, "honest", 0.3, layers=[0, 3])
    unit = steering_vectors(dirs, "honest", 0.3, layers=[0, 3], scale="unit")
    c = dirs.index("honest")
    assert sorted(rel) == sorted(unit) == [0, 3]
    for layer in (0, 3):
        li = dirs.layers.index(layer)
        u = dirs.vectors[c, li]
        assert rel[layer].shape == unit[layer].shape == (1, dirs.vectors.shape[-1])
        torch.testing.assert_close(rel[layer][0], 0.3 * dirs.stats["resid_norm"][c, li] * u)
        torch.testing.assert_close(unit[layer][0], 0.3 * u)
        assert unit[layer].norm().item() == pytest.approx(0.3, rel=1e-5)  # u is a unit vector
    with pytest.raises(ValueError, match="Unknown scale"):
        steering_vectors(dirs, "honest", 0.3, layers=[0], scale="absolute")


def test_per_row_criteria_and_gammas(dirs):
    crits, gammas = ["helpful", "honest", "helpful"], [0.1, -0.2, 0.0]
    vecs = steering_vectors(dirs, crits, gammas, layers=[1, 3])
    for layer in (1, 3):
        li = dirs.layers.index(layer)
        assert vecs[layer].shape == (3, dirs.vectors.shape[-1])
        for i, (c, g) in enumerate(zip(crits, gammas)):
            ci = dirs.index(c)
            torch.testing.assert_close(vecs[layer][i], g * dirs.stats["resid_norm"][ci, li] * dirs.vectors[ci, li])
    assert torch.count_nonzero(vecs[1][2]) == 0  # gamma 0 row
    # one criterion for many gammas, many criteria for one gamma, a tensor of gammas
    many_g = steering_vectors(dirs, "honest", torch.tensor([1.0, -1.0]), layers=[2])[2]
    torch.testing.assert_close(many_g[0], -many_g[1])
    many_c = steering_vectors(dirs, ["helpful", "honest"], 0.5, layers=[2])[2]
    torch.testing.assert_close(many_c[1], steering_vectors(dirs, "honest", 0.5, layers=[2])[2][0])


def test_layers_default_to_suggested(dirs):
    assert sorted(steering_vectors(dirs, "helpful", 0.1)) == LAYERS
    assert sorted(steering_vectors(dirs.with_meta(suggested_layers=[3]), "helpful", 0.1)) == [3]
    with pytest.raises(ValueError, match="no suggested layers"):
        steering_vectors(dirs.with_meta(suggested_layers=None), "helpful", 0.1)


def test_steering_vectors_errors(dirs):
    with pytest.raises(KeyError, match="'kindness' is not in these directions"):  # DirectionSet.index's KeyError
        steering_vectors(dirs, "kindness", 0.1)
    with pytest.raises(KeyError, match="kindness"):
        steering_vectors(dirs, ["helpful", "kindness"], [0.1, 0.2])
    with pytest.raises(ValueError, match="Layer 1 is not in the directions"):
        steering_vectors(_sub_dirs(dirs, [2, 3]), "helpful", 0.1, layers=[1, 2])
    with pytest.raises(ValueError, match="Layer 7 is not in the directions"):
        steering_vectors(dirs, "helpful", 0.1, layers=[7])
    with pytest.raises(ValueError, match="one per row"):
        steering_vectors(dirs, ["helpful", "honest"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one per row"):
        steering_vectors(dirs, ["helpful", "honest", "helpful"], torch.tensor([0.1, 0.2]))
    for bad in (float("nan"), float("inf"), [0.1, float("-inf")]):
        with pytest.raises(ValueError, match="finite"):
            steering_vectors(dirs, "helpful", bad)
    with pytest.raises(ValueError, match="No criterion"):
        steering_vectors(dirs, [], 0.1)


# ---- the position tracker ------------------------------------------------------------------------


def test_tracker_prefill_cached_uncached_and_reset():
    t = _Tracker()
    assert t.prompt_len is None
    assert t.positions(5) == (0, 5) and t.prompt_len == 5  # prefill
    assert t.positions(1) == (5, 6)  # cached decoding steps: one new token each
    assert t.positions(1) == (6, 7)
    assert t.prompt_len == 5
    t.reset()
    assert (t.next_pos, t.prompt_len) == (0, None)
    assert t.positions(3) == (0, 3) and t.prompt_len == 3
    assert t.positions(4) == (0, 4)  # uncached: the whole sequence again, one longer
    assert t.positions(5) == (0, 5)
    assert t.prompt_len == 3  # still the first prompt
    assert t.positions(9) == (0, 9) and t.prompt_len == 9  # neither: a new prompt
    # a new one-token prompt looks like a cached step; reset() makes it a prefill
    assert t.positions(1) == (9, 10) and t.prompt_len == 9
    t.reset()
    assert t.positions(1) == (0, 1) and t.prompt_len == 1


# ---- hooks: shapes and positions ---------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_hook_sees_prefill_and_steps_and_steers_the_right_positions(tiny_model, dirs, chat_prompts, positions,
                                                                    use_cache):
    crits, gammas = ["helpful", "honest", "helpful"], [1.0, -0.7, 0.4]
    ids, mask = _batch(tiny_model, chat_prompts[:3])
    B, P = ids.shape
    n_new = 4
    vec = steering_vectors(dirs, crits, gammas, layers=LAYERS)[1]  # [B, d] at the first steered layer
    plain, steered = [], []
    st = steer(tiny_model, dirs, crits, gammas, layers=LAYERS, positions=positions, path="hf")
    h_before = _recorder(_hf_layer(tiny_model, 1), plain)  # runs before the steering hook: the unsteered output
    try:
        with st:
            h_after = _recorder(_hf_layer(tiny_model, 1), steered)  # runs after it: the steered output
            try:
                _hf_generate(tiny_model, ids, mask, n_new, use_cache=use_cache, min_new_tokens=n_new)
            finally:
                h_after.remove()
    finally:
        h_before.remove()
    assert len(plain) == len(steered) == n_new  # prefill + n_new - 1 decoding steps
    d = tiny_model.d_model
    if use_cache:
        assert [tuple(x.shape) for x in steered] == [(B, P, d)] + [(B, 1, d)] * (n_new - 1)
    else:
        assert [tuple(x.shape) for x in steered] == [(B, P + k, d) for k in range(n_new)]
    for k, (a, b) in enumerate(zip(plain, steered)):
        diff = b - a
        want = vec[:, None, :].expand_as(diff).clone()
        if positions == "generated":
            # the prompt (padded width P) is never steered; every position after it is,
            # including the first generated token when it is fed back (k = 1)
            start = P if not use_cache else (P if k == 0 else 0)
            want[:, :start] = 0
        torch.testing.assert_close(diff, want, atol=1e-5, rtol=0)
    if positions == "generated":
        assert torch.equal(plain[0], steered[0])  # the prefill is left alone exactly
        assert steered[1][:, -1].sub(plain[1][:, -1]).abs().max() > 1e-3  # the first fed-back token is steered
    # calls counts the hook calls that changed something, over both steered layers
    assert st.calls == len(LAYERS) * (n_new if positions == "all" else n_new - 1)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_kv_cache_and_no_cache_give_the_same_tokens(tiny_model, dirs, chat_prompts, positions):
    ids, mask = _batch(tiny_model, chat_prompts)
    crits = ["helpful", "honest", "helpful", "honest", "helpful"]
    gammas = [0.8, -0.8, 0.3, 0.5, -0.4]
    outs = {}
    for use_cache in (True, False):
        with steer(tiny_model, dirs, crits, gammas, layers=LAYERS, positions=positions, path="hf"):
            outs[use_cache] = _hf_generate(tiny_model, ids, mask, 8, use_cache=use_cache)
    plain = _hf_generate(tiny_model, ids, mask, 8)
    assert outs[True].shape[1] > ids.shape[1]
    assert torch.equal(outs[True], outs[False])
    assert not torch.equal(outs[True], plain)  # the steering did something


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_hf_and_bridge_paths_agree(tiny_model, dirs, chat_prompts, positions):
    crits = ["helpful", "honest", "honest", "helpful", "helpful"]
    gammas = [0.9, -0.9, 0.4, -0.3, 0.0]
    kw = dict(directions=dirs, criteria=crits, gammas=gammas, layers=LAYERS, positions=positions, max_new_tokens=6)
    hf = generate_steered(tiny_model, chat_prompts, path="hf", **kw)
    br = generate_steered(tiny_model, chat_prompts, path="bridge", **kw)
    assert len(hf) == len(chat_prompts)
    assert hf == br
    assert _texts(hf) != _texts(generate_steered(tiny_model, chat_prompts, max_new_tokens=6))


def test_resid_pre_hook_equals_resid_post_of_the_layer_below(tiny_model, dirs, chat_prompts):
    """Steering blocks.2.hook_resid_pre by v is steering blocks.1.hook_resid_post by v (both paths)."""
    vectors = dirs.vectors.clone()
    vectors[:, 2] = dirs.vectors[:, 1]
    pre = DirectionSet(vectors=vectors, criteria=list(dirs.criteria), stats=dict(dirs.stats),
                       meta={**dirs.meta, "hook": "resid_pre"})
    kw = dict(criteria="honest", gammas=1.5, scale="unit", max_new_tokens=6)
    for path in ("hf", "bridge"):
        for positions in ("all", "generated"):
            a = generate_steered(tiny_model, chat_prompts[:3], directions=pre, layers=[2], positions=positions,
                                 path=path, **kw)
            b = generate_steered(tiny_model, chat_prompts[:3], directions=dirs, layers=[1], positions=positions,
                                 path=path, **kw)
            assert a == b, (path, positions)
    with steer(tiny_model, pre, "honest", 1.0, layers=[2], path="hf"):
        assert len(_hf_layer(tiny_model, 2)._forward_pre_hooks) == 1
        assert len(_hf_layer(tiny_model, 2)._forward_hooks) == 0
    assert _hook_state(tiny_model) == (0, 0, 0, 0)


# ---- per-row batches, gamma 0 ---------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_per_row_batch_equals_one_by_one(tiny_model, dirs, chat_prompts, positions):
    crits = ["helpful", "honest", "helpful", "honest"]
    gammas = [0.8, -0.6, -0.3, 1.2]
    prompts = chat_prompts[:4]
    kw = dict(directions=dirs, layers=LAYERS, positions=positions, max_new_tokens=8)
    batch = generate_steered(tiny_model, prompts, criteria=crits, gammas=gammas, **kw)
    alone = [generate_steered(tiny_model, [p], criteria=c, gammas=g, **kw)[0]
             for p, c, g in zip(prompts, crits, gammas)]
    assert batch == alone
    # and the rows did get their own strength: the same prompt with another row's gamma differs somewhere
    swapped = generate_steered(tiny_model, prompts, criteria=crits, gammas=gammas[::-1], **kw)
    assert _texts(swapped) != _texts(batch)


def test_gamma_zero_equals_plain_and_nonzero_changes(tiny_model, dirs, chat_prompts):
    plain = generate_steered(tiny_model, chat_prompts, max_new_tokens=8)
    for positions in ("all", "generated"):
        zero = generate_steered(tiny_model, chat_prompts, directions=dirs, criteria="helpful", gammas=0.0,
                                layers=LAYERS, positions=positions, max_new_tokens=8)
        assert zero == plain
    zero_rows = generate_steered(tiny_model, chat_prompts, directions=dirs,
                                 criteria=["helpful", "honest", "helpful", "honest", "honest"], gammas=[0.0] * 5,
                                 layers=[0, 1, 2, 3], max_new_tokens=8)
    assert zero_rows == plain
    pushed = generate_steered(tiny_model, chat_prompts, directions=dirs, criteria="helpful", gammas=1.0,
                              layers=LAYERS, max_new_tokens=8)
    changed = [a != b for a, b in zip(_texts(pushed), _texts(plain))]
    assert sum(changed) >= 3, changed


# ---- hook hygiene -----------------------------------------------------------------------------------


def test_hooks_added_inside_and_removed_on_exit(tiny_model, dirs, chat_prompts):
    assert _hook_state(tiny_model) == (0, 0, 0, 0)
    with steer(tiny_model, dirs, "helpful", 0.5, layers=LAYERS) as st:  # path="both" by default
        assert isinstance(st, Steering)
        for layer in LAYERS:
            assert len(_hf_layer(tiny_model, layer)._forward_hooks) == 1
            hp = tiny_model.bridge.hook_dict[f"blocks.{layer}.hook_resid_post"]
            assert len(hp._forward_hooks) == 1 and len(hp.fwd_hooks) == 1
        assert _hook_state(tiny_model) == (2, 0, 2, 2)
    assert _hook_state(tiny_model) == (0, 0, 0, 0)
    for layer in LAYERS:
        assert len(_hf_layer(tiny_model, layer)._forward_hooks) == 0
        hp = tiny_model.bridge.hook_dict[f"blocks.{layer}.hook_resid_post"]
        assert len(hp._forward_hooks) == 0 and hp.fwd_hooks == []
    for path, want in (("hf", (2, 0, 0, 0)), ("bridge", (0, 0, 2, 2))):
        with steer(tiny_model, dirs, "helpful", 0.5, layers=LAYERS, path=path):
            assert _hook_state(tiny_model) == want
        assert _hook_state(tiny_model) == (0, 0, 0, 0)


def test_hooks_removed_after_exception_and_steering_works_again(tiny_model, dirs, chat_prompts):
    kw = dict(directions=dirs, criteria="honest", gammas=0.7, layers=LAYERS, max_new_tokens=6)
    ref = generate_steered(tiny_model, chat_prompts[:3], **kw)
    plain = generate_steered(tiny_model, chat_prompts[:3], max_new_tokens=6)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, dirs, "helpful", 2.0, layers=LAYERS):
            assert _hook_state(tiny_model) == (2, 0, 2, 2)
            raise RuntimeError("boom")
    assert _hook_state(tiny_model) == (0, 0, 0, 0)
    # an error raised by the hook itself in the middle of a forward pass (3 rows of vectors, batch of 2)
    ids, mask = _batch(tiny_model, chat_prompts[:2])
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        with steer(tiny_model, dirs, ["helpful", "honest", "helpful"], [0.1, 0.2, 0.3], layers=LAYERS, path="hf"):
            _hf_generate(tiny_model, ids, mask, 3)
    assert _hook_state(tiny_model) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        with steer(tiny_model, dirs, ["helpful", "honest", "helpful"], [0.1, 0.2, 0.3], layers=LAYERS, path="bridge"):
            with torch.inference_mode():
                tiny_model.bridge(ids, attention_mask=mask)
    assert _hook_state(tiny_model) == (0, 0, 0, 0)
    # nothing lingers: plain generation is plain, and a new steering steers as before
    assert generate_steered(tiny_model, chat_prompts[:3], max_new_tokens=6) == plain
    assert generate_steered(tiny_model, chat_prompts[:3], **kw) == ref
    assert _texts(ref) != _texts(plain)


def test_reentering_an_active_steering_raises(tiny_model, dirs, chat_prompts):
    ids, mask = _batch(tiny_model, chat_prompts[:2])
    plain = _hf_generate(tiny_model, ids, mask, 6)
    st = steer(tiny_model, dirs, "helpful", 1.0, layers=LAYERS, path="hf")
    with st:
        with pytest.raises(RuntimeError, match="already active"):
            st.__enter__()
        assert _hook_state(tiny_model) == (2, 0, 0, 0)  # the failed re-entry added nothing
        inside = _hf_generate(tiny_model, ids, mask, 6)
    assert _hook_state(tiny_model) == (0, 0, 0, 0)
    assert not torch.equal(inside, plain)
    assert torch.equal(_hf_generate(tiny_model, ids, mask, 6), plain)  # generation after exit is plain
    with st:  # an exited Steering can be used again, with fresh position trackers
        assert torch.equal(_hf_generate(tiny_model, ids, mask, 6), inside)
    assert _hook_state(tiny_model) == (0, 0, 0, 0)


def test_reset_between_generations_inside_one_context(tiny_model, dirs, chat_prompts):
    """positions='generated' without the cache: a second prompt one token longer than the first looks like
    a decoding step of the first unless reset() is called; with reset() it equals a fresh context."""
    tok = tiny_model.tokenizer
    first = tok(chat_prompts[0], add_special_tokens=False)["input_ids"]
    second = first[:1] + first  # one token longer
    ids1, m1 = torch.tensor([first]), torch.ones(1, len(first), dtype=torch.long)
    ids2, m2 = torch.tensor([second]), torch.ones(1, len(second), dtype=torch.long)
    args = (tiny_model, dirs, "helpful", 1.0)
    kw = dict(layers=LAYERS, positions="generated", path="hf")
    with steer(*args, **kw):
        fresh2 = _hf_generate(tiny_model, ids2, m2, 5, use_cache=False)
    with steer(*args, **kw) as st:
        _hf_generate(tiny_model, ids1, m1, 1, use_cache=False)  # one forward: a prefill of len(first)
        st.reset()
        assert all(t.prompt_len is None and t.next_pos == 0 for t in st.trackers) and len(st.trackers) == len(LAYERS)
        again2 = _hf_generate(tiny_model, ids2, m2, 5, use_cache=False)
    assert torch.equal(again2, fresh2)


# ---- incompatible directions ---------------------------------------------------------------------


def test_directions_of_another_model_are_refused(tiny_model, other_tiny_model, dirs):
    other = il.extract_directions(other_tiny_model, ["helpful"], INSTRUCTIONS[:2], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        steer(tiny_model, other, "helpful", 0.1, layers=[0])
    with pytest.raises(ValueError, match="fingerprint"):
        steer(other_tiny_model, dirs, "helpful", 0.1, layers=[0])
    with pytest.raises(ValueError, match="fingerprint"):
        generate_steered(tiny_model, ["hi"], directions=other, criteria="helpful", gammas=0.1, layers=[0])
    assert _hook_state(tiny_model) == (0, 0, 0, 0)


def test_resid_mid_directions_are_refused(tiny_model):
    mid = il.extract_directions(tiny_model, ["helpful"], INSTRUCTIONS[:2], hook="resid_mid", batch_size=4,
                                progress=False)
    assert mid.hook == "resid_mid"
    with pytest.raises(ValueError, match="resid_pre and resid_post hooks, not 'resid_mid'"):
        steer(tiny_model, mid, "helpful", 0.1, layers=[1])
    assert _hook_state(tiny_model) == (0, 0, 0, 0)


def test_steering_constructor_checks(tiny_model, dirs):
    from icon2_lens.gen import SteerSpec

    vec = {1: torch.zeros(1, tiny_model.d_model)}
    with pytest.raises(ValueError, match="out of range"):
        Steering(tiny_model, SteerSpec({4: torch.zeros(1, tiny_model.d_model)}), path="hf")
    with pytest.raises(ValueError, match="Unknown positions"):
        Steering(tiny_model, SteerSpec(vec, positions="prompt"), path="hf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown path"):
        Steering(tiny_model, SteerSpec(vec), path="tl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown path"):
        generate_steered(tiny_model, ["hi"], path="both", max_new_tokens=1)
