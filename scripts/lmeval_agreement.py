#!/usr/bin/env python
"""Agreement check: one multiple-choice task scored by qwen-eval and by lm-eval 0.4.13, same items,
same prompts, same model (the demo model's HF folder), same precision (fp32).

lm-eval lives in its own virtual environment (it is not a dependency of qwen-quant):
    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm-eval==0.4.13 transformers accelerate
The items come from qwen-quant's reader (profile/accuracy/datasets.py) and are handed to lm-eval as
a local JSONL file with a local-file YAML task written here, whose prompt is lm-eval's own
arc_easy/piqa prompt ("Question: {{question}}\\nAnswer:" + " {{choice}}"), so the only thing that
differs is the scoring code. Writes reports/lmeval-agreement.{json,md} (the .md from the .json).

    .venv/bin/python scripts/lmeval_agreement.py --task arc-easy --limit 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE_POINTS = 0.5

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer_index}}}}"
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lmeval_task(items, folder: Path, name: str) -> None:
    with open(folder / "items.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "question": it.question, "choices": list(it.choices),
                                "answer_index": it.answer_index}) + "\n")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=folder / "items.jsonl"))


def run_lmeval(python: Path, model_dir: Path, folder: Path, name: str, batch: int) -> tuple[dict, float, str]:
    out = folder / "lmeval-out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(python), "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", name,
           "--include_path", str(folder), "--batch_size", str(batch), "--device", "cpu",
           "--output_path", str(out), "--log_samples"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(folder), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lm-eval failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    files = sorted(out.rglob("results_*.json"))
    if not files:
        sys.exit(f"lm-eval wrote no results under {out}:\n{proc.stdout[-2000:]}")
    data = json.loads(files[-1].read_text())
    res = data["results"][name]
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                             capture_output=True, text=True).stdout.strip()
    lls = {}
    for sample_file in out.rglob(f"samples_{name}_*.jsonl"):
        for line in sample_file.read_text().splitlines():
            s = json.loads(line)
            lls[int(s["doc_id"])] = [float(r[0]) for r in s["filtered_resps"]]
    return ({"acc": 100 * res["acc,none"], "acc_stderr": 100 * res["acc_stderr,none"],
             "acc_norm": 100 * res["acc_norm,none"], "acc_norm_stderr": 100 * res["acc_norm_stderr,none"],
             "loglikelihoods": [lls.get(i) for i in range(len(lls))]}, seconds, version)


def run_ours(task: str, items, batch: int) -> tuple[dict, float]:
    """qwen-eval's scoring path (the same functions `qwen-eval demo --tasks TASK` runs), keeping the
    per-choice log-likelihoods for the item-by-item comparison."""
    from qwen_quant.profile.accuracy import multiple_choice as mc
    from qwen_quant.profile.accuracy.tasks import TASKS, TaskRequest
    from qwen_quant.profile.evaluate import _questions, load_for_eval

    start = time.perf_counter()
    em = load_for_eval("demo")
    questions = _questions(TaskRequest(TASKS[task]), items)
    graded = mc.score_questions(em.model, questions, em.encode, em.prefix_token, batch, em.max_length,
                                em.pad_id, em.device, task)
    metrics = mc.accuracy_metrics(graded, with_norm=True)
    seconds = time.perf_counter() - start
    return ({"acc": metrics["accuracy"][0], "acc_stderr": metrics["accuracy"][1],
             "acc_norm": metrics["accuracy_norm"][0], "acc_norm_stderr": metrics["accuracy_norm"][1],
             "loglikelihoods": [[s.logprob for s in g.scores] for g in graded]}, seconds)


def compare_items(ours: list[list[float]], theirs: list[list[float] | None], norms: list[list[int]]) -> dict:
    """Per choice: the largest log-likelihood difference; per item: where the two pick differently."""
    worst, picks, picks_norm, compared = 0.0, 0, 0, 0
    for a, b, n in zip(ours, theirs, norms):
        if b is None or len(a) != len(b):
            continue
        compared += 1
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
        picks += max(range(len(a)), key=a.__getitem__) != max(range(len(b)), key=b.__getitem__)
        an = [x / max(1, k) for x, k in zip(a, n)]
        bn = [x / max(1, k) for x, k in zip(b, n)]
        picks_norm += max(range(len(an)), key=an.__getitem__) != max(range(len(bn)), key=bn.__getitem__)
    return {"items_compared": compared, "max_abs_loglikelihood_diff": worst,
            "items_with_different_choice_acc": picks, "items_with_different_choice_acc_norm": picks_norm}


def markdown(rep: dict) -> str:
    o, l = rep["ours"], rep["lmeval"]
    lines = [f"# qwen-eval vs lm-eval {rep['lmeval_version']}: {rep['task']}", "",
             f"Model: `{rep['model']}` (fp32, CPU). Items: the first {rep['n']} of {rep['dataset'].get('dataset')} "
             f"({rep['dataset'].get('package')} {rep['dataset'].get('version')}, {rep['dataset'].get('file')}), "
             f"the same JSONL for both; prompt 'Question: ...\\nAnswer:' + ' choice' in both.", "",
             "| metric | qwen-eval | lm-eval | difference (points) | within 0.5? |", "|---|---|---|---|---|"]
    for m in ("acc", "acc_norm"):
        diff = o[m] - l[m]
        lines.append(f"| {m} | {o[m]:.2f} ± {o[m + '_stderr']:.2f} | {l[m]:.2f} ± {l[m + '_stderr']:.2f} | "
                     f"{diff:+.2f} | {'yes' if abs(diff) <= TOLERANCE_POINTS else 'NO'} |")
    c = rep["per_item"]
    lines += ["", f"Item by item ({c['items_compared']} items, every choice): largest log-likelihood difference "
              f"{c['max_abs_loglikelihood_diff']:.2e} nats; items where the two pick a different choice: "
              f"{c['items_with_different_choice_acc']} (acc), {c['items_with_different_choice_acc_norm']} (acc_norm).",
              "",
              f"Time: qwen-eval {rep['seconds']['ours']:.0f} s, lm-eval {rep['seconds']['lmeval']:.0f} s "
              f"(machine shared with other jobs; not a speed comparison).", "",
              f"Verdict: {rep['verdict']}", "",
              f"Command: `{rep['command']}`; commit {rep['env'].get('commit')}; {rep['env'].get('date')}; "
              f"torch {rep['env'].get('torch')}, transformers {rep['env'].get('transformers')} (qwen-eval side).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="arc-easy", choices=["arc-easy", "arc-challenge", "piqa"])
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lmeval-python", default="/tmp/lmeval-venv/bin/python")
    p.add_argument("--out", default=str(ROOT / "reports" / "lmeval-agreement"))
    args = p.parse_args()
    os.environ.setdefault("QWEN_QUANT_QUIET", "1")

    from qwen_quant.profile.accuracy.datasets import load_task
    from qwen_quant.profile.env import collect_env
    from qwen_quant.quantize.sources import demo_model_dir

    items, description = load_task(args.task, limit=args.limit)
    name = "qq_" + args.task.replace("-", "_")
    with tempfile.TemporaryDirectory(prefix="lmeval-agreement-") as tmp:
        folder = Path(tmp)
        write_lmeval_task(items, folder, name)
        lmeval, lm_seconds, version = run_lmeval(Path(args.lmeval_python), demo_model_dir(), folder, name, args.batch)
    ours, our_seconds = run_ours(args.task, items, args.batch)
    from qwen_quant.profile.accuracy.tasks import TASKS, TaskRequest
    from qwen_quant.profile.evaluate import _questions

    norms = [q.norm_lengths for q in _questions(TaskRequest(TASKS[args.task]), items)]
    per_item = compare_items(ours.pop("loglikelihoods"), lmeval.pop("loglikelihoods"), norms)
    worst = max(abs(ours[m] - lmeval[m]) for m in ("acc", "acc_norm"))
    if worst <= TOLERANCE_POINTS:
        verdict = f"agree within {TOLERANCE_POINTS} points (largest difference {worst:.2f} points)"
    else:
        verdict = (f"DIFFER by {worst:.2f} points: {per_item['items_with_different_choice_acc']} / "
                   f"{per_item['items_with_different_choice_acc_norm']} items pick differently (acc / acc_norm), "
                   f"largest per-choice log-likelihood difference {per_item['max_abs_loglikelihood_diff']:.2e}")
    rep = {"task": args.task, "n": len(items), "model": f"demo ({demo_model_dir()})", "dataset": description,
           "ours": ours, "lmeval": lmeval, "lmeval_version": version,
           "difference_points": {m: ours[m] - lmeval[m] for m in ("acc", "acc_norm")},
           "tolerance_points": TOLERANCE_POINTS, "agree": worst <= TOLERANCE_POINTS, "verdict": verdict,
           "per_item": per_item, "seconds": {"ours": our_seconds, "lmeval": lm_seconds},
           "command": " ".join(["scripts/lmeval_agreement.py", *sys.argv[1:]]),
           "env": collect_env(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from qwen_quant.profile.report import write_atomic

    write_atomic(out.with_suffix(".json"), json.dumps(rep, indent=1, default=str) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
