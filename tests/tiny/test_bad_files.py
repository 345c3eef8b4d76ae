"""Every bad file a user gives is named (issue 17, item 1): a typed error from the library, one line and exit code 2
from the command line, no traceback, and nothing written or changed.

For each kind of file (model folder, GGUF, DirectionSet, chat template, gammas, criteria, instructions, pairs,
preference set) the test gives it damaged (truncated, torn, not UTF-8, not parseable) or with values of the wrong
kind, through the Python API (`BadFileError` naming the file and saying what to do) and, for most, through
``icon2_lens.cli.main``. Everything fails before a model would run: only the criteria case loads the tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import icon2_lens as il
from icon2_lens.calibration import load_gammas
from icon2_lens.cli import main
from icon2_lens.directions import DirectionSet
from icon2_lens.errors import BadFileError, BadInputError
from icon2_lens.models import check_chat_template, read_chat_template
from icon2_lens.preference import load_preference_set
from icon2_lens.training import TrainConfig, train

from conftest import write_bert_gguf

# ---- helpers ---------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli_error(capsys, argv: list[str], *named: str) -> str:
    """Run the CLI; assert exit code 2, one error line naming ``named``, no traceback; return the line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"icon2-lens {argv[0]}: error: ") and ": error: unexpected" not in lines[0], lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An earlier output folder (given with --overwrite): a bad input must leave it byte-identical."""
    folder = tmp_path / "earlier"
    folder.mkdir()
    (folder / "directions.json").write_text('{"kept": true}\n')
    (folder / "notes.txt").write_bytes(b"earlier output \x00\x01")
    return folder


def _cli_refused(capsys, argv: list[str], out: Path, *named: str) -> str:
    """`_cli_error` with ``--out out --overwrite``; ``out`` is byte-identical afterwards (or still absent)."""
    before = _snapshot(out) if out.exists() else None
    line = _cli_error(capsys, [*argv, "--out", str(out), "--overwrite"], *named)
    assert (_snapshot(out) if out.exists() else None) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp folder left
    return line


def _extract_argv(model: Path | str, *extra: str) -> list[str]:
    return ["extract", "--model", str(model), "--device", "cpu", "--no-progress", "--criteria", "helpful",
            "--n-instructions", "2", *extra]


@pytest.fixture(scope="module")
def dirs_dir(tmp_path_factory) -> Path:
    """A DirectionSet folder for the tiny model's shape (2 criteria, 4 layers, d_model 64), made without a model."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 4, 64, generator=g)
    stats = {"proj_mean": torch.zeros(2, 4), "proj_std": torch.ones(2, 4)}
    meta = {"criteria": [c.to_dict() for c in il.DEFAULT_CRITERIA[1:3]], "layers": [0, 1, 2, 3], "hook": "resid_post",
            "method": "pca", "n_instructions": 4, "model": {"model_id": "tiny", "n_layers": 4, "d_model": 64}}
    d = DirectionSet(vectors=v / v.norm(dim=-1, keepdim=True), criteria=["helpful", "honest"], stats=stats, meta=meta)
    return d.save(tmp_path_factory.mktemp("dirs") / "directions")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


# ---- models: GGUF files, model folders, missing paths ----------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ICON2_LENS_CACHE", str(folder))
    return folder


def _bert_gguf(path: Path) -> Path:
    """A GGUF file of an encoder (bert), not a causal LM."""
    return write_bert_gguf(path)


