"""Atomic writes (qwen_quant/files.py): whole files only, ordinary permissions, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from qwen_quant import files


def test_written_file_has_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_text_atomic(tmp_path / "sub" / "table.md", "| a |\n")
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "table.md"
    assert path.read_text() == "| a |\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600: reports are for others
    assert [p.name for p in path.parent.iterdir()] == ["table.md"]


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError):
        files.write_bytes_atomic(path, b"new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "plot.png"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("savefig failed")
    assert list(tmp_path.iterdir()) == []
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")  # any writer that takes a path
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_recording_package_files_sees_what_package_file_finds_inside_the_block_only():
    files.package_file("json", "stdlib", "decoder.py")  # before: not recorded
    with files.recording_package_files() as outer:
        files.package_file("json", "stdlib", "decoder.py")
        with files.recording_package_files() as inner:
            files.package_file("json", "stdlib", "encoder.py")
        with pytest.raises(Exception, match="not found"):
            files.package_file("json", "stdlib", "no-such-file.py")  # a miss is not a read
    files.package_file("json", "stdlib", "scanner.py")  # after: not recorded
    assert outer == {("json", "stdlib", "decoder.py"), ("json", "stdlib", "encoder.py")}
    assert inner == {("json", "stdlib", "encoder.py")}
    assert not files._recorders  # noqa: SLF001 (every block took its set away again)
