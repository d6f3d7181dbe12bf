"""Which code produced a result: the project's git commit, flagged when the work tree differs from it.

Every result file records it (quant_report.json, qwen-profile's and qwen-eval's env). Read it when the work
starts: a commit made while a long run is going did not produce that run's numbers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with '+dirty' when tracked files have changes; None outside
    a git checkout (an installed wheel). Changes under reports/ do not count: they are results (a report being
    re-rendered while a run starts), not the code that produces them."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
                               cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
