"""train_dpo / train on the tiny model (the DPO and SimPO losses on the training pairs fall, the folder opens with
load_model); the precision chosen from the hardware; TrainConfig validation; the CLI."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

import icon2_lens as il
import icon2_lens.hardware as hardware
import icon2_lens.training as training
from icon2_lens.cli import main
from icon2_lens.training import TrainConfig, choose_precision, load_train_log, train, train_dpo

PAIRS = [
    {"prompt": [{"role": "user", "content": f"Question number {i}?"}],
     "chosen": [{"role": "assistant", "content": "A clear and helpful answer."}],
     "rejected": [{"role": "assistant", "content": "bad bad bad"}]}
    for i in range(8)
]


@pytest.fixture
def avx2_only(monkeypatch):
    """A CPU without native bf16, whatever this machine has."""
    monkeypatch.setattr(hardware, "torch_cpu_bf16", lambda: None)
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: [])


@pytest.fixture
def trainer_args(monkeypatch):
    """The config object TRL's DPOTrainer receives (``trainer_args["args"]`` after training)."""
    import trl

    seen: dict = {}

    class Recording(trl.DPOTrainer):
        def __init__(self, *a, **kw):
            seen["args"] = kw["args"]
            super().__init__(*a, **kw)

    monkeypatch.setattr(trl, "DPOTrainer", Recording)
    return seen


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
    # the trainer switches the KV cache off; it is saved on again
    assert json.loads((res.output_dir / "config.json").read_text())["use_cache"] is True
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


# ------------------------------------------------------------------------------ precision and TrainConfig

@pytest.mark.parametrize("bf16", [True, False])
def test_choose_precision_cuda(monkeypatch, bf16):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    precision, reason = choose_precision("cuda:1")
    assert precision == ("bf16" if bf16 else "fp32")
    assert "Fake GPU" in reason


def test_choose_precision_cuda_unavailable(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_precision("cuda") == ("fp32", "CUDA asked for but not available")


@pytest.mark.parametrize(("torch_says", "cpuinfo_says", "expected"), [
    (None, ["avx512_bf16", "amx_bf16"], "bf16"),  # torch without the private helpers: /proc/cpuinfo decides
    (None, ["amx_bf16"], "bf16"),
    (None, [], "fp32"),                           # AVX2-only CPU (e.g. AMD EPYC of the 7003 series)
    (None, None, "fp32"),                         # nothing readable: the safe choice
    (["avx512_bf16"], [], "bf16"),                # torch's own check wins where it exists
    ([], ["amx_bf16"], "fp32"),
])
def test_choose_precision_cpu(monkeypatch, torch_says, cpuinfo_says, expected):
    monkeypatch.setattr(hardware, "torch_cpu_bf16", lambda: torch_says)
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: cpuinfo_says)
    monkeypatch.setattr(hardware, "cpu_name", lambda: "Test CPU 9000")
    precision, reason = choose_precision("cpu")
    assert precision == expected
    assert "Test CPU 9000" in reason and "\n" not in reason
    if cpuinfo_says == [] and torch_says is None:
        assert "without native bf16" in reason


def test_choose_precision_other_devices():
    assert choose_precision("mps")[0] == "fp32"
    assert choose_precision("xpu:0")[0] == "fp32"


def test_cpuinfo_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert hardware.cpu_bf16_flags(avx2) == []
    assert hardware.cpu_bf16_flags(amx) == ["avx512_bf16", "amx_bf16"]
    assert hardware.cpu_bf16_flags(tmp_path / "missing") is None


