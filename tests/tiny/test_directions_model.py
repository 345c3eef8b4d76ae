"""extract_directions on the tiny model, DirectionSet save/load, compatibility checks, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import icon2_lens as il
from icon2_lens.directions import instruction_hash
from icon2_lens.prompts import stimulus_texts

from conftest import CHATML, INSTRUCTIONS

CRITS = ["helpful", "honest"]


@pytest.fixture(scope="module")
def dirs(tiny_model):
    return il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, batch_size=4, progress=False)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shapes_unit_norm_and_meta(tiny_model, dirs):
    C, L, d = len(CRITS), tiny_model.n_layers, tiny_model.d_model
    assert dirs.vectors.shape == (C, L, d)
    assert dirs.vectors.dtype == torch.float32
    torch.testing.assert_close(dirs.vectors.norm(dim=-1), torch.ones(C, L))
    assert dirs.criteria == CRITS
    assert set(dirs.stats) == {"resid_norm", "diff_norm", "explained_variance", "proj_mean", "proj_std", "proj_gap"}
    for v in dirs.stats.values():
        assert v.shape == (C, L)
        assert torch.isfinite(v).all()
    m = dirs.meta
    assert m["hook"] == "resid_post" == dirs.hook
    assert m["method"] == "pca"
    assert m["layers"] == list(range(L)) == dirs.layers
    assert m["model"]["fingerprint"] == tiny_model.info.fingerprint
    assert m["model"]["n_layers"] == L and m["model"]["d_model"] == d
    assert m["n_instructions"] == len(INSTRUCTIONS)
    assert m["instruction_hashes"] == sorted(instruction_hash(x) for x in INSTRUCTIONS)
    assert [c["name"] for c in m["criteria"]] == CRITS
    assert [c.positive for c in dirs.criterion_defs] == [c.positive for c in il.DEFAULT_CRITERIA if c.name in CRITS]
    assert m["suggested_layers"] is None and dirs.suggested_layers is None
    assert {"torch", "transformers", "transformer-lens"} <= set(m["versions"])
    assert (dirs.stats["proj_gap"] > 0).all()  # sign convention on real activations


def test_deterministic(tiny_model, dirs):
    again = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, batch_size=4, progress=False)
    assert torch.equal(again.vectors, dirs.vectors)
    for k in dirs.stats:
        assert torch.equal(again.stats[k], dirs.stats[k])


def test_batch_size_does_not_change_result(tiny_model, dirs):
    other = il.extract_directions(tiny_model, CRITS, INSTRUCTIONS, batch_size=12, progress=False)
    torch.testing.assert_close(other.vectors, dirs.vectors, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["pca", "mean_diff", "pca_centered"])
def test_extraction_equals_reading_then_tensor_math(tiny_model, method):
    """End to end = read_last_token on the rendered stimuli + directions_from_activations."""
    crit = il.DEFAULT_CRITERIA[2]  # honest
    got = il.extract_directions(tiny_model, [crit], INSTRUCTIONS, method=method, batch_size=4, progress=False)
    tok = tiny_model.tokenizer
    pos = il.read_last_token(tiny_model, stimulus_texts(tok, crit.positive, INSTRUCTIONS), progress=False)
    neg = il.read_last_token(tiny_model, stimulus_texts(tok, crit.negative, INSTRUCTIONS), progress=False)
    u, stats = il.directions.directions_from_activations(pos, neg, method=method)
    torch.testing.assert_close(got.vectors[0], u, atol=1e-4, rtol=0)
    for k in stats:
        torch.testing.assert_close(got.stats[k][0], stats[k], atol=1e-4, rtol=1e-4, msg=k)


def test_hook_spellings_layers_and_accessors(tiny_model):
    d = il.extract_directions(tiny_model, "helpful", INSTRUCTIONS[:3], hook="blocks.{layer}.hook_resid_pre",
                              layers=[-1, 1], method="mean_diff", batch_size=2, progress=False)
    assert d.hook == "resid_pre" and d.layers == [3, 1]
    assert d.vectors.shape == (1, 2, tiny_model.d_model)
    assert d.vector("helpful").shape == (2, tiny_model.d_model)
    assert d.stat("diff_norm", "helpful").shape == (2,)
    assert d.criterion_cosines().shape == (2, 1, 1)
    with pytest.raises(KeyError, match="available"):
        d.vector("honest")
    with pytest.raises(KeyError, match="Unknown statistic"):
        d.stat("nope", "helpful")
    # repeated instructions: every one is counted, the hashes are the distinct ones
    d2 = il.extract_directions(tiny_model, "helpful", INSTRUCTIONS[:2] * 2, layers=[0], progress=False)
    assert d2.meta["n_instructions"] == 4 and len(d2.meta["instruction_hashes"]) == 2


# ---- save / load ------------------------------------------------------------------------------


def test_save_load_round_trip(tiny_model, dirs, tmp_path):
    out = tmp_path / "dirs"
    assert dirs.save(out) == out
    assert sorted(p.name for p in out.iterdir()) == ["directions.json", "directions.safetensors"]
    loaded = il.DirectionSet.load(out, model=tiny_model)
    assert torch.equal(loaded.vectors, dirs.vectors)
    assert loaded.criteria == dirs.criteria
    assert loaded.stats.keys() == dirs.stats.keys()
    for k in dirs.stats:
        assert torch.equal(loaded.stats[k], dirs.stats[k])
    assert loaded.meta == dirs.meta
    raw = json.loads((out / "directions.json").read_text())
    assert raw["criterion_names"] == CRITS and raw["format"].startswith("icon2_lens.directions/")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers


def test_save_refuses_existing_folder_and_overwrite_replaces(tiny_model, dirs, tmp_path):
    out = tmp_path / "dirs"
    dirs.save(out)
    before = _files(out)
    other = dirs.with_meta(method="changed")
    other = il.DirectionSet(vectors=-dirs.vectors, criteria=dirs.criteria, stats=dirs.stats, meta=other.meta)
    with pytest.raises(FileExistsError, match="overwrite"):
        other.save(out)
    assert _files(out) == before
    other.save(out, overwrite=True)
    loaded = il.DirectionSet.load(out)
    assert torch.equal(loaded.vectors, -dirs.vectors) and loaded.meta["method"] == "changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirs"]  # no temp / old folders left


def test_save_refuses_a_file_in_the_way(dirs, tmp_path):
    f = tmp_path / "dirs"
    f.write_text("x")
    with pytest.raises(FileExistsError):
        dirs.save(f, overwrite=True)
    assert f.read_text() == "x"


def test_save_into_existing_empty_folder(dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    dirs.save(tmp_path / "empty")
    assert il.DirectionSet.load(tmp_path / "empty").criteria == CRITS


def test_load_with_mismatched_model_names_both(tiny_model, other_tiny_model, dirs, tmp_path):
    out = dirs.save(tmp_path / "dirs")
    with pytest.raises(ValueError) as exc:
        il.DirectionSet.load(out, model=other_tiny_model)
    msg = str(exc.value)
    assert tiny_model.info.fingerprint in msg and other_tiny_model.info.fingerprint in msg
    assert "d_model=64" in msg and "d_model=32" in msg
    assert "layers=4" in msg and "layers=3" in msg
    assert tiny_model.info.model_id in msg and other_tiny_model.info.model_id in msg
    with pytest.raises(ValueError, match="fingerprint"):
        dirs.check_compatible(other_tiny_model)


def test_load_errors(tmp_path, dirs):
    with pytest.raises(FileNotFoundError, match="not a DirectionSet folder"):
        il.DirectionSet.load(tmp_path / "missing")
    out = dirs.save(tmp_path / "dirs")
    meta = json.loads((out / "directions.json").read_text())
    meta["format"] = "something/else"
    (out / "directions.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        il.DirectionSet.load(out)


def test_update_meta_on_disk(dirs, tmp_path):
    out = dirs.save(tmp_path / "dirs")
    tensors_before = (out / "directions.safetensors").read_bytes()
    updated = dirs.with_meta(suggested_layers=[1, 2])
    assert dirs.suggested_layers is None  # the original is not changed
    assert updated.update_meta_on_disk(out) == out / "directions.json"
    loaded = il.DirectionSet.load(out)
    assert loaded.suggested_layers == [1, 2]
    assert loaded.meta == updated.meta
    assert (out / "directions.safetensors").read_bytes() == tensors_before
    stranger = il.DirectionSet(vectors=-dirs.vectors, criteria=dirs.criteria, stats=dirs.stats, meta=dirs.meta)
    json_before = (out / "directions.json").read_bytes()
    with pytest.raises(ValueError, match="other vectors"):
        stranger.update_meta_on_disk(out)
    assert (out / "directions.json").read_bytes() == json_before
    assert sorted(p.name for p in out.iterdir()) == ["directions.json", "directions.safetensors"]


def test_repr_mentions_key_facts(dirs):
    r = repr(dirs)
    assert "helpful" in r and "pca" in r and "resid_post" in r


# ---- models without a chat template --------------------------------------------------------------


def test_no_chat_template_is_refused_then_fixed(tiny_model_no_template_dir):
    base = il.load_model(tiny_model_no_template_dir, device="cpu")
    with pytest.raises(ValueError, match="chat_template"):
        il.extract_directions(base, ["helpful"], INSTRUCTIONS[:2], progress=False)
    with pytest.raises(ValueError, match="chat template"):
        il.render_chat(base.tokenizer, "Hi")
    fixed = il.load_model(tiny_model_no_template_dir, device="cpu", chat_template=CHATML)
    d = il.extract_directions(fixed, ["helpful"], INSTRUCTIONS[:2], layers=[0, 1], progress=False)
    assert d.vectors.shape == (1, 2, 64)
    assert torch.isfinite(d.vectors).all()


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_extraction_input(tiny_model):
    with pytest.raises(ValueError, match="Unknown hook"):
        il.extract_directions(tiny_model, ["helpful"], INSTRUCTIONS[:2], hook="foo", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        il.extract_directions(tiny_model, ["helpful"], INSTRUCTIONS[:2], layers=[99], progress=False)
    with pytest.raises(ValueError, match="No instructions"):
        il.extract_directions(tiny_model, ["helpful"], [], progress=False)
    with pytest.raises(ValueError, match="No instructions"):
        il.extract_directions(tiny_model, ["helpful"], ["  ", ""], progress=False)
    with pytest.raises(ValueError, match="identical"):
        il.extract_directions(tiny_model, [il.Criterion("same", "Be nice.", "Be nice.")], INSTRUCTIONS[:2],
                              progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        il.extract_directions(tiny_model, ["helpful"], INSTRUCTIONS[:2], batch_size=1, progress=False)
    with pytest.raises(ValueError, match="Unknown method"):
        il.extract_directions(tiny_model, ["helpful"], INSTRUCTIONS[:2], method="svd", progress=False)
    with pytest.raises(ValueError, match="Unknown criterion"):
        il.extract_directions(tiny_model, ["kindness"], INSTRUCTIONS[:2], progress=False)