def test_truncated_gguf_is_named(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x01")  # a header cut after 9 bytes (was: struct.error, exit 1)
    with pytest.raises(BadFileError) as exc:
        il.load_model(bad, device="cpu")
    assert exc.value.path == str(bad) and "GGUF" in str(exc.value) and "copy or download it again" in str(exc.value)
    assert not cache.exists() or not any((cache / "models").iterdir())  # no half-written cache folder


def test_truncated_gguf_cli(tmp_path, cache, capsys, earlier):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    _cli_refused(capsys, _extract_argv(bad), earlier, str(bad), "GGUF")


def test_gguf_of_another_kind_of_model_is_named(tmp_path, cache, capsys):
    bert = _bert_gguf(tmp_path / "encoder.gguf")
    with pytest.raises(BadFileError, match="causal language model") as exc:
        il.load_model(bert, device="cpu")
    assert exc.value.path == str(bert) and "bert" in str(exc.value)
    _cli_refused(capsys, _extract_argv(bert), tmp_path / "out", "encoder.gguf", "causal")


def test_missing_model_path_is_named(tmp_path, capsys):
    for missing in (tmp_path / "no-such-model", tmp_path / "no-such.gguf"):
        with pytest.raises(FileNotFoundError, match="does not exist") as exc:
            il.load_model(missing, device="cpu")
        assert str(missing) in str(exc.value) and "pass" in str(exc.value)
        _cli_refused(capsys, _extract_argv(missing), tmp_path / "out", str(missing), "does not exist")


def test_a_plain_file_is_not_a_model(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 16)
    with pytest.raises(BadFileError, match=r"not a \.gguf file") as exc:
        il.load_model(bad, device="cpu")
    assert exc.value.path == str(bad) and "--model" in str(exc.value)


def test_truncated_weights_in_a_model_folder_are_named(tiny_model_dir, tmp_path, capsys, earlier):
    folder = _copy(tiny_model_dir, tmp_path / "model")
    _truncate(folder / "model.safetensors")  # was: SafetensorError ... incomplete metadata, exit 1
    with pytest.raises(BadFileError, match="truncated or corrupt") as exc:
        il.load_model(folder, device="cpu")
    assert exc.value.path == str(folder / "model.safetensors")
    _cli_refused(capsys, _extract_argv(folder), earlier, str(folder / "model.safetensors"), "truncated")
    # training reads the same folder: refused before TRL or the pairs' model load
    with pytest.raises(BadFileError, match=r"model\.safetensors"):
        train([{"prompt": "q", "chosen": "a.", "rejected": "b."}], model_source=folder,
              config=TrainConfig(max_steps=1, precision="fp32"), output_dir=tmp_path / "trained", device="cpu")
    assert not (tmp_path / "trained").exists()


def test_torn_config_in_a_model_folder_is_named(tiny_model_dir, tmp_path, capsys):
    folder = _copy(tiny_model_dir, tmp_path / "model")
    _truncate(folder / "config.json", keep=40)
    with pytest.raises(BadFileError, match="config") as exc:
        il.load_model(folder, device="cpu")
    assert exc.value.path == str(folder / "config.json")
    _cli_refused(capsys, _extract_argv(folder), tmp_path / "out", "config.json")


def test_model_folder_without_a_tokenizer_is_named(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(BadFileError) as exc:
        il.load_model(folder, device="cpu")
    assert exc.value.path == str(folder) and "--model" in str(exc.value)


def test_hf_id_not_in_the_cache_says_allow_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = _cli_refused(capsys, _extract_argv("nobody/not-a-model-xyz"), tmp_path / "out", "nobody/not-a-model-xyz")
    assert "--allow-download" in line and "not in the local HF cache" in line


# ---- DirectionSet ----------------------------------------------------------------------------------------


def _score_argv(dirs: Path, instructions: Path, model: Path) -> list[str]:
    return ["score", "--model", str(model), "--device", "cpu", "--no-progress", "--directions", str(dirs),
            "--instructions", str(instructions)]


@pytest.fixture
def instr_file(tmp_path) -> Path:
    f = tmp_path / "instructions.txt"
    f.write_text("Write a haiku.\nExplain DNS.\n")
    return f


def test_truncated_directions_tensors_are_named(dirs_dir, tmp_path, instr_file, tiny_model_dir, capsys, earlier):
    bad = _copy(dirs_dir, tmp_path / "d")
    _truncate(bad / "directions.safetensors", keep=50)  # was: SafetensorError, exit 1
    with pytest.raises(BadFileError, match="DirectionSet") as exc:
        DirectionSet.load(bad)
    assert exc.value.path == str(bad / "directions.safetensors") and "icon2-lens extract" in str(exc.value)
    _cli_refused(capsys, _score_argv(bad, instr_file, tiny_model_dir), earlier, "directions.safetensors")


@pytest.mark.parametrize("damage", [b"\xff\xfe not utf-8", b"", None])
def test_torn_directions_json_is_named(dirs_dir, tmp_path, instr_file, tiny_model_dir, capsys, damage):
    bad = _copy(dirs_dir, tmp_path / "d")
    meta = bad / "directions.json"
    if damage is None:
        _truncate(meta)  # torn in the middle
    else:
        meta.write_bytes(meta.read_bytes()[:100] + damage)
    with pytest.raises(BadFileError) as exc:
        DirectionSet.load(bad)
    assert exc.value.path == str(meta) and "icon2-lens extract" in str(exc.value)
    _cli_refused(capsys, _score_argv(bad, instr_file, tiny_model_dir), tmp_path / "out", "directions.json")


def test_directions_json_that_does_not_match_its_tensors(dirs_dir, tmp_path):
    bad = _copy(dirs_dir, tmp_path / "d")
    meta = json.loads((bad / "directions.json").read_text())
    meta["layers"] = [0, 1]  # 2 layers for 4 rows of vectors
    (bad / "directions.json").write_text(json.dumps(meta))
    with pytest.raises(BadFileError, match="layers") as exc:
        DirectionSet.load(bad)
    assert exc.value.path == str(bad / "directions.json")
    meta.pop("criterion_names")
    (bad / "directions.json").write_text(json.dumps(meta))
    with pytest.raises(BadFileError, match="criterion_names"):
        DirectionSet.load(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_directions_are_refused(dirs_dir, tmp_path, instr_file, tiny_model_dir, capsys, value):
    from safetensors.torch import load_file, save_file

    good = DirectionSet.load(dirs_dir)
    v = good.vectors.clone()
    v[1, 2, 5] = value
    with pytest.raises(BadInputError, match="'honest' hold NaN or infinite"):  # at construction
        DirectionSet(vectors=v, criteria=good.criteria, stats=good.stats, meta=good.meta)
    bad = _copy(dirs_dir, tmp_path / "d")  # on disk (was: every score null and a row still selected)
    tensors = load_file(str(bad / "directions.safetensors"))
    tensors["vectors"] = v
    save_file(tensors, str(bad / "directions.safetensors"), metadata={"format": "icon2_lens.directions/1"})
    with pytest.raises(BadFileError, match="'honest' hold NaN or infinite") as exc:
        DirectionSet.load(bad)
    assert exc.value.path == str(bad / "directions.safetensors")
    _cli_refused(capsys, _score_argv(bad, instr_file, tiny_model_dir), tmp_path / "out", "directions.safetensors",
                 "NaN")
    stats = dict(good.stats, proj_std=torch.full((2, 4), value))
    with pytest.raises(BadInputError, match="statistic 'proj_std'"):
        DirectionSet(vectors=good.vectors, criteria=good.criteria, stats=stats, meta=good.meta)


# ---- chat template -------------------------------------------------------------------------------------


def test_broken_chat_template_is_named(tiny_model_dir, tmp_path, capsys, earlier):
    bad = tmp_path / "template.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")  # was: TemplateSyntaxError, exit 1
    with pytest.raises(BadFileError, match=r"not a valid Jinja chat template \(line 1") as exc:
        read_chat_template(bad)
    assert exc.value.path == str(bad) and "--chat-template" in str(exc.value)
    with pytest.raises(BadInputError, match="chat_template") as exc2:  # the Python API, before the model loads
        il.load_model(tmp_path / "never-read", chat_template=bad.read_text())
    assert exc2.value.option == "chat_template"
    with pytest.raises(BadInputError, match="empty"):
        check_chat_template("  ")
    _cli_refused(capsys, _extract_argv(tiny_model_dir, "--chat-template", str(bad)), earlier, str(bad), "Jinja")
    bad.write_bytes(b"{{ bos_token }}\xff")
    _cli_refused(capsys, _extract_argv(tiny_model_dir, "--chat-template", str(bad)), earlier, str(bad), "UTF-8")


# ---- gammas.yaml ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expect"), [
    ("gamma_pos: [1, 2\ngamma_neg: -0.1\n", "not valid YAML (line 2"),  # does not parse (was: ParserError, exit 1)
    ("gamma_pos: [0.1, 0.2]\ngamma_neg: -0.1\n", "gamma_pos is [0.1, 0.2], not a finite number"),
    ("gamma_pos: .nan\ngamma_neg: -0.1\n", "gamma_pos is nan"),
    ("gamma_pos: 0.1\ngamma_neg: '-0.1'\n", "gamma_neg is '-0.1', not a finite number"),
    ("gamma_pos: 0.1\ngamma_neg: -0.1\nmax_new_tokens: 1.5\n", "max_new_tokens is 1.5, not a whole number"),
    ("gamma_pos: 0.1\ngamma_neg: -0.1\nlayers: [a, b]\n", "layers is ['a', 'b']"),
    ("gamma_pos: 0.1\ngamma_neg: -0.1\ndo_sample: maybe\n", "do_sample is 'maybe', not true or false"),
])
def test_bad_gammas_yaml_is_named(dirs_dir, instr_file, tiny_model_dir, tmp_path, capsys, text, expect):
    bad = tmp_path / "gammas.yaml"
    bad.write_text(text)
    with pytest.raises(BadFileError, match="gammas") as exc:
        load_gammas(bad)
    assert exc.value.path == str(bad) and expect in str(exc.value) and "calibrate" in str(exc.value)
    argv = ["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--directions",
            str(dirs_dir), "--instructions", str(instr_file), "--gammas", str(bad)]
    _cli_refused(capsys, argv, tmp_path / "out", str(bad), expect)