def test_train_config_defaults_and_types():
    c = TrainConfig()
    assert (c.objective, c.preset, c.precision, c.gradient_checkpointing, c.lora, c.max_steps) == (
        "dpo", "demo", "auto", False, False, -1)
    assert c.hyperparameters() == {k: v for k, v in training.PRESETS["demo"].items() if not k.startswith("simpo")}
    assert TrainConfig(preset="paper", learning_rate=1e-6).hyperparameters()["learning_rate"] == 1e-6
    hints = typing.get_type_hints(TrainConfig)  # works under `from __future__ import annotations`
    assert hints["precision"] == typing.Literal["auto", "fp32", "bf16"]
    assert hints["beta"] == (float | None)
    assert {f.name for f in dataclasses.fields(TrainConfig)} >= {"objective", "preset", "lora_r", "seed"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.beta = 0.2  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig("dpo")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"preset": "fast"}, "Unknown preset 'fast'"),
    ({"precision": "fp16"}, "Unknown precision 'fp16'; use one of"),
    ({"beta": 0.0}, "beta must be positive"),
    ({"learning_rate": -1e-5}, "learning_rate must be positive"),
    ({"epochs": float("nan")}, "epochs must be positive"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"gradient_accumulation": 0}, "gradient_accumulation must be at least 1"),
    ({"max_length": 0}, "max_length must be at least 1"),
    ({"lora_r": 0}, "lora_r must be at least 1"),
    ({"max_steps": 0}, "max_steps must be -1"),
    ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
    ({"beta": "0.1"}, "beta must be a number"),
    ({"lora": "yes"}, "lora must be True or False"),
    ({"seed": True}, "seed must be an integer"),
])
def test_train_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig(**kwargs)


def test_fp32_without_checkpointing_on_a_cpu_without_bf16(tiny_model_dir, tmp_path, avx2_only, trainer_args):
    """On an AVX2-only CPU train_dpo hands TRL bf16=False, fp16=False and checkpointing off, and says so."""
    lines: list[str] = []
    res = train_dpo(PAIRS[:2], model_source=tiny_model_dir, output_dir=tmp_path / "out", max_steps=1, device="cpu",
                    progress=False, log=lines.append)
    args = trainer_args["args"]
    assert args.bf16 is False and args.fp16 is False and args.gradient_checkpointing is False
    assert getattr(args, "activation_checkpointing", False) is False
    assert len(lines) == 1 and lines[0].startswith("training precision: fp32 (CPU without native bf16")
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert cfg["precision"] == "fp32" and cfg["precision_asked"] == "auto" and cfg["gradient_checkpointing"] is False
    assert cfg["precision_reason"] in lines[0]
    assert "elapsed_s" in res.history[0]


def test_explicit_precision_and_checkpointing(tiny_model_dir, tmp_path, avx2_only, trainer_args, capsys):
    res = train_dpo(PAIRS[:2], model_source=tiny_model_dir, output_dir=tmp_path / "out", max_steps=1, device="cpu",
                    progress=False, precision="bf16", gradient_checkpointing=True)
    assert trainer_args["args"].bf16 is True and trainer_args["args"].gradient_checkpointing is True
    out = capsys.readouterr().out  # the default log is print
    assert "training precision: bf16 (asked for; auto would choose fp32" in out
    assert "gradient checkpointing on" in out
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert cfg["precision"] == "bf16" and cfg["gradient_checkpointing"] is True


# ---------------------------------------------------------------------------------------------- SimPO


