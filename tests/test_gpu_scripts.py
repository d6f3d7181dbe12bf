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
    env = dict(os.environ, DRY_RUN="1", PY=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    parts = ["cuda", "kernels", "fast", "profile", "quantize", "quantize-gptaq"]
    assert [line.split()[0] for line in summary] == parts, proc.stdout[-2000:]
    failed = [line for line in summary if " rc=0 " not in line]
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}"
    plain = json.loads((tmp_path / "quantize" / "gpu_quantize_timing.json").read_text())
    gptaq = json.loads((tmp_path / "quantize-gptaq" / "gpu_quantize_timing.json").read_text())
    # the settings recorded are the ones that ran (qwen-quantize's defaults, + GPTAQ in the second part)
    assert plain["settings"]["desc_act"] is True and plain["settings"]["gptaq_alpha"] == 0.0
    assert gptaq["settings"]["gptaq_alpha"] == 0.25 and "GPTAQ" in gptaq["what"]
    assert len(plain["block_seconds"]) == len(gptaq["block_seconds"]) == 2