def test_good_gammas_yaml_still_loads(tmp_path):
    f = tmp_path / "gammas.yaml"
    want = {"gamma_pos": 0.1, "gamma_neg": -1, "layers": [1, 2], "scale": "relative", "positions": "all",
            "max_new_tokens": 4, "do_sample": False, "repetition_penalty": 1.1, "other": [1, "x"]}
    f.write_text(yaml.safe_dump(want))
    assert load_gammas(f) == want


# ---- criteria YAML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expect"), [
    ("- {name: brief, positive: [You are brief., Be short.], negative: You ramble.}\n", "positive is a list"),
    ("- {name: brief, positive: 42, negative: You ramble.}\n", "positive is a number"),
    ("- {name: brief, positive: You are brief., negative: no}\n", "negative is a yes/no value"),
    ("- {name: 7, positive: You are brief., negative: You ramble.}\n", "name is a number"),
    ("- {name: '', positive: You are brief., negative: You ramble.}\n", "is not valid"),
    ("- {name: a, positive: x, negative: y}\n- {name: a, positive: u, negative: v}\n", "repeated: ['a']"),
    ("- {name: a, positive: [unclosed\n", "not valid YAML (line 2"),
    ("[]\n", "non-empty list"),
])
def test_bad_criteria_yaml_is_named(tmp_path, text, expect):
    bad = tmp_path / "criteria.yaml"
    bad.write_text(text)
    with pytest.raises(BadFileError) as exc:  # lists and numbers were taken as their Python text, exit 0
        il.load_criteria(bad)
    assert exc.value.path == str(bad) and expect in str(exc.value)
    with pytest.raises(BadFileError, match=expect.replace("[", r"\[").replace("(", r"\(")):
        il.extract_directions(None, str(bad), ["Hi"])  # type: ignore[arg-type]  # refused before the model is used


