"""The icon2-lens command line, run in-process on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

import icon2_lens as il
from icon2_lens.cli import build_parser, main

from conftest import CHATML

INSTR = ["Write a haiku about the sea.", "Explain how DNS works.", "What is the capital of France?",
         "Give me three tips for sleeping better.", "How do I reverse a list in Python?"]


@pytest.fixture
def instr_file(tmp_path):
    p = tmp_path / "instr.txt"
    p.write_text("\n".join(INSTR) + "\n")
    return p


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _extract(model_dir, out, instr_file, *extra):
    return main(["extract", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--out", str(out),
                 "--criteria", "helpful,honest", "--instructions", str(instr_file), "--batch-size", "4", *extra])


def test_parser_lists_subcommands():
    help_text = build_parser().format_help()
    assert "extract" in help_text and "layers" in help_text


def test_extract_writes_folder_and_refuses_second_run(tiny_model, tiny_model_dir, instr_file, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert _extract(tiny_model_dir, out, instr_file, "--n-instructions", "4") == 0
    stdout = capsys.readouterr().out
    assert "wrote:" in stdout
    assert str(out / "directions.safetensors") in stdout and str(out / "directions.json") in stdout
    d = il.DirectionSet.load(out, model=tiny_model)
    assert d.criteria == ["helpful", "honest"] and d.meta["n_instructions"] == 4
    assert d.vectors.shape == (2, tiny_model.n_layers, tiny_model.d_model)
    # the CLI result equals the library call
    ref = il.extract_directions(tiny_model, ["helpful", "honest"], INSTR[:4], batch_size=4, progress=False)
    torch.testing.assert_close(d.vectors, ref.vectors, atol=1e-5, rtol=0)

    before = _files(out)
    assert _extract(tiny_model_dir, out, instr_file) == 2
    err = capsys.readouterr().err
    assert "icon2-lens extract: error:" in err and "already exists" in err and "--overwrite" in err
    assert _files(out) == before

    assert _extract(tiny_model_dir, out, instr_file, "--overwrite", "--method", "mean_diff") == 0
    assert il.DirectionSet.load(out).meta["method"] == "mean_diff"
    assert il.DirectionSet.load(out).meta["n_instructions"] == len(INSTR)


def test_extract_bad_hook_returns_2(tiny_model_dir, instr_file, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert _extract(tiny_model_dir, out, instr_file, "--hook", "foo") == 2
    err = capsys.readouterr().err
    assert "Unknown hook 'foo'" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--criteria", "kindness"], "Unknown criterion"),
        (["--instructions", "missing.txt"], "neither a file"),
        (["--n-instructions", "0"], "positive"),
    ],
)
def test_extract_bad_input_returns_2(tiny_model_dir, tmp_path, capsys, args, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_extract_with_chat_template_file(tiny_model_no_template_dir, instr_file, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert _extract(tiny_model_no_template_dir, out, instr_file) == 2
    assert "chat template" in capsys.readouterr().err
    assert not out.exists()
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(CHATML)
    assert _extract(tiny_model_no_template_dir, out, instr_file, "--chat-template", str(tpl)) == 0
    assert (out / "directions.json").is_file()
    assert _extract(tiny_model_no_template_dir, tmp_path / "x", instr_file, "--chat-template",
                    str(tmp_path / "nope.jinja")) == 2
    assert "--chat-template" in capsys.readouterr().err


def test_layers_writes_report_and_records_range(tiny_model_dir, instr_file, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert _extract(tiny_model_dir, out, instr_file) == 0
    tensors_before = (out / "directions.safetensors").read_bytes()
    capsys.readouterr()
    # default held-out set: built-in instructions not used for extraction
    rc = main(["layers", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress",
               "--directions", str(out), "--n-heldout", "4", "--n-paraphrase-instructions", "2", "--width", "2",
               "--stability", "--instructions", str(instr_file)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "suggested steering layers" in stdout and "wrote:" in stdout
    for name in ("layer_report.json", "layer_report.md", "layer_report.png", "directions.json"):
        assert (out / name).is_file()
        assert str(out / name) in stdout
    report = json.loads((out / "layer_report.json").read_text())
    d = il.DirectionSet.load(out)
    assert d.suggested_layers == report["suggested_layers"] and len(d.suggested_layers) == 2
    assert report["counts"]["helpful"]["a"] == 4
    assert report["counts"]["helpful"]["b"] == 2 * len(il.layers.builtin_paraphrases()["helpful"])
    assert "stability" in report
    assert (out / "directions.safetensors").read_bytes() == tensors_before


def test_extract_stability_is_shown_by_layers(tiny_model_dir, instr_file, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert _extract(tiny_model_dir, out, instr_file, "--stability") == 0
    d = il.DirectionSet.load(out)
    assert d.stats["stability"].shape == (2, len(d.layers))
    capsys.readouterr()
    rc = main(["layers", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--directions", str(out),
               "--n-heldout", "4", "--n-paraphrase-instructions", "1"])
    assert rc == 0
    assert "helpful stab" in capsys.readouterr().out
    report = json.loads((out / "layer_report.json").read_text())
    assert report["stability"] == d.stats["stability"].tolist()


def test_layers_with_heldout_file_and_out_folder(tiny_model_dir, instr_file, tmp_path, capsys):
    dirs = tmp_path / "dirs"
    assert _extract(tiny_model_dir, dirs, instr_file, "--criteria", "helpful") == 0
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"instruction": x}) for x in ["Name a river.", "Suggest a bakery name."]))
    rep = tmp_path / "report"
    rc = main(["layers", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--directions", str(dirs),
               "--heldout", str(held), "--n-paraphrase-instructions", "1", "--out", str(rep)])
    assert rc == 0
    assert {p.name for p in rep.iterdir()} == {"layer_report.json", "layer_report.md", "layer_report.png"}
    assert json.loads((rep / "layer_report.json").read_text())["counts"]["helpful"]["a"] == 2
    assert il.DirectionSet.load(dirs).suggested_layers is not None


def test_layers_errors(tiny_model_dir, other_tiny_model, instr_file, tmp_path, capsys):
    rc = main(["layers", "--model", str(tiny_model_dir), "--no-progress", "--directions", str(tmp_path / "nope")])
    assert rc == 2 and "not a DirectionSet folder" in capsys.readouterr().err
    out = tmp_path / "dirs"
    assert _extract(tiny_model_dir, out, instr_file, "--criteria", "helpful") == 0
    capsys.readouterr()
    before = _files(out)
    rc = main(["layers", "--model", other_tiny_model.info.hf_path, "--device", "cpu", "--no-progress",
               "--directions", str(out)])
    assert rc == 2 and "fingerprint" in capsys.readouterr().err
    assert _files(out) == before


def test_model_folder_without_weights_returns_2(tiny_model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in tiny_model_dir.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, broken / p.name)
    rc = main(["extract", "--model", str(broken), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o"),
               "--criteria", "helpful", "--n-instructions", "2"])
    assert rc == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["extract"])  # --out is required
    assert exc.value.code == 2
    assert main(["extract", "--out", "x", "--method", "svd"]) == 2  # methods are a registry: checked by the config
    assert "svd" in capsys.readouterr().err
