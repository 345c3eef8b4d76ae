"""Export to llama.cpp (issue 14 item 1): control-vector GGUFs written, read back and refused, no model needed.

The layer convention: our layer i (block i's output) = HF hidden_states[i+1] = TransformerLens
blocks.{i}.hook_resid_post = llama.cpp il = tensor direction.{i}; llama.cpp's cvector-generator writes
direction.{il+1}. Running the file in real llama.cpp is item 2 (not here).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import icon2_lens as il
from icon2_lens.cli import main
from icon2_lens.directions import DirectionSet, steering_vectors
from icon2_lens.errors import BadFileError, BadInputError
from icon2_lens.llama_cpp import llama_cpp_command, read_control_vector, write_control_vector
from icon2_lens.steering import steering_vectors as steering_vectors_reexported

N_LAYERS, D = 6, 16


def _dirs(hook: str = "resid_post", suggested: list[int] | None = None) -> DirectionSet:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, N_LAYERS, D, generator=g)
    stats = {"resid_norm": torch.rand(2, N_LAYERS, generator=g) * 10 + 1,
             "proj_gap": torch.randn(2, N_LAYERS, generator=g) * 3,
             "proj_mean": torch.zeros(2, N_LAYERS), "proj_std": torch.ones(2, N_LAYERS)}
    meta = {"criteria": [c.to_dict() for c in il.DEFAULT_CRITERIA[1:3]], "layers": list(range(N_LAYERS)),
            "hook": hook, "method": "pca", "n_instructions": 4, "suggested_layers": suggested,
            "model": {"model_id": "tiny", "architecture": "LlamaForCausalLM", "n_layers": N_LAYERS, "d_model": D}}
    return DirectionSet(vectors=v / v.norm(dim=-1, keepdim=True), criteria=["helpful", "honest"], stats=stats,
                        meta=meta)


@pytest.fixture(scope="module")
def dirs() -> DirectionSet:
    return _dirs(suggested=[2, 3, 4])


def test_steering_vectors_is_the_same_function_from_both_modules():
    assert steering_vectors is steering_vectors_reexported


@pytest.mark.parametrize("scale", ["relative", "unit", "contrast"])
def test_round_trip_equals_steering_vectors_exactly(dirs, tmp_path, scale):
    path = dirs.export_gguf(tmp_path / "h.gguf", "helpful", layers=[1, 3, 5], scale=scale)
    cv = read_control_vector(path, n_layers=N_LAYERS)
    want = steering_vectors(dirs, "helpful", 1.0, layers=[1, 3, 5], scale=scale)
    assert cv.layers == [1, 3, 5] and cv.index_base == "repeng" and cv.vectors.dtype == torch.float32
    for k, layer in enumerate(cv.layers):
        assert torch.equal(cv.vectors[k], want[layer][0])
    assert cv.model_hint == "llama"
    assert cv.meta["icon2_lens.criterion"] == "helpful" and cv.meta["icon2_lens.scale"] == scale


def test_default_layers_suggested_else_all_from_one(dirs, tmp_path):
    assert read_control_vector(dirs.export_gguf(tmp_path / "a.gguf", "honest")).layers == [2, 3, 4]
    nosugg = _dirs()
    assert read_control_vector(nosugg.export_gguf(tmp_path / "b.gguf", "honest")).layers == list(range(1, N_LAYERS))


def test_gamma_baked_in_equals_scaled(dirs, tmp_path):
    scaled = read_control_vector(dirs.export_gguf(tmp_path / "s.gguf", "helpful", layers=[2, 3]))
    baked = read_control_vector(dirs.export_gguf(tmp_path / "b.gguf", "helpful", layers=[2, 3], gamma=-0.25))
    want = steering_vectors(dirs, "helpful", -0.25, layers=[2, 3])
    for k, layer in enumerate(baked.layers):
        assert torch.equal(baked.vectors[k], want[layer][0])
    torch.testing.assert_close(baked.vectors, -0.25 * scaled.vectors)  # what --control-vector-scaled f:-0.25 adds
    assert baked.meta["icon2_lens.gamma"] == -0.25 and "icon2_lens.gamma" not in scaled.meta


def test_gguf_metadata_keys(dirs, tmp_path):
    reader = gguf.GGUFReader(dirs.export_gguf(tmp_path / "h.gguf", "helpful", layers=[1, 2, 3]))
    f = reader.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(f["controlvector.model_hint"].parts[-1]).decode() == "llama"
    assert int(f["controlvector.layer_count"].parts[-1][0]) == 3
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2", "direction.3"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D] for t in reader.tensors)


def test_layer_zero_and_other_hooks_refused(dirs, tmp_path):
    with pytest.raises(BadInputError, match="block 0"):
        dirs.export_gguf(tmp_path / "x.gguf", "helpful", layers=[0, 1])
    with pytest.raises(BadInputError, match="resid_post"):
        _dirs(hook="resid_pre").export_gguf(tmp_path / "x.gguf", "helpful", layers=[1])
    with pytest.raises(BadInputError, match="block 0"):
        write_control_vector(tmp_path / "x.gguf", {0: torch.ones(D)}, hint="llama")
    assert not (tmp_path / "x.gguf").exists()


def _write_raw(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(tensors))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_cvector_generator_shift_and_auto(tmp_path):
    vecs = {il_ + 1: np.full(D, float(il_), dtype=np.float32) for il_ in range(1, N_LAYERS)}  # block il -> il+1
    path = _write_raw(tmp_path / "gen.gguf", {f"direction.{i}": a for i, a in vecs.items()})
    shifted = read_control_vector(path, index="cvector-generator")
    assert shifted.layers == list(range(1, N_LAYERS)) and shifted.index_base == "cvector-generator"
    assert all(float(shifted.vectors[k, 0]) == layer for k, layer in enumerate(shifted.layers))
    auto = read_control_vector(path, n_layers=N_LAYERS)  # direction.6 exists: only a shifted file can have it
    assert auto.index_base == "cvector-generator" and auto.layers == shifted.layers
    assert read_control_vector(path).index_base == "repeng"  # without n_layers auto cannot tell
    with pytest.raises(BadFileError, match=r"gen\.gguf.*blocks"):
        read_control_vector(path, n_layers=N_LAYERS, index="repeng")


@pytest.mark.parametrize("case", ["truncated", "not_gguf", "no_directions", "f16", "two_d", "widths", "index0"])
def test_bad_files_are_named(dirs, tmp_path, case):
    path = tmp_path / f"{case}.gguf"
    one = np.ones(D, dtype=np.float32)
    if case == "truncated":
        data = dirs.export_gguf(path, "helpful", layers=[1, 2]).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not_gguf":
        path.write_text("hello")
    else:
        tensors = {"no_directions": {"other.1": one}, "f16": {"direction.1": one.astype(np.float16)},
                   "two_d": {"direction.1": np.ones((2, D), dtype=np.float32)},
                   "widths": {"direction.1": one, "direction.2": np.ones(D + 1, dtype=np.float32)},
                   "index0": {"direction.0": one}}[case]
        _write_raw(path, tensors)
    why = {"truncated": "not readable", "not_gguf": "not readable", "no_directions": "no direction.N tensor",
           "f16": "F16, not F32", "two_d": "not 1-D", "widths": "different widths", "index0": "index 0"}[case]
    with pytest.raises(BadFileError, match=why) as err:
        read_control_vector(path)
    assert err.value.path == str(path) and str(err.value).startswith(str(path))


def test_atomic_write_keeps_an_earlier_file(dirs, tmp_path, monkeypatch):
    path = dirs.export_gguf(tmp_path / "h.gguf", "helpful", layers=[1, 2])
    before = path.read_bytes()

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        dirs.export_gguf(path, "honest", layers=[3, 4])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["h.gguf"]  # no temp file left


def test_command_line():
    assert llama_cpp_command("h.gguf", layers=[3, 5, 4], gamma=0.5) == (
        "llama-cli -m MODEL.gguf --control-vector-scaled h.gguf:0.5 --control-vector-layer-range 3 5")
    assert "--control-vector h.gguf " in llama_cpp_command("h.gguf", layers=[3], baked=True)


def test_cli_export_writes_and_prints_the_command(dirs, tmp_path, capsys):
    folder = dirs.save(tmp_path / "dirs")
    out = tmp_path / "out" / "helpful.gguf"
    assert main(["export", "--directions", str(folder), "--criterion", "helpful", "--out", str(out),
                 "--layers", "1-3", "--scale", "unit"]) == 0
    printed = capsys.readouterr().out
    assert "--control-vector-scaled" in printed and "--control-vector-layer-range 1 3" in printed
    cv = read_control_vector(out, n_layers=N_LAYERS)
    want = steering_vectors(dirs, "helpful", 1.0, layers=[1, 2, 3], scale="unit")
    assert cv.layers == [1, 2, 3] and all(torch.equal(cv.vectors[k], want[x][0]) for k, x in enumerate(cv.layers))
    assert main(["export", "--directions", str(folder), "--criterion", "helpful", "--out", str(out),
                 "--layers", "all", "--gamma", "0.2"]) == 0
    assert "--control-vector " in capsys.readouterr().out
    assert read_control_vector(out).layers == list(range(1, N_LAYERS))
    assert main(["export", "--directions", str(folder), "--criterion", "helpful", "--out", str(out),
                 "--layers", "0-2"]) == 2
    assert "block 0" in capsys.readouterr().err