def test_bad_criteria_yaml_cli(tiny_model_dir, tmp_path, capsys, earlier):
    bad = tmp_path / "criteria.yaml"
    bad.write_text("- {name: brief, positive: [You are brief., Be short.], negative: 42}\n")
    argv = ["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--criteria", str(bad),
            "--n-instructions", "2"]
    _cli_refused(capsys, argv, earlier, str(bad), "positive is a list")
    bad.write_bytes(b"- {name: a, positive: \xff, negative: b}\n")
    _cli_refused(capsys, argv, earlier, str(bad), "UTF-8")


# ---- instruction files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "expect"), [
    ("instructions.txt", b"Write a haiku.\n\xff\xfe Explain DNS.\n", "not UTF-8"),
    ("instructions.jsonl", b'{"instruction": "Hi"}\n{"instruction": "He\n', "line 2 is not valid JSON"),
    ("instructions.jsonl", b'{"instruction": "Hi"}\n42\n', "line 2 is a number, not a JSON object"),
    ("instructions.jsonl", b'{"instruction": "Hi"}\n{"instruction": ["a"]}\n', "the 'instruction' field is a list"),
    ("instructions.jsonl", b'{"prompt": "Hi"}\n', "line 1 has no 'instruction' field"),
    ("instructions.txt", b"", "No instructions found"),
    ("instructions.jsonl", b"\n \n", "No instructions found"),
    ("instructions.csv", b"a,b\n", "unsupported file type"),
])
def test_bad_instruction_file_is_named(tmp_path, capsys, earlier, name, data, expect):
    bad = tmp_path / name
    bad.write_bytes(data)
    with pytest.raises(BadFileError) as exc:
        il.load_instructions(bad)
    msg = str(exc.value)
    assert exc.value.path == str(bad) and expect in msg
    assert "column=..." not in msg  # the CLI has no such option: Python's argument is named as Python's
    line = _cli_refused(capsys, ["extract", "--device", "cpu", "--no-progress", "--instructions", str(bad)], earlier,
                        str(bad), expect)
    if "has no" in expect or "not a JSON object" in expect:  # the field's name can be changed only from Python
        assert "from Python, load_instructions(..., column=NAME)" in line


