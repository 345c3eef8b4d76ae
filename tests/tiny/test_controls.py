"""icon2_lens.controls: swapped pairs, random directions of the same per-layer norm, make_controls (tiny model)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import INSTRUCTIONS

import icon2_lens as il
import icon2_lens.controls as controls
from icon2_lens.controls import CONTROL_KINDS, ControlsConfig, make_controls, random_directions, swap_pairs
from icon2_lens.pairs import PairsConfig
from icon2_lens.steering import steering_vectors
from icon2_lens.training import TrainConfig


def _row(i: int, *, chosen_finished: bool = True, rejected_finished: bool = True) -> dict:
    q = f"Question number {i}?"
    return {"prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": f"A clear and helpful answer {i}."}],
            "rejected": [{"role": "assistant", "content": "bad bad bad"}],
            "instruction": q, "criterion": "helpful", "consistency": 0.5,
            "chosen_finished": chosen_finished, "rejected_finished": rejected_finished,
            "chosen_tokens": 7, "rejected_tokens": 3}


ROWS = [_row(0), _row(1, chosen_finished=False), _row(2), _row(3)]
FAST = TrainConfig(max_steps=1, precision="fp32")


@pytest.fixture(scope="module")
def dirs(tiny_model):
    return il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, progress=False).with_meta(
        suggested_layers=[1, 2])


# ---- swap_pairs -----------------------------------------------------------------------------------------


def test_swap_pairs_swaps_texts_flags_and_counts():
    out = swap_pairs(ROWS)
    assert len(out) == len(ROWS)
    for r, s in zip(ROWS, out, strict=True):
        assert s["chosen"] == r["rejected"] and s["rejected"] == r["chosen"]
        assert s["chosen_finished"] == r["rejected_finished"] and s["rejected_finished"] == r["chosen_finished"]
        assert s["chosen_tokens"] == r["rejected_tokens"] and s["rejected_tokens"] == r["chosen_tokens"]
        assert s["prompt"] == r["prompt"] and s["instruction"] == r["instruction"] and s["control"] == "swapped"
    assert out[1]["chosen_finished"] is True and out[1]["rejected_finished"] is False
    assert "control" not in ROWS[0] and ROWS[0]["chosen"][0]["content"].startswith("A clear")  # input untouched
    # twice is the identity (but for the label)
    back = swap_pairs(out)
    assert [{k: v for k, v in r.items() if k != "control"} for r in back] == ROWS


def test_swap_pairs_plain_rows_and_files(tmp_path):
    assert swap_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}]) == [
        {"prompt": "q", "chosen": "b", "rejected": "a", "control": "swapped"}]  # no flags: none invented
    folder = tmp_path / "generate"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert swap_pairs(folder) == swap_pairs(ROWS) == swap_pairs(folder / "pairs.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        swap_pairs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="No pairs"):
        swap_pairs([])


# ---- random_directions ----------------------------------------------------------------------------------


def test_random_directions_keep_stats_and_shape(dirs):
    rnd = random_directions(dirs, seed=0)
    assert rnd.vectors.shape == dirs.vectors.shape and rnd.vectors.dtype == torch.float32
    assert rnd.criteria == dirs.criteria and rnd.layers == dirs.layers and rnd.hook == dirs.hook
    assert rnd.suggested_layers == dirs.suggested_layers
    assert set(rnd.stats) == set(dirs.stats)
    for k, v in dirs.stats.items():
        assert torch.equal(rnd.stats[k], v), k
    assert rnd.meta["control"] == "random" and rnd.meta["control_seed"] == 0
    assert rnd.meta["model"] == dirs.meta["model"]


def test_random_directions_fit_the_same_model(tiny_model, other_tiny_model, dirs):
    rnd = random_directions(dirs)
    rnd.check_compatible(tiny_model)
    with pytest.raises(ValueError, match="fingerprint"):
        rnd.check_compatible(other_tiny_model)


def test_random_directions_rotate_keeping_norms_and_cosines(dirs):
    rnd = random_directions(dirs, seed=3)
    torch.testing.assert_close(rnd.vectors.norm(dim=-1), torch.ones(rnd.vectors.shape[:2]))
    # one rotation for all: cosines between layers and between criteria are kept, so pushes add up alike
    flat, real = rnd.vectors.flatten(0, 1), dirs.vectors.flatten(0, 1)
    torch.testing.assert_close(flat @ flat.T, real @ real.T, atol=1e-5, rtol=0)
    # and the directions are unrelated to the real ones
    cos = (rnd.vectors * dirs.vectors).sum(-1).abs()
    assert cos.max() < 0.9


def test_random_directions_seeded(dirs):
    a, b, c = random_directions(dirs, seed=1), random_directions(dirs, seed=1), random_directions(dirs, seed=2)
    assert torch.equal(a.vectors, b.vectors)
    assert not torch.allclose(a.vectors, c.vectors)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    random_directions(dirs, seed=1)
    assert torch.equal(torch.rand(2), expected)  # the caller's RNG is untouched


def test_random_directions_leave_the_input_alone(dirs):
    vectors, meta = dirs.vectors.clone(), dict(dirs.meta)
    stats = {k: v.clone() for k, v in dirs.stats.items()}
    rnd = random_directions(dirs, seed=0)
    assert torch.equal(dirs.vectors, vectors) and dirs.meta == meta and "control" not in dirs.meta
    assert all(torch.equal(dirs.stats[k], v) for k, v in stats.items())
    rnd.vectors.add_(1.0)  # the copy does not share the input's storage
    assert torch.equal(dirs.vectors, vectors)


def test_random_directions_steer_with_the_real_norm(dirs):
    """Steering along the random direction adds a vector of the same norm per layer as the real one."""
    rnd = random_directions(dirs, seed=0)
    for name in dirs.criteria:
        real = steering_vectors(dirs, name, 0.1, layers=[1, 2])
        fake = steering_vectors(rnd, name, 0.1, layers=[1, 2])
        assert list(real) == list(fake) == [1, 2]
        for layer in real:
            torch.testing.assert_close(fake[layer].norm(dim=-1), real[layer].norm(dim=-1))
            assert not torch.allclose(fake[layer], real[layer])


# ---- ControlsConfig -------------------------------------------------------------------------------------


def test_controls_config():
    assert ControlsConfig().kinds == list(CONTROL_KINDS) == ["swapped", "random"]
    assert ControlsConfig(kinds=["random"]).kinds == ["random"] and ControlsConfig().direction_seed == 0
    with pytest.raises(ValueError, match=r"Unknown control kind.*'shuffled'"):
        ControlsConfig(kinds=["swapped", "shuffled"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="repeat"):
        ControlsConfig(kinds=["swapped", "swapped"])


# ---- make_controls --------------------------------------------------------------------------------------


def test_make_controls_swapped_trains_once_and_resumes(tiny_model, dirs, tmp_path, monkeypatch):
    out = tmp_path / "controls"
    paths = make_controls(tiny_model, dirs, ROWS, ControlsConfig(kinds=["swapped"]), train_config=FAST, out=out,
                          progress=False)
    assert paths == {"swapped": out / "swapped" / "model"}
    written = [json.loads(x) for x in (out / "swapped" / "pairs.jsonl").read_text().splitlines()]
    assert written == swap_pairs(ROWS)
    cfg = json.loads((paths["swapped"] / "train_config.json").read_text())
    # finished_only (the default): the swapped row 1 has an unfinished *rejected* side now and is left out
    assert cfg["n_pairs"] == 3 and cfg["n_unfinished_dropped"] == 1 and cfg["max_steps"] == 1
    model = il.load_model(paths["swapped"], device="cpu")
    assert model.info.fingerprint == tiny_model.info.fingerprint
    assert not (out / "random").exists()

    # a second call keeps the trained control: no training, same answer
    def no_training(*a, **k):
        raise AssertionError("make_controls trained a control that already exists")

    monkeypatch.setattr(controls, "train", no_training)
    stamp = (paths["swapped"] / "config.json").stat().st_mtime_ns
    assert make_controls(tiny_model, dirs, ROWS, ControlsConfig(kinds=["swapped"]), train_config=FAST, out=out,
                         progress=False) == paths
    assert (paths["swapped"] / "config.json").stat().st_mtime_ns == stamp


def test_make_controls_random_regenerates_along_a_random_direction(tiny_model, dirs, tmp_path):
    rows = [_row(i) for i in range(2)]
    out = tmp_path / "controls"
    paths = make_controls(tiny_model, dirs, rows, ControlsConfig(kinds=["random"], direction_seed=4),
                          pairs_config=PairsConfig(max_new_tokens=3, layers=[1, 2], batch_size=2),
                          train_config=TrainConfig(max_steps=1, precision="fp32", finished_only=False),
                          out=out, progress=False)
    assert list(paths) == ["random"] and (paths["random"] / "config.json").is_file()
    written = [json.loads(x) for x in (out / "random" / "pairs.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in written] == [r["instruction"] for r in rows]
    assert all(r["control"] == "random" and r["criterion"] == "helpful" for r in written)
    assert all(r["layers"] == [1, 2] and r["max_new_tokens"] == 3 for r in written)
    # the same generation with the random directions by hand gives the same texts
    again = il.generate_pairs(tiny_model, random_directions(dirs, seed=4), [
        {"instruction": r["instruction"], "criterion": r["criterion"], "consistency": r["consistency"]} for r in rows],
        PairsConfig(max_new_tokens=3, layers=[1, 2], batch_size=2), progress=False)
    assert [r["chosen"] for r in written] == [r["chosen"] for r in again]
    assert [r["rejected"] for r in written] == [r["rejected"] for r in again]


def test_make_controls_bad_input(tiny_model, dirs, tmp_path):
    with pytest.raises(ValueError, match="No pairs"):
        make_controls(tiny_model, dirs, [], out=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError):
        make_controls(tiny_model, dirs, tmp_path / "nowhere", out=tmp_path / "c", progress=False)
