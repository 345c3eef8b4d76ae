"""Atomic writes: outputs are never half-written, existing folders are refused unless overwriting."""

from __future__ import annotations

import os

import pytest

from icon2_lens.runs import io as files
from icon2_lens.runs.io import atomic_folder, atomic_write_text, check_output_folder


def test_atomic_write_text(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.md", "one")
    assert p.read_text() == "one"
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.md"]


def test_check_output_folder(tmp_path):
    assert check_output_folder(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_folder(tmp_path / "full", overwrite=False)
    check_output_folder(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_output_folder(tmp_path / "file", overwrite=True)


def test_atomic_folder_success_and_replace(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing visible before the end
    assert (target / "a.txt").read_text() == "new"
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_error_in_body_leaves_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_failed_final_rename_keeps_target(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    real_replace = os.replace

    def flaky_replace(src, dst):
        if str(src).endswith(".tmp"):  # the new folder moving into place
            raise OSError("simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert target.is_dir(), sorted(p.name for p in tmp_path.iterdir())
    assert (target / "a.txt").read_text() == "old"
