"""The GPU session's script, rehearsed on the CPU (DRY_RUN=1: tiny shapes): a GPU lease is too scarce to find
out there that a command line is wrong (the quantize part once passed an option its script did not take)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_part_of_the_gpu_session_runs_in_a_dry_run(tmp_path):
    # a small budget for the seed part: the probe and the first steps run, the rest are skipped and said so.
    # 90 s, not less: on a busy 2-core CI machine (load 3+) the probe alone took 33 s and 45 s left no step to run
    env = dict(os.environ, DRY_RUN="1", PY=sys.executable, OMP_NUM_THREADS="1", SEED_BUDGET="90",
               BIN=str(Path(sys.executable).parent))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path), "seed7b,userpath,kernels"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["seed7b", "userpath", "kernels"], proc.stdout[-2000:]
    failed = [line for line in summary if " rc=0 " not in line]
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}"

    seed = tmp_path / "seed-7b"
    steps = (seed / "steps.txt").read_text()
    assert "probe: HF BF16" in steps and "skipped" in steps
    cells = json.loads((seed / "results.json").read_text())["cells"]
    assert cells and all(c["status"] == "ok" for c in cells) and (seed / "speed.md").is_file()
    assert (seed / "seed-tables.md").is_file()

    user = tmp_path / "userpath"
    assert (user / "gptq" / "quant_report.json").is_file() and (user / "rtn" / "quant_report.json").is_file()
    backends = json.loads((user / "backends.json").read_text())["backends"]
    assert backends["torch"]["status"] == "ok" and backends["auto"]["tokens_agree_with_torch"] is True
    assert "path_check" in json.loads((user / "eval" / "results.json").read_text())["settings"]
    report = tmp_path / "report.md"
    subprocess.run([sys.executable, "scripts/gpu_user_path.py", "render", str(user), "--report", str(report)],
                   cwd=ROOT, check=True, capture_output=True)
    assert "## load_quantized on every backend" in report.read_text()

    check = json.loads((tmp_path / "kernels" / "kernel_check.json").read_text())
    assert check["passed"] and check["cuda_library"]["checked"] > 0
