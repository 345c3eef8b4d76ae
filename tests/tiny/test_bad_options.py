"""Bad options and settings (issue 17, items 2, 3 and 5): checked before any work, one error type, CLI words.

Each case is tried through the Python API (a `BadInputError` naming the option) and, where there is a command
for it, through the CLI in-process: exit code 2, the option in its CLI spelling, no traceback, and every file
that was there before byte-identical afterwards (nothing left behind either).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

import icon2_lens as il
from icon2_lens.activations import check_fits, context_length
from icon2_lens.cli import main
from icon2_lens.cli.options import cli_message
from icon2_lens.controls import ControlsConfig
from icon2_lens.errors import BadInputError
from icon2_lens.evaluation import EvaluateConfig
from icon2_lens.gen import Decoding, engine
from icon2_lens.hardware import resolve_device
from icon2_lens.judges import RewardModelScorer, check_judge, make_judge
from icon2_lens.layers import LayersConfig
from icon2_lens.pairs import PairsConfig, generate_pairs, generate_steered
from icon2_lens.pipeline import run_pipeline
from icon2_lens.pipeline.compare import CompareConfig
from icon2_lens.pipeline.config import load_config
from icon2_lens.pipeline.distill_run import DistillConfig, run_distill
from icon2_lens.pipeline.stages import STAGES
from icon2_lens.prompts import render_chat
from icon2_lens.runs import io as runs_io
from icon2_lens.runs.batches import BatchJob, run_batches
from icon2_lens.runs.io import atomic_folder, open_run_folder
from icon2_lens.scoring import ScoreConfig, score_instructions
from icon2_lens.synthesis import SynthesisConfig

from conftest import INSTRUCTIONS

NAN, INF = float("nan"), float("inf")
LONG = "Tell me about " + "the sea and the sky, " * 120  # about 800 tokens: over the tiny model's 256
TABLE = [{"instruction": q, "criterion": "helpful"} for q in INSTRUCTIONS[:3]]


def _snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones too) under the folders: what 'byte-identical afterwards' compares."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def _cli(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit with 2 and say one line without a traceback. Returns stderr."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    """A folder with directions (suggested layers), a table and an instructions file: the earlier outputs."""
    root = tmp_path_factory.mktemp("bad")
    d = il.extract_directions(tiny_model, ["helpful", "honest"], INSTRUCTIONS, batch_size=6, progress=False)
    d.with_meta(suggested_layers=[1, 2]).save(root / "dirs")
    (root / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TABLE))
    (root / "instr.txt").write_text("\n".join(INSTRUCTIONS[:4]) + "\n")
    (root / "long.txt").write_text("\n".join([INSTRUCTIONS[0], LONG, INSTRUCTIONS[1]]) + "\n")
    return root


def _model_args(model_dir: Path, device: str = "cpu") -> list[str]:
    return ["--model", str(model_dir), "--device", device, "--no-progress"]


# ---- 1. every number finite and in range, checked by the config dataclasses (Python and CLI alike) ----------


@pytest.mark.parametrize("make, option", [
    (lambda: ScoreConfig(threshold=NAN), "threshold"),
    (lambda: ScoreConfig(top_fraction=1.5), "top_fraction"),
    (lambda: ScoreConfig(top_k=0), "top_k"),
    (lambda: ScoreConfig(min_separation=NAN), "min_separation"),
    (lambda: ScoreConfig(batch_size=0), "batch_size"),
    (lambda: ScoreConfig(threshold=0.5, balance_criteria=True), "balance_criteria"),
    (lambda: PairsConfig(gamma_pos=NAN), "gamma_pos"),
    (lambda: PairsConfig(gamma_neg=-INF), "gamma_neg"),
    (lambda: PairsConfig(gamma_pos=0.1, gamma_neg=0.5), "gamma_neg"),
    (lambda: PairsConfig(temperature=NAN), "temperature"),
    (lambda: PairsConfig(temperature=-1.0), "temperature"),
    (lambda: PairsConfig(top_p=0.0), "top_p"),
    (lambda: PairsConfig(top_p=1.5), "top_p"),
    (lambda: PairsConfig(repetition_penalty=INF), "repetition_penalty"),
    (lambda: PairsConfig(max_new_tokens=0), "max_new_tokens"),
    (lambda: PairsConfig(batch_size=0), "batch_size"),
    (lambda: Decoding(max_new_tokens=2.5), "max_new_tokens"),  # type: ignore[arg-type]
    (lambda: SynthesisConfig(temperature=INF), "temperature"),
    (lambda: SynthesisConfig(top_p=NAN), "top_p"),
    (lambda: SynthesisConfig(near_duplicate_threshold=NAN), "near_duplicate_threshold"),
    (lambda: SynthesisConfig(min_words=5, max_words=2), "max_words"),
    (lambda: LayersConfig(width=0), "width"),
    (lambda: LayersConfig(n_heldout=-1), "n_heldout"),
    (lambda: EvaluateConfig(level=NAN), "level"),
    (lambda: EvaluateConfig(n_boot=0), "n_boot"),
    (lambda: CompareConfig(repetition_penalty=NAN), "repetition_penalty"),
    (lambda: CompareConfig(level=NAN), "level"),
    (lambda: DistillConfig(learning_rate=NAN), "learning_rate"),
    (lambda: DistillConfig(temperature=INF), "temperature"),
])
def test_config_values_are_checked_in_python(make, option):
    with pytest.raises(BadInputError, match=option) as info:
        make()
    assert info.value.option == option


def test_good_configs_still_pass():
    ScoreConfig(threshold=-2.5), ScoreConfig(top_fraction=1.0), PairsConfig(temperature=0.7, top_p=1.0)
    SynthesisConfig(), LayersConfig(width=None), EvaluateConfig(), CompareConfig(), ControlsConfig(kinds=[])


def test_cli_message_speaks_in_option_names():
    assert cli_message("threshold=nan is not a finite number; give a number.", ["threshold"], "threshold") == \
        "--threshold nan is not a finite number; give a number."
    assert cli_message("temperature must be above 0, got -1.0; leave sampling off (do_sample=False).",
                       ["temperature", "do_sample"], "temperature") == \
        "--temperature must be above 0, got -1.0; leave sampling off (--no-do-sample)."
    assert cli_message("pass overwrite=True (CLI: --overwrite)", ["overwrite"]) == "pass --overwrite"
    assert cli_message("must be positive, got 0.", ["n_boot"], "n_boot") == "--n-boot: must be positive, got 0."


@pytest.mark.parametrize("argv, said", [
    (["score", "--threshold", "nan"], "--threshold nan is not a finite number"),
    (["score", "--threshold", "inf"], "--threshold inf is not a finite number"),
    (["score", "--top-fraction", "1.5"], "--top-fraction 1.5 is out of range"),
    (["generate", "--gamma-pos", "0.1", "--gamma-neg", "0.5"], "--gamma-neg must be below --gamma-pos"),
    (["generate", "--gamma-pos", "nan"], "--gamma-pos nan is not a finite number"),
    (["generate", "--temperature", "-1"], "--temperature must be above 0"),
    (["generate", "--top-p", "1.5"], "--top-p 1.5 is out of range"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["synthesize", "--temperature", "nan"], "--temperature nan is not a finite number"),
    (["layers", "--width", "0"], "--width must be positive"),
    (["calibrate", "--gammas-pos", "0.1,nan"], "--gammas-pos"),
    (["calibrate", "--win-threshold", "nan"], "--win-threshold"),
    (["calibrate", "--n", "0"], "--n must be positive"),
])
def test_cli_refuses_bad_numbers_before_any_work(tiny_model_dir, work, tmp_path, capsys, no_model_load, argv, said):
    io = {"score": ["--directions", str(work / "dirs"), "--instructions", str(work / "instr.txt")],
          "generate": ["--directions", str(work / "dirs"), "--instructions", str(work / "table.jsonl")],
          "calibrate": ["--directions", str(work / "dirs"), "--instructions", str(work / "table.jsonl")],
          "synthesize": ["--n", "4"], "layers": ["--directions", str(work / "dirs")]}[argv[0]]
    out = ["--out", str(tmp_path / "out")] if argv[0] != "layers" else []
    before = _snapshot(work)
    err = _cli(capsys, [argv[0], *_model_args(tiny_model_dir), *io, *out, *argv[1:]])
    assert said in err and f"icon2-lens {argv[0]}: error:" in err
    assert _snapshot(work) == before and not (tmp_path / "out").exists()


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: every check here must come before the model loads."""
    import transformers

    def refuse(*args, **kwargs):  # pragma: no cover - called only when a check came too late
        raise AssertionError("a model was loaded before the options were checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_cli_does_not_say_limit_for_n_instructions_in_a_run_config(tmp_path, capsys):
    with pytest.raises(BadInputError, match=r"extract\.n_instructions: n_instructions must be positive") as info:
        load_config({"extract": {"n_instructions": 0}})
    assert info.value.option == "extract.n_instructions" and "limit" not in str(info.value)


# ---- the run config: checked when it is loaded (gamma+ > gamma-, NaN, device, judge, pipeline-only fields) ---


@pytest.mark.parametrize("cfg, key", [
    ({"generate": {"gamma_pos": 0.1, "gamma_neg": 0.5}}, "generate.gamma_neg"),
    ({"generate": {"gamma_pos": NAN}}, "generate.gamma_pos"),
    ({"score": {"threshold": NAN}}, "score.threshold"),
    ({"synthesize": {"n": 0}}, "synthesize.n"),
    ({"evaluate": {"n_preference": 0}}, "evaluate.n_preference"),
    ({"evaluate": {"judge": "banana"}}, "evaluate.judge"),
    ({"device": "banana"}, "device"),
])
def test_run_config_is_checked_at_load_time(cfg, key):
    with pytest.raises(BadInputError, match=key.replace(".", r"\.")) as info:
        load_config(cfg)
    assert info.value.option == key
    assert "(CLI:" not in str(info.value)  # a config file's key, not a CLI option


def test_run_with_gamma_pos_below_gamma_neg_fails_before_any_stage(tmp_path, capsys, no_model_load):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("generate:\n  gamma_pos: 0.5\n  gamma_neg: 1.0\n")
    err = _cli(capsys, ["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert "generate.gamma_neg" in err and "must be below gamma_pos" in err
    assert not (tmp_path / "run").exists()


# ---- 2. devices -------------------------------------------------------------------------------------------


def test_unknown_device_is_refused():
    for bad in ("banana", "CPU", "cuda:x", "meta"):
        with pytest.raises(BadInputError, match="--device") as info:
            resolve_device(bad)
        assert info.value.option == "device" and repr(bad) in str(info.value)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadInputError, match="sees no CUDA GPU") as info:
        resolve_device("cuda")
    assert info.value.option == "device" and "'cpu'" in str(info.value)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BadInputError, match="names GPU 5"):
        resolve_device("cuda:5")


def test_cli_refuses_bad_devices_before_any_work(tiny_model_dir, work, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = _snapshot(work)
    for device, said in (("banana", "is not a torch device"), ("cuda", "sees no CUDA GPU")):
        err = _cli(capsys, ["calibrate", *_model_args(tiny_model_dir, device), "--directions", str(work / "dirs"),
                            "--instructions", str(work / "table.jsonl"), "--out", str(tmp_path / "cal")])
        assert "--device" in err and said in err
        err = _cli(capsys, ["baseline", "system_prompts", *_model_args(tiny_model_dir, device),
                            "--instructions", str(work / "table.jsonl"), "--out", str(tmp_path / "base")])
        assert "--device" in err
        err = _cli(capsys, ["distill", "data", "--device", device, "--out", str(tmp_path / "mm")])
        assert "--device" in err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("device: banana\n")
    assert "device: device 'banana'" in _cli(capsys, ["run", "--config", str(cfg), "--out", str(tmp_path / "r")])
    with pytest.raises(BadInputError, match="device"):
        run_distill(DistillConfig(), out=tmp_path / "mm", device="banana")
    assert _snapshot(work) == before
    assert not [p for p in tmp_path.iterdir() if p.name != "run.yaml"]


# ---- 3. instructions longer than the model's context: refused before any forward pass -------------------------


class _Forwards:
    """Counts forward passes of a torch module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


def test_the_tiny_model_context_is_read_from_its_config(tiny_model):
    assert context_length(tiny_model) == 256
    check_fits([256, 10], 256)  # a prompt of exactly the context fits
    with pytest.raises(BadInputError, match="1 of 2 prompts is longer than the context of m"):
        check_fits([257, 10], 256, model_id="m")


def test_generate_pairs_refuses_long_instructions_before_any_batch(tiny_model, work, tmp_path):
    dirs = il.DirectionSet.load(work / "dirs")
    table = [*TABLE, {"instruction": LONG, "criterion": "honest"}]  # the long one is in the last batch
    n = len(tiny_model.tokenizer(render_chat(tiny_model.tokenizer, LONG), add_special_tokens=False)["input_ids"])
    calls = _Forwards(engine(tiny_model).hf_model)
    try:
        with pytest.raises(BadInputError, match=rf"1 of 4 instructions is longer than the context of tiny-llama "
                                                rf"\(256 tokens\): the longest is {n} tokens") as info:
            generate_pairs(tiny_model, dirs, table, PairsConfig(max_new_tokens=2, batch_size=1), out=tmp_path / "g",
                           progress=False)
    finally:
        calls.handle.remove()
    assert info.value.option == "instructions" and "--instructions" in str(info.value)
    assert calls.n == 0 and not (tmp_path / "g").exists()


def test_scoring_extraction_and_generation_refuse_long_prompts(tiny_model, work):
    dirs = il.DirectionSet.load(work / "dirs")
    calls = _Forwards(tiny_model.bridge)
    try:
        with pytest.raises(BadInputError, match="1 of 4 instructions is longer than the context"):
            score_instructions(tiny_model, dirs, [*INSTRUCTIONS[:3], LONG], batch_size=1, progress=False)
        with pytest.raises(BadInputError, match="longer than the context"):
            il.extract_directions(tiny_model, ["helpful"], [INSTRUCTIONS[0], LONG], progress=False)
    finally:
        calls.handle.remove()
    assert calls.n == 0
    calls = _Forwards(engine(tiny_model).hf_model)
    try:
        with pytest.raises(BadInputError, match="1 of 2 prompts is longer than the context"):
            generate_steered(tiny_model, [render_chat(tiny_model.tokenizer, q) for q in (INSTRUCTIONS[0], LONG)],
                             max_new_tokens=2)
    finally:
        calls.handle.remove()
    assert calls.n == 0


def test_cli_refuses_long_instructions(tiny_model_dir, work, tmp_path, capsys):
    before = _snapshot(work)
    err = _cli(capsys, ["score", *_model_args(tiny_model_dir), "--directions", str(work / "dirs"),
                        "--instructions", str(work / "long.txt"), "--out", str(tmp_path / "s")])
    assert "1 of 3 instructions is longer than the context" in err and "--instructions" in err
    assert _snapshot(work) == before and not (tmp_path / "s").exists()


# ---- 4. nothing left behind --------------------------------------------------------------------------------


def test_a_failed_first_batch_leaves_no_settings_that_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "run"

    def boom(b, covers, seed):
        raise BadInputError("temperature must be above 0", option="temperature")

    job = BatchJob(stage="generate", n_rows=4, batch_size=2, seed=0, make=boom)
    with pytest.raises(BadInputError):
        run_batches(job, out=out, settings={"temperature": -1.0}, progress=False)
    assert not out.exists()  # the folder it made, with the settings file, is gone
    out.mkdir()
    with pytest.raises(BadInputError):
        run_batches(job, out=out, settings={"temperature": -1.0}, progress=False)
    assert out.is_dir() and not any(out.iterdir())  # a folder it did not make is kept, emptied of its files
    good = BatchJob(stage="generate", n_rows=4, batch_size=2, seed=0, make=lambda b, c, s: [{"x": i} for i in c])
    assert len(run_batches(good, out=out, settings={"temperature": 0.7}, progress=False)) == 4


def test_settings_of_a_run_without_rows_are_replaced_and_with_rows_refused(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "generation.json").write_text(json.dumps({"temperature": -1.0}))  # what a failed run left before
    (out / "pairs.jsonl").write_text('{"index": 0, "torn"')  # at most a torn line: no complete row
    data = open_run_folder(out, {"temperature": 0.7}, settings_name="generation.json", data_name="pairs.jsonl",
                           what="generate")
    assert json.loads((out / "generation.json").read_text()) == {"temperature": 0.7} and not data.exists()
    data.write_text('{"index": 0}\n')
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"temperature: 0\.7 there, 1\.0 now"):
        open_run_folder(out, {"temperature": 1.0}, settings_name="generation.json", data_name="pairs.jsonl",
                        what="generate")
    assert _snapshot(out) == before


def test_cli_generate_into_a_folder_left_by_a_failed_run(tiny_model_dir, work, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "generation.json").write_text(json.dumps({"temperature": -1.0, "max_new_tokens": 2}))
    assert main(["generate", *_model_args(tiny_model_dir), "--directions", str(work / "dirs"), "--instructions",
                 str(work / "table.jsonl"), "--out", str(out), "--max-new-tokens", "2", "--scale", "relative",
                 "--gamma-pos", "0.5", "--gamma-neg", "-0.5"]) == 0
    capsys.readouterr()
    assert len((out / "pairs.jsonl").read_text().splitlines()) == len(TABLE)
    assert json.loads((out / "generation.json").read_text())["max_new_tokens"] == 2


def _failing(stage: str, exc: BaseException):
    def run(ctx, folder, meter, cfg, section):
        (folder / "partial.tmp").write_text("x")
        (folder / "partial.tmp").unlink()  # a stage that wrote nothing that stays
        raise exc
    return {**STAGES, stage: dataclasses.replace(STAGES[stage], run=run, uses_model=lambda section: False)}


@pytest.mark.parametrize("exc, status", [(BadInputError("bad value"), "failed"), (KeyboardInterrupt(), "interrupted")])
def test_a_failed_stage_is_marked_and_leaves_no_empty_folder(tmp_path, exc, status):
    out = tmp_path / "run"
    with pytest.raises(type(exc)):
        run_pipeline(None, out=out, stop_after="extract", log=None, stages=_failing("extract", exc))
    entry = json.loads((out / "manifest.json").read_text())["stages"]["extract"]
    assert entry["status"] == status
    if status == "failed":
        assert entry["error"] == "BadInputError: bad value"
    assert not (out / "extract").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json"]


def test_a_failed_atomic_replace_leaves_no_hidden_folder(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.json").write_text('{"old": 1}')
    before = _snapshot(tmp_path)
    real = os.replace

    def refuse_moving_aside(src, dst):
        if Path(src) == target:
            raise PermissionError(13, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(runs_io.os, "replace", refuse_moving_aside)
    with pytest.raises(PermissionError), atomic_folder(target, overwrite=True) as tmp:
        (tmp / "a.json").write_text('{"new": 1}')
    assert _snapshot(tmp_path) == before  # no .out.*.old, no .out.*.tmp, the old folder as it was


# ---- 5. unknown judges and reward models ----------------------------------------------------------------------


def test_unknown_judge_lists_what_a_judge_can_be(tmp_path):
    for bad in ("banana", str(tmp_path / "no-such-model")):
        with pytest.raises(BadInputError, match=r"'embedded'.*OpenAI-compatible") as info:
            make_judge(bad, device="cpu")
        assert info.value.option == "judge" and "--judge" in str(info.value)
    check_judge("embedded"), check_judge("http://127.0.0.1:9/v1")
    with pytest.raises(BadInputError, match="device"):
        make_judge("embedded", device="banana")


def test_unknown_reward_model_is_refused_without_talking_about_the_internet(tiny_model_dir, work, tmp_path, capsys,
                                                                          no_model_load):
    with pytest.raises(BadInputError, match=r"reward-probe.*self-probe.*judge") as info:
        RewardModelScorer("banana", device="cpu")
    assert info.value.option == "reward_model"
    before = _snapshot(work)
    err = _cli(capsys, ["calibrate", *_model_args(tiny_model_dir), "--directions", str(work / "dirs"),
                        "--instructions", str(work / "table.jsonl"), "--out", str(tmp_path / "cal"),
                        "--reward-model", "banana", "--n", "2"])
    assert "--reward-model" in err and "--scorer" in err
    assert "internet" not in err and "huggingface.co" not in err
    assert _snapshot(work) == before and not (tmp_path / "cal").exists()


def test_nan_is_not_silently_accepted_by_select(tiny_model, work):
    table = score_instructions(tiny_model, il.DirectionSet.load(work / "dirs"), INSTRUCTIONS[:4], progress=False,
                               allow_invalid=True)
    with pytest.raises(BadInputError, match="threshold=nan"):
        il.select_instructions(table, threshold=math.nan)
