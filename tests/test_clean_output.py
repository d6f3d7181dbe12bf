"""A normal run prints only our own lines on stderr: no library warnings, no transformers loading bars, nothing
that the peer's dependencies (torchao) print on import; the user's environment holds no peer at all."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
FOREIGN = re.compile(r"Loading weights|Warning|warn\(|deprecat|Failed to load|torchao|_pytree|Traceback", re.I)


def stderr_lines(cmd, cwd) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "QWEN_QUANT_QUIET"}
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [ln.strip() for ln in re.split(r"[\r\n]", proc.stderr) if ln.strip()]


def test_the_users_environment_has_no_peer():
    for name in ("gptqmodel", "torchao"):
        assert importlib.util.find_spec(name) is None, f"{name} leaked into the user's environment"


def test_quantize_prints_only_its_own_lines(tmp_path):
    lines = stderr_lines(["qwen-quantize", "synthetic:tiny", "--nsamples", "2", "--seqlen", "32",
                          "--out", str(tmp_path / "q")], tmp_path)
    ours = re.compile(r"^(quantizing:|block +\d+:|done in |checkpoint: )")
    assert lines and all(ours.match(ln) for ln in lines), [ln for ln in lines if not ours.match(ln)]


def test_eval_prints_only_its_own_lines(tmp_path):
    lines = stderr_lines(["qwen-eval", "demo", "--tasks", "ppl-wiki,arc-easy", "--limit", "2", "--ppl-windows",
                          "1", "--seqlen", "32", "--out", str(tmp_path / "e")], tmp_path)
    foreign = [ln for ln in lines if FOREIGN.search(ln) or not ln.startswith("SmolLM2-135M-Instruct ")]
    assert not foreign, foreign
