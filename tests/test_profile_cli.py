"""qwen-profile end to end through its console script: cells in subprocesses, OOM recorded, bad input."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_quant.profile.cells import CELL_FIELDS

SCRIPT = str(Path(sys.executable).with_name("qwen-profile"))
FAST = ["--repeat", "2", "--warmup", "1", "--threads", "1", "--quiet"]


def run_profile(args, tmp_path, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_synthetic_tiny_bf16_int4_with_an_injected_oom(tmp_path):
    out = tmp_path / "prof"
    proc = run_profile(["synthetic:tiny", "--precision", "bf16,int4", "--encode", "32", "--gen", "16",
                        "--out", str(out), *FAST], tmp_path,
                       {"QWEN_QUANT_PROFILE_INJECT": "oom@synthetic-tiny-int4-hf-encode"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    assert [(c["precision"], c["scenario"], c["status"]) for c in cells] == [
        ("bf16", "encode", "ok"), ("bf16", "generate", "ok"), ("int4", "encode", "oom"), ("int4", "generate", "ok")]
    assert all(tuple(c) == CELL_FIELDS for c in cells)
    oom = cells[2]
    assert oom["tokens_per_s"] is None and oom["peak_rss_gib"] is None and "out-of-memory" in oom["error"]
    for c, d in zip(cells, results["details"]):
        if c["status"] != "ok":
            continue
        assert c["repeats"] == 2 and d["tokens_generated"] == [c["new_tokens"]] * 2
        assert c["peak_rss_gib"] > 0 and c["peak_allocated_gib"] is None and c["prefill_s"] > 0
        assert c["spread"]["min"] <= c["tokens_per_s"] <= c["spread"]["max"]
        if c["scenario"] == "generate":
            assert len(d["token_latency_s"]) == 15 and c["decode_tokens_per_s"] > 0
            assert c["roofline_pct"] > 0 and d["bytes_per_token"] > d["decode_weight_bytes"] > 0
        else:
            assert c["context_tokens"] == 32 and c["new_tokens"] == 1 and c["roofline_pct"] is None
    # Int4 holds packed weights: fewer resident bytes than the same shape in BF16
    assert results["details"][3]["decode_weight_bytes"] < results["details"][1]["decode_weight_bytes"]
    assert results["bandwidth"]["bandwidth_gbps"] > 0
    env = results["env"]
    assert env["torch"] and env["cpu"] and env["command"].startswith("qwen-profile synthetic:tiny")

    speed = (out / "speed.md").read_text()
    memory = (out / "memory.md").read_text()
    assert "Speed (16 tokens)" in speed and "Peak Usage for Encoding 32 Tokens" in memory
    assert "| synthetic-tiny Int4 | OOM |" in memory
    assert len(list(csv.DictReader((out / "details.csv").open()))) == 4
    assert (out / "decode_latency.png").stat().st_size > 1000 and (out / "memory.png").stat().st_size > 1000
    assert "Peak Usage for Generating 16 Tokens" in proc.stdout  # the terminal summary


@pytest.mark.slow
def test_demo_model_generate(tmp_path):
    out = tmp_path / "demo"
    proc = run_profile(["demo", "--precision", "fp32", "--encode", "none", "--gen", "8", "--out", str(out), *FAST],
                       tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (cell,), (details,) = results["cells"], results["details"]
    assert cell["status"] == "ok" and cell["model"] == "SmolLM2-135M-Instruct" and cell["new_tokens"] == 8
    # the seed's definition: new tokens / total generate time (prefill included), per run; the
    # headline is their median. (No timing comparison: with a 1-token prompt, prefill and a decode
    # step cost the same, so which rate is higher is noise.)
    runs = details["runs"]
    assert len(runs) == 2 and all(r["total_s"] > r["prefill_s"] > 0 for r in runs)
    assert [r["tokens_per_s"] for r in runs] == pytest.approx([8 / r["total_s"] for r in runs])
    assert min(r["tokens_per_s"] for r in runs) <= cell["tokens_per_s"] <= max(r["tokens_per_s"] for r in runs)
    assert cell["decode_tokens_per_s"] > 0


def test_memory_cap_makes_a_real_oom(tmp_path):
    out = tmp_path / "capped"
    proc = run_profile(["synthetic:tiny", "--precision", "bf16", "--encode", "none", "--gen", "4",
                        "--max-memory-gib", "0.01", "--out", str(out), "--repeat", "1", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (cell,) = json.loads((out / "results.json").read_text())["cells"]
    assert cell["status"] == "oom" and cell["error"]
    assert "OOM" in (out / "speed.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["synthetic:tiny", "--precision", "int3"], "unknown precision"),
    (["synthetic:tiny", "--gen", "0"], "positive"),
    (["synthetic:tiny", "--encode", "-5"], "positive"),
    (["demo", "--precision", "int4"], "no Int4 form"),
    (["plain-dir", "--precision", "int4"], "no Int4 form"),
    (["no/such/model/here"], "not found"),
    (["synthetic:qwen-7bb"], "unknown synthetic shape"),
    (["synthetic:tiny", "--engine", "warp"], "unknown engine"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, words):
    plain = tmp_path / "plain-dir"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = run_profile(args + ["--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_second_run_adds_to_the_folder_and_skips_what_it_holds(tmp_path):
    out = tmp_path / "prof"
    base = ["synthetic:tiny", "--precision", "bf16", "--encode", "none", "--out", str(out), "--repeat", "1",
            "--warmup", "0", "--threads", "1", "--quiet"]
    assert run_profile(base + ["--gen", "8"], tmp_path).returncode == 0
    first = json.loads((out / "results.json").read_text())
    proc = run_profile(base + ["--gen", "4,8"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 cell(s) already in" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [c["new_tokens"] for c in results["cells"]] == [8, 4]  # the 8-token cell kept, not run again
    assert results["cells"][0] == first["cells"][0] and len(results["runs"]) == 2
    assert len(results["plan"]) == 2 and "Speed (4 tokens)" in (out / "speed.md").read_text()
    results["env"]["cpu"] = "another machine"
    (out / "results.json").write_text(json.dumps(results))
    proc = run_profile(base + ["--gen", "16"], tmp_path)
    assert proc.returncode == 2 and "one table is one machine" in proc.stderr
