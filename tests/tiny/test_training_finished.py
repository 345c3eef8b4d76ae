"""TrainConfig.finished_only: pairs with a response cut at the token budget are left out of training (tiny model)."""

from __future__ import annotations

import json

import pytest

from icon2_lens.cli import main
from icon2_lens.training import TrainConfig, _pairs_dataset, train


def _row(i: int, chosen_finished: bool | None = True, rejected_finished: bool | None = True) -> dict:
    r = {"prompt": [{"role": "user", "content": f"Question number {i}?"}],
         "chosen": [{"role": "assistant", "content": f"A clear and helpful answer {i}."}],
         "rejected": [{"role": "assistant", "content": "bad bad bad"}]}
    if chosen_finished is not None:
        r["chosen_finished"] = chosen_finished
    if rejected_finished is not None:
        r["rejected_finished"] = rejected_finished
    return r


# 0, 2: both finished; 1: chosen cut; 3: rejected cut; 4: no flags (counts as finished); 5: both cut
MIXED = [_row(0), _row(1, chosen_finished=False), _row(2), _row(3, rejected_finished=False),
         _row(4, None, None), _row(5, False, False)]
UNFINISHED = [_row(i, chosen_finished=False) for i in range(3)]


def test_finished_only_is_the_default():
    assert TrainConfig().finished_only is True


def test_pairs_dataset_drops_and_counts():
    ds, counts = _pairs_dataset(MIXED, finished_only=True)
    assert counts == {"given": 6, "not_pairs": 0, "dropped": 3, "trimmed": 0} and len(ds) == 3
    assert [r["prompt"][0]["content"] for r in ds] == ["Question number 0?", "Question number 2?",
                                                       "Question number 4?"]
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    ds_all, none = _pairs_dataset(MIXED, finished_only=False)
    assert none["dropped"] == 0 and len(ds_all) == len(MIXED)


def test_trim_unfinished_cuts_at_the_last_sentence_and_drops_what_cannot_be_trimmed():
    cut = _row(7, chosen_finished=False)
    cut["chosen"] = [{"role": "assistant", "content": "Boil the water first and salt it well. Then add the pasta"}]
    hopeless = _row(8, rejected_finished=False)
    hopeless["rejected"] = [{"role": "assistant", "content": "an answer that never reaches the end of its sentence"}]
    ds, counts = _pairs_dataset([_row(0), cut, hopeless], finished_only=True, trim=True)
    assert counts == {"given": 3, "not_pairs": 0, "dropped": 1, "trimmed": 1}
    assert [r["chosen"][0]["content"] for r in ds] == ["A clear and helpful answer 0.", "Boil the water first and salt it well."]


def test_pairs_dataset_reads_files(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in MIXED))
    assert _pairs_dataset(f, finished_only=True)[1]["dropped"] == 3
    assert _pairs_dataset(tmp_path, finished_only=True)[1]["dropped"] == 3  # a generate folder


def test_all_unfinished_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"None of the 3 pairs has both responses finished.*finished_only=False"):
        train(UNFINISHED, config=TrainConfig(max_steps=1, precision="fp32"), model_source=tiny_model_dir,
              output_dir=tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_finished_only_trains_on_the_finished_pairs(tiny_model_dir, tmp_path):
    said: list[str] = []
    res = train(MIXED, config=TrainConfig(max_steps=1, precision="fp32"), model_source=tiny_model_dir,
                output_dir=tmp_path / "out", device="cpu", progress=False, log=said.append)
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert cfg["finished_only"] is True and cfg["n_pairs"] == 3 and cfg["n_unfinished_dropped"] == 3
    assert any("training on 3 of 6 pairs" in s and "3 left out" in s for s in said), said


def test_finished_only_false_keeps_cut_pairs(tiny_model_dir, tmp_path):
    said: list[str] = []
    res = train(UNFINISHED, config=TrainConfig(max_steps=1, precision="fp32", finished_only=False),
                model_source=tiny_model_dir, output_dir=tmp_path / "out", device="cpu", progress=False,
                log=said.append)
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert cfg["finished_only"] is False and cfg["n_pairs"] == 3 and cfg["n_unfinished_dropped"] == 0
    assert not any("left out" in s for s in said)


def test_cli_no_finished_only(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in UNFINISHED))
    base = ["train", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--pairs", str(pairs),
            "--max-steps", "1", "--precision", "fp32"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "--no-finished-only" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--no-finished-only"]) == 0
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["n_pairs"] == 3


def test_pairs_dataset_skips_rows_that_are_not_pairs():
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a."}],
            "rejected": [{"role": "assistant", "content": "b."}]}
    rows = [pair, {**pair, "chosen": None, "rejected": None, "kept": False, "drop_reason": "tie"}]
    ds, counts = _pairs_dataset(rows)
    assert len(ds) == 1 and counts["not_pairs"] == 1 and counts["given"] == 2
    with pytest.raises(ValueError, match="kept pair"):
        _pairs_dataset(rows[1:])
