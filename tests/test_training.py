"""train_dpo on the tiny model: the DPO loss on its training pairs falls, the folder opens with load_model."""

from __future__ import annotations

import json

import pytest

import icon2_lens as il
from icon2_lens.cli import main
from icon2_lens.training import load_train_log, train_dpo

PAIRS = [
    {"prompt": [{"role": "user", "content": f"Question number {i}?"}],
     "chosen": [{"role": "assistant", "content": "A clear and helpful answer."}],
     "rejected": [{"role": "assistant", "content": "bad bad bad"}]}
    for i in range(8)
]


def test_training_lowers_loss_and_saves_a_loadable_folder(tiny_model_dir, tmp_path):
    res = train_dpo(PAIRS, model_source=tiny_model_dir, output_dir=tmp_path / "out", learning_rate=1e-3, epochs=2,
                    device="cpu", progress=False)
    assert res.steps == 8  # 8 pairs, batch 2, 2 epochs
    losses = [r["loss"] for r in res.history]
    assert len(losses) == res.steps
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: log 2
    assert losses[-1] < 0.5 * losses[0]
    assert res.history[-1]["reward_accuracy"] == 1.0 and res.history[-1]["reward_margin"] > 0
    assert load_train_log(res.output_dir) == res.history
    assert res.curve_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert cfg["steps"] == 8 and cfg["n_pairs"] == 8 and cfg["learning_rate"] == 1e-3 and cfg["preset"] == "demo"
    trained = il.load_model(res.output_dir, device="cpu")
    base = il.load_model(tiny_model_dir, device="cpu")
    assert trained.info.fingerprint == base.info.fingerprint  # same shape: the base's directions apply
    assert trained.tokenizer.chat_template == base.tokenizer.chat_template
    assert trained.generation_model().config.use_cache  # the trainer switches the KV cache off; saved on again
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch or temp folder is left behind


def test_training_bad_input(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="No pairs"):
        train_dpo([], model_source=tiny_model_dir, output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="lack"):
        train_dpo([{"prompt": "x", "chosen": "y"}], model_source=tiny_model_dir, output_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="generate pairs first"):
        train_dpo(tmp_path / "nowhere", model_source=tiny_model_dir, output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="Unknown preset"):
        train_dpo(PAIRS, model_source=tiny_model_dir, output_dir=tmp_path / "a", preset="fast")
    with pytest.raises(ValueError, match="positive"):
        train_dpo(PAIRS, model_source=tiny_model_dir, output_dir=tmp_path / "a", beta=0.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        train_dpo(PAIRS, model_source=tiny_model_dir, output_dir=tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_cli_train(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "trained"
    rc = main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--pairs", str(pairs),
               "--out", str(out), "--max-steps", "2"])
    assert rc == 0
    assert str(out / "train_log.jsonl") in capsys.readouterr().out
    assert len(load_train_log(out)) == 2
    assert main(["train", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "t2")]) == 2


def test_non_main_process_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Under accelerate/torchrun every process runs train_dpo; only RANK 0 may write the folder."""
    monkeypatch.setenv("RANK", "1")
    res = train_dpo(PAIRS[:2], model_source=tiny_model_dir, output_dir=tmp_path / "out", max_steps=1, device="cpu",
                    progress=False)
    assert res.steps == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, scratch removed
