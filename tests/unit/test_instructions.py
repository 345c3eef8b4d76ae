"""Instruction sets: the built-in feature set and every supported source."""

from __future__ import annotations

import json

import pytest

import icon2_lens as il

ITEMS = ["Write a haiku.", "Explain DNS.", "Name a river."]


def test_builtin_set():
    items = il.instructions.builtin_instructions()
    assert len(set(items)) >= 256
    assert len(set(items)) == len(items)  # no duplicates
    assert all(x == x.strip() and x for x in items)
    assert il.load_instructions("default") == items
    assert il.load_instructions("default", limit=5) == items[:5]
    with pytest.raises(ValueError, match="Unknown built-in"):
        il.instructions.builtin_instructions("nope")


def test_builtin_sets_split_feature_and_heldout():
    feature, heldout, every = (il.instructions.builtin_instructions(n) for n in ("default", "heldout", "all"))
    assert (len(feature), len(heldout)) == (256, 64)
    assert every == feature + heldout
    assert not set(feature) & set(heldout)
    assert il.load_instructions("heldout") == heldout


def test_from_list():
    assert il.load_instructions(["  Write a haiku. ", "", "Explain DNS.\n"]) == ["Write a haiku.", "Explain DNS."]
    assert il.load_instructions(ITEMS, limit=2) == ITEMS[:2]
    assert il.load_instructions(tuple(ITEMS)) == ITEMS
    with pytest.raises(TypeError, match="strings"):
        il.load_instructions(["ok", 3])
    with pytest.raises(ValueError, match="positive"):
        il.load_instructions(ITEMS, limit=0)
    with pytest.raises(ValueError, match="No instructions"):
        il.load_instructions([])


def test_from_txt(tmp_path):
    p = tmp_path / "instr.txt"
    p.write_text("Write a haiku.\n\n  Explain DNS.  \nName a river.\n")
    assert il.load_instructions(p) == ITEMS
    assert il.load_instructions(str(p)) == ITEMS
    bare = tmp_path / "instr"
    bare.write_text("\n".join(ITEMS))
    assert il.load_instructions(bare) == ITEMS


def test_from_jsonl(tmp_path):
    p = tmp_path / "instr.jsonl"
    p.write_text(
        json.dumps({"instruction": ITEMS[0], "other": 1}) + "\n\n"
        + json.dumps(ITEMS[1]) + "\n"
        + json.dumps({"instruction": ITEMS[2]}) + "\n"
    )
    assert il.load_instructions(p) == ITEMS
    q = tmp_path / "prompts.jsonl"
    q.write_text("\n".join(json.dumps({"prompt": x}) for x in ITEMS))
    assert il.load_instructions(q, column="prompt") == ITEMS
    with pytest.raises(ValueError, match=r"prompts\.jsonl: line 1 has no 'instruction' field"):
        il.load_instructions(q)


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"instruction": "ok"}) + "\n" + '{"instruction": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        il.load_instructions(p)
    q = tmp_path / "num.jsonl"
    q.write_text('"ok"\n\n42\n')
    with pytest.raises(ValueError, match=r"num\.jsonl: line 3 is a number"):
        il.load_instructions(q)


@pytest.mark.parametrize("name,text", [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "")])
def test_empty_file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ValueError, match="No instructions"):
        il.load_instructions(p)


def test_unsupported_and_missing(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        il.load_instructions(p)
    with pytest.raises(FileNotFoundError, match="neither a file"):
        il.load_instructions(tmp_path / "missing.txt")


def test_from_dataset_and_saved_folder(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"instruction": ITEMS, "prompt": [x.upper() for x in ITEMS]})
    assert il.load_instructions(ds) == ITEMS
    assert il.load_instructions(ds, column="prompt") == [x.upper() for x in ITEMS]
    with pytest.raises(ValueError, match="no column 'text'"):
        il.load_instructions(ds, column="text")
    ds.save_to_disk(str(tmp_path / "ds"))
    assert il.load_instructions(tmp_path / "ds") == ITEMS
    assert il.load_instructions(str(tmp_path / "ds"), limit=1) == ITEMS[:1]
