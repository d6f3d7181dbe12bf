"""The commit every result file records: HEAD, flagged '+dirty' when tracked files changed, None outside git."""

from __future__ import annotations

import subprocess

from qwen_quant import provenance


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_names_head_and_flags_changes(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "table.md").write_text("| a |\n")
    _git(tmp_path, "add", "a.py", "reports/table.md")
    _git(tmp_path, "commit", "-qm", "one")
    monkeypatch.setattr(provenance, "_REPO_ROOT", tmp_path)
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert provenance.git_commit() == head
    (tmp_path / "untracked.json").write_text("{}")  # new result files do not make the code dirty
    assert provenance.git_commit() == head
    (tmp_path / "reports" / "table.md").write_text("| b |\n")  # a report re-rendered: results, not code
    assert provenance.git_commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_commit() == head + "+dirty"


def test_git_commit_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_REPO_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_commit() is None