def test_instruction_count_speaks_cli_terms(tmp_path, capsys):
    with pytest.raises(BadInputError, match="--n-instructions") as exc:
        il.load_instructions(["a", "b"], limit=0)
    assert exc.value.option == "limit"


# ---- pairs for training, preference sets ---------------------------------------------------------------


PAIR = {"prompt": [{"role": "user", "content": "Question?"}],
        "chosen": [{"role": "assistant", "content": "A clear answer."}],
        "rejected": [{"role": "assistant", "content": "bad"}]}


@pytest.mark.parametrize(("row", "expect"), [
    ({**PAIR, "chosen": 5}, "line 2: 'chosen' is a number, not text or a list of chat messages"),
    ({**PAIR, "rejected": None}, "line 2: 'rejected' is null"),
    ({**PAIR, "prompt": [{"role": "user", "content": 3}]}, "line 2: 'prompt' is a list whose items are not chat"),
    ({**PAIR, "prompt": "Question?"}, "mix plain text and chat messages"),
    ({"prompt": "q", "chosen": "a"}, "line 2: it lacks 'rejected'"),
    ({**PAIR, "chosen": "  "}, "line 2: 'chosen' is empty"),
    ("a string", "line 2: it is a string, not a JSON object"),
    ([1, 2], "line 2: it is a list, not a JSON object"),
    ('{"prompt": "torn', "line 2 is not valid JSON"),
])
def test_bad_pairs_file_is_named(tiny_model_dir, tmp_path, capsys, earlier, row, expect):
    bad = tmp_path / "pairs.jsonl"
    second = row if isinstance(row, str) and row.startswith("{") else json.dumps(row)
    bad.write_text(json.dumps(PAIR) + "\n" + second + "\n")
    out = tmp_path / "trained"
    with pytest.raises(BadFileError) as exc:  # was: AttributeError from inside TRL, after loading the model
        train(bad, config=TrainConfig(max_steps=1, precision="fp32"), model_source=tiny_model_dir, output_dir=out,
              device="cpu", progress=False)
    assert exc.value.path == str(bad) and expect in str(exc.value) and "'prompt', 'chosen' and 'rejected'" in str(
        exc.value)
    assert not out.exists()
    argv = ["train", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--pairs", str(bad),
            "--max-steps", "1", "--precision", "fp32"]
    _cli_refused(capsys, argv, earlier, str(bad), expect)


def test_bad_pairs_in_a_list_name_the_row(tiny_model_dir, tmp_path):
    with pytest.raises(BadInputError, match="row 2: 'chosen' is a number"):
        train([PAIR, {**PAIR, "chosen": 5}], model_source=tiny_model_dir, output_dir=tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()


def test_non_utf8_and_empty_pairs_files(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_bytes(json.dumps(PAIR).encode() + b"\n\xff\n")
    with pytest.raises(BadFileError, match="not UTF-8") as exc:
        train(bad, model_source="never-read", output_dir=tmp_path / "o")
    assert exc.value.path == str(bad)
    bad.write_text("\n")
    with pytest.raises(BadFileError, match="holds no pairs"):
        train(bad, model_source="never-read", output_dir=tmp_path / "o")


def test_bad_preference_set_file_is_named(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n\xff\n')
    with pytest.raises(BadFileError, match="not UTF-8") as exc:
        load_preference_set(bad)
    assert exc.value.path == str(bad)
    bad.write_text('{"prompt": "q", "chosen": 3, "rejected": "b"}\n')
    with pytest.raises(BadFileError, match="line 1: chosen must be non-empty plain strings") as exc:
        load_preference_set(bad)
    assert exc.value.path == str(bad) and "one JSON object per line" in str(exc.value)


def test_torn_training_log_is_named(tmp_path):
    from icon2_lens.training import load_train_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "lo')
    with pytest.raises(BadFileError, match="training log") as exc:
        load_train_log(tmp_path)
    assert exc.value.path == str(log)
