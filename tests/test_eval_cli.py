"""qwen-eval: bad input gives one line and exit 2; a small real run on the demo model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "qwen-eval"


def run_eval(*args, cwd):
    env = dict(os.environ, QWEN_QUANT_QUIET="1")
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_unknown_task(tmp_path):
    assert_one_line_error(run_eval("demo", "--tasks", "mmlu,nonsense", cwd=tmp_path), "unknown task", "nonsense")


def test_malformed_task_file(tmp_path):
    bad = tmp_path / "ceval_bad.csv"
    bad.write_text("id,question,A\n1,what?\n")
    assert_one_line_error(run_eval("demo", "--tasks", f"ceval={bad}", cwd=tmp_path))


def test_empty_text_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert_one_line_error(run_eval("demo", "--tasks", "ppl", "--ppl-text", str(empty), cwd=tmp_path))


def test_synthetic_model_is_refused(tmp_path):
    assert_one_line_error(run_eval("demo", "synthetic:tiny", "--tasks", "ppl-wiki", cwd=tmp_path),
                          "synthetic")


@pytest.mark.slow
def test_demo_end_to_end_two_models_same_items(tmp_path, demo_dir, monkeypatch):
    """The demo and a copy of it (a folder): same items, so every delta is exactly zero."""
    from qwen_quant.accuracy.evaluate import evaluate

    monkeypatch.setenv("QWEN_QUANT_QUIET", "1")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat and looked at the garden for a long time.\n\n" * 20)
    report = evaluate(["demo", str(demo_dir)], "ppl-wiki,arc-easy,winogrande", limit=3, seqlen=64, batch=4, ppl_windows=3,
                      out=tmp_path / "out", ppl_text=str(text), ppl_lengths=[32, 100000])
    rows = report["results"]
    by = {(r["model"], r["task"], r["metric"]): r for r in rows}
    labels = [m["label"] for m in report["models"]]
    assert len(labels) == 2 and labels[0] != labels[1]
    for (model, task, metric), r in by.items():
        if model == labels[1]:
            ref = by[(labels[0], task, metric)]
            assert r["n"] == ref["n"]
            if ref["value"] is not None:
                assert r["value"] == pytest.approx(ref["value"], rel=1e-4)
    wiki = by[(labels[0], "ppl-wiki", "perplexity")]
    assert 1 < wiki["value"] < 200 and wiki["n"] == 3 and wiki["details"]["seqlen"] == 64
    assert wiki["details"]["split"] == "eval" and wiki["details"]["tokens"] == 192
    assert by[(labels[0], "ppl", "perplexity")]["value"] < wiki["value"]  # repeated text is easy
    too_long = by[(labels[0], "ppl-wiki", "perplexity@100000")]
    assert too_long["value"] is None and "missing" in too_long["details"]
    arc = by[(labels[0], "arc-easy", "accuracy")]
    assert arc["n"] == 3 and 0 <= arc["value"] <= 100 and arc["stderr"] >= 0
    assert (labels[0], "arc-easy", "accuracy_norm") in by
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(rows, default=str))
    assert set(saved["env"]) >= {"torch", "transformers", "commit", "date", "command"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "missing: beyond the model's context" in md and "Δ" in md
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == len(rows) + 1
