"""Loading models: the tiny HF folder, clear errors for bad sources, the cache folder, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import icon2_lens as il
from icon2_lens import models


def test_tiny_model_info(tiny_model, tiny_model_dir):
    info = tiny_model.info
    assert info.kind == "hf_dir"
    assert info.hf_path == str(tiny_model_dir) and info.model_id == tiny_model_dir.name
    assert info.architecture == "LlamaForCausalLM"
    assert (info.n_layers, info.d_model) == (4, 64) == (tiny_model.n_layers, tiny_model.d_model)
    assert len(info.fingerprint) == 16 and int(info.fingerprint, 16) >= 0
    assert info.to_dict()["fingerprint"] == info.fingerprint
    assert tiny_model.device.type == "cpu"
    assert tiny_model.tokenizer.pad_token == "<pad>"
    assert "tiny-llama" in repr(tiny_model)


def test_hf_model_is_a_separate_plain_model(tiny_model):
    hf = tiny_model.hf_model()
    assert type(hf).__name__ == "LlamaForCausalLM"
    bridge_params = {p.data_ptr() for p in tiny_model.bridge.parameters()}
    assert not any(p.data_ptr() in bridge_params for p in hf.parameters())
    assert next(hf.parameters()).dtype == torch.float32
    assert hf.config.num_hidden_layers == 4


def test_fingerprint_tracks_shape_not_weights():
    from transformers import LlamaConfig

    a = models.config_fingerprint(LlamaConfig(hidden_size=64, num_hidden_layers=2))
    assert a == models.config_fingerprint(LlamaConfig(hidden_size=64, num_hidden_layers=2))
    assert a != models.config_fingerprint(LlamaConfig(hidden_size=64, num_hidden_layers=3))
    assert a != models.config_fingerprint(LlamaConfig(hidden_size=32, num_hidden_layers=2))
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2).to_dict()
    assert models.config_fingerprint({"model_type": "llava", "text_config": cfg}) != a  # model_type kept from outer


def test_fingerprint_tracks_rope_base():
    from transformers import LlamaConfig

    a = LlamaConfig(hidden_size=64, num_hidden_layers=2)
    b = LlamaConfig(hidden_size=64, num_hidden_layers=2, rope_theta=1_000_000.0)
    assert models.config_fingerprint(a) != models.config_fingerprint(b)


def test_other_model_differs(tiny_model, other_tiny_model):
    assert other_tiny_model.info.fingerprint != tiny_model.info.fingerprint
    assert (other_tiny_model.n_layers, other_tiny_model.d_model) == (3, 32)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        il.load_model(tmp_path / "empty", device="cpu")


@pytest.mark.parametrize("rel", ["does/not/exist", "./missing-model"])
def test_missing_path(tmp_path, rel):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        il.load_model(str(tmp_path / rel), device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        il.load_model(rel, device="cpu")


def test_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.gguf"):
        il.load_model(tmp_path / "model.gguf", device="cpu")


def test_non_gguf_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf file"):
        il.load_model(p, device="cpu")


def test_hf_id_not_in_cache_stays_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as exc:
        il.load_model("nobody/does-not-exist-xyz", device="cpu")
    msg = str(exc.value)
    assert "nobody/does-not-exist-xyz" in msg
    assert "local HF folder" in msg and ".gguf" in msg and "--allow-download" in msg
    assert "local_files_only=False" in msg


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ICON2_LENS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("ICON2_LENS_CACHE", "~/somewhere")
    assert models.cache_dir() == Path.home() / "somewhere"
    monkeypatch.delenv("ICON2_LENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "icon2_lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "icon2_lens"


def test_gguf_cache_folder_lives_under_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ICON2_LENS_CACHE", str(tmp_path / "c"))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    folder = models._gguf_cache_folder(g)
    assert folder.parent == tmp_path / "c" / "models" and folder.name.startswith("m-")
    assert models._gguf_cache_folder(g) == folder  # stable


def test_relative_folder_is_recorded_absolutely(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model_dir)
    m = il.load_model(".", device="cpu")
    assert m.info.model_id == tiny_model_dir.name
    monkeypatch.chdir(tmp_path)
    assert m.hf_model().config.num_hidden_layers == 4


def test_chat_template_argument_is_used(tiny_model_no_template_dir):
    from conftest import CHATML

    base = il.load_model(tiny_model_no_template_dir, device="cpu")
    assert not base.tokenizer.chat_template
    fixed = il.load_model(tiny_model_no_template_dir, device="cpu", chat_template=CHATML)
    assert fixed.tokenizer.chat_template == CHATML
    assert il.render_chat(fixed.tokenizer, "Hi", system="S") == (
        "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generation_model_shares_weights_and_matches_hf(tiny_model):
    gen = il.gen.hf_model(tiny_model)
    assert gen is il.gen.hf_model(tiny_model)  # made once per LoadedModel
    bridge_ptrs = {p.data_ptr() for p in tiny_model.bridge.original_model.parameters()}
    assert all(p.data_ptr() in bridge_ptrs for p in gen.parameters())  # no copy of the weights
    assert not any(t.is_meta for t in [*gen.parameters(), *gen.buffers()])
    ids = tiny_model.tokenizer("<|im_start|>user\nWrite a haiku.<|im_end|>\n", add_special_tokens=False,
                               return_tensors="pt")["input_ids"]
    fresh = tiny_model.hf_model()
    with torch.inference_mode():
        torch.testing.assert_close(gen(ids).logits, fresh(ids).logits, atol=1e-5, rtol=0)