@pytest.fixture
def cpo_args(monkeypatch):
    """The config object TRL's CPOTrainer receives (``cpo_args["args"]``), and whether a reference was passed."""
    config_cls, trainer_cls = training.trainer.cpo_classes()
    seen: dict = {}

    class Recording(trainer_cls):
        def __init__(self, *a, **kw):
            seen["args"] = kw["args"]
            seen["kwargs"] = set(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(training.trainer, "cpo_classes", lambda: (config_cls, Recording))
    return seen


def test_simpo_lowers_loss_and_saves_a_loadable_folder(tiny_model_dir, tmp_path, avx2_only, cpo_args):
    lines: list[str] = []
    res = train(PAIRS, config=TrainConfig(objective="simpo", learning_rate=1e-3, epochs=2), model_source=tiny_model_dir,
                output_dir=tmp_path / "out", device="cpu", progress=False, log=lines.append)
    assert res.steps == 8
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    assert res.history[-1]["reward_accuracy"] == 1.0 and res.history[-1]["reward_margin"] > 0
    args = cpo_args["args"]
    assert (args.loss_type, args.cpo_alpha, args.beta, args.simpo_gamma) == ("simpo", 0.0, 2.0, 0.5)
    assert args.bf16 is False and args.gradient_checkpointing is False
    assert "ref_model" not in cpo_args["kwargs"]  # SimPO has no reference model
    assert lines[0].startswith("training precision: fp32")
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert (cfg["objective"], cfg["beta"], cfg["simpo_gamma"], cfg["steps"]) == ("simpo", 2.0, 0.5, 8)
    trained = il.load_model(res.output_dir, device="cpu")
    assert trained.info.fingerprint == il.load_model(tiny_model_dir, device="cpu").info.fingerprint
    assert json.loads((res.output_dir / "config.json").read_text())["use_cache"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sao_preset(tiny_model_dir, tmp_path, cpo_args):
    config = TrainConfig(objective="simpo", preset="sao", batch_size=2, gradient_accumulation=1, max_steps=1)
    res = train(PAIRS[:2], config=config, model_source=tiny_model_dir, output_dir=tmp_path / "out", device="cpu",
                progress=False, log=lambda line: None)
    assert (cpo_args["args"].beta, cpo_args["args"].simpo_gamma, cpo_args["args"].learning_rate) == (10.0, 3.0, 1e-6)
    cfg = json.loads((res.output_dir / "train_config.json").read_text())
    assert (cfg["preset"], cfg["objective"], cfg["beta"], cfg["simpo_gamma"], cfg["learning_rate"]) == (
        "sao", "simpo", 10.0, 3.0, 1e-6)
    assert TrainConfig(objective="simpo", preset="sao", simpo_gamma=1.0, beta=5.0).hyperparameters()[
        "simpo_gamma"] == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"preset": "sao"}, "preset 'sao' is SAO's SimPO recipe .* needs objective='simpo', got objective='dpo'"),
    ({"simpo_gamma": 1.0}, "simpo_gamma is SimPO's target margin and does nothing with objective='dpo'"),
    ({"objective": "simpo", "simpo_gamma": -1.0}, "simpo_gamma must be >= 0"),
    ({"objective": "orpo"}, "Unknown objective 'orpo'; use one of"),
])
def test_objective_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_train_rejects_a_non_config(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="config must be a TrainConfig"):
        train(PAIRS, config={"objective": "simpo"}, model_source=tiny_model_dir, output_dir=tmp_path / "a")  # type: ignore[arg-type]


def test_cli_train_simpo(tiny_model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "trained"
    rc = main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--pairs", str(pairs),
               "--out", str(out), "--objective", "simpo", "--max-steps", "2", "--precision", "fp32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "training precision: fp32 (asked for" in printed and str(out / "train_log.jsonl") in printed
    assert len(load_train_log(out)) == 2
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["objective"], cfg["precision"], cfg["gradient_checkpointing"]) == ("simpo", "fp32", False)
    # --preset sao alone means SimPO; an explicit --objective dpo with it is an error naming the fix
    rc = main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--pairs", str(pairs),
               "--out", str(tmp_path / "sao"), "--preset", "sao", "--batch-size", "2", "--gradient-accumulation", "1",
               "--max-steps", "1", "--gradient-checkpointing"])
    assert rc == 0
    cfg = json.loads((tmp_path / "sao" / "train_config.json").read_text())
    assert (cfg["objective"], cfg["beta"], cfg["simpo_gamma"], cfg["gradient_checkpointing"]) == (
        "simpo", 10.0, 3.0, True)
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "x"),
                 "--preset", "sao", "--objective", "dpo"]) == 2
    assert "pass objective='simpo'" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "y"),
                 "--simpo-gamma", "1"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
