#!/usr/bin/env python
"""Agreement check: multiple-choice tasks scored by qwen-eval and by lm-eval 0.4.13, same items,
same prompts, same model (the demo model's HF folder), same precision (fp32).

lm-eval lives in its own virtual environment (it is not a dependency of qwen-quant):
    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm-eval==0.4.13 transformers==5.24.0 accelerate
The items come from qwen-quant's reader (accuracy/datasets.py) and are handed to lm-eval as
a local JSONL file with a local-file YAML task written here, whose prompt is lm-eval's own
arc_easy/piqa prompt ("Question: {{question}}\\nAnswer:" + " {{choice}}"), so the only thing that
differs is the scoring code. lm-eval runs offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1) on the
folder `demo_model_dir()` caches (the GGUF dequantized to fp32 safetensors), the same weights that
`qwen-eval demo` scores.

Checked item by item, not only in aggregate: the (context, continuation) strings lm-eval logged
for every choice must equal ours, and the per-choice log-likelihoods are compared.
Writes reports/lmeval-agreement.{json,md} (the .md rendered from the .json).

    .venv/bin/python experiments/lmeval_agreement.py --tasks arc-easy,piqa --limit 500
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE_POINTS = 0.5
TASK_CHOICES = ("arc-easy", "arc-challenge", "piqa")
METRICS = ("acc", "acc_norm")
LMEVAL_PACKAGES = ("lm_eval", "torch", "transformers", "datasets", "accelerate", "tokenizers")

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


def home_relative(path) -> str:
    """A path under $HOME as ~/..., so reports carry no machine-specific prefix."""
    p, home = Path(path), Path.home()
    try:
        return "~/" + str(p.relative_to(home))
    except ValueError:
        return str(p)


def write_lmeval_task(items, folder: Path, name: str) -> None:
    with open(folder / "items.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "question": it.question, "choices": list(it.choices),
                                "answer_index": it.answer_index}) + "\n")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=folder / "items.jsonl"))


def lmeval_command(python: Path, model_dir: Path, folder: Path, name: str, batch: int) -> list[str]:
    return [str(python), "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", name,
            "--include_path", str(folder), "--batch_size", str(batch), "--device", "cpu",
            "--output_path", str(folder / "lmeval-out"), "--log_samples"]


def lmeval_versions(python: Path) -> dict:
    code = ("import importlib.metadata as m, json, platform\n"
            f"out = {{'python': platform.python_version()}}\n"
            f"for p in {list(LMEVAL_PACKAGES)!r}:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{python} cannot report its packages (is the lm-eval venv there?):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sample_arguments(args) -> list[tuple[str, str]]:
    """lm-eval's logged request arguments -> [(context, continuation)] per choice (list or gen_args_N form)."""
    if isinstance(args, dict):
        keys = sorted(args, key=lambda k: int(k.rsplit("_", 1)[-1]))
        return [(args[k]["arg_0"], args[k]["arg_1"]) for k in keys]
    return [(a[0], a[1]) for a in args]


def run_lmeval(python: Path, model_dir: Path, folder: Path, name: str, batch: int) -> tuple[dict, float]:
    out = folder / "lmeval-out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(lmeval_command(python, model_dir, folder, name, batch), cwd=str(folder), env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lm-eval failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    files = sorted(out.rglob("results_*.json"))
    if not files:
        sys.exit(f"lm-eval wrote no results under {out}:\n{proc.stdout[-2000:]}")
    res = json.loads(files[-1].read_text())["results"][name]
    lls, prompts = {}, {}
    for sample_file in out.rglob(f"samples_{name}_*.jsonl"):
        for line in sample_file.read_text().splitlines():
            s = json.loads(line)
            lls[int(s["doc_id"])] = [float(r[0]) for r in s["filtered_resps"]]
            prompts[int(s["doc_id"])] = _sample_arguments(s["arguments"])
    n = max(lls) + 1 if lls else 0
    return ({"acc": 100 * res["acc,none"], "acc_stderr": 100 * res["acc_stderr,none"],
             "acc_norm": 100 * res["acc_norm,none"], "acc_norm_stderr": 100 * res["acc_norm_stderr,none"],
             "loglikelihoods": [lls.get(i) for i in range(n)], "prompts": [prompts.get(i) for i in range(n)]},
            seconds)


def run_ours(em, task: str, questions, batch: int) -> tuple[dict, float]:
    """qwen-eval's scoring path (the same functions `qwen-eval demo --tasks TASK` runs, with the same
    context limit), keeping the per-choice log-likelihoods for the item-by-item comparison."""
    from qwen_quant.accuracy import multiple_choice as mc

    start = time.perf_counter()
    graded = mc.score_questions(em.model, questions, em.encode, em.prefix_token, batch,
                                min(em.max_length, 4096), em.pad_id, em.device, task)
    metrics = mc.accuracy_metrics(graded, with_norm=True)
    seconds = time.perf_counter() - start
    return ({"acc": metrics["accuracy"][0], "acc_stderr": metrics["accuracy"][1],
             "acc_norm": metrics["accuracy_norm"][0], "acc_norm_stderr": metrics["accuracy_norm"][1],
             "loglikelihoods": [[s.logprob for s in g.scores] for g in graded]}, seconds)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def compare_items(questions, ours: list[list[float]], theirs: list[list[float] | None],
                  their_prompts: list[list[tuple[str, str]] | None]) -> dict:
    """Per choice: the same (context, continuation) strings? the largest log-likelihood difference;
    per item: where the two pick differently."""
    worst, picks, picks_norm, compared, prompt_diffs, missing = 0.0, 0, 0, 0, [], 0
    for q, a, b, pr in zip(questions, ours, theirs, their_prompts):
        if b is None or len(a) != len(b):
            missing += 1
            continue
        compared += 1
        mine = list(zip(q.contexts, q.continuations))
        if pr is None or [tuple(x) for x in pr] != mine:
            prompt_diffs.append(q.id)
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
        picks += _argmax(a) != _argmax(b)
        n = q.norm_lengths
        picks_norm += _argmax([x / max(1, k) for x, k in zip(a, n)]) != _argmax([x / max(1, k) for x, k in zip(b, n)])
    return {"items_compared": compared, "items_missing_in_lmeval": missing,
            "items_with_different_prompt": len(prompt_diffs), "different_prompt_ids": prompt_diffs[:20],
            "max_abs_loglikelihood_diff": worst,
            "items_with_different_choice_acc": picks, "items_with_different_choice_acc_norm": picks_norm}


def task_verdict(ours: dict, lmeval: dict, per_item: dict) -> tuple[bool, str]:
    worst = max(abs(ours[m] - lmeval[m]) for m in METRICS)
    same_prompts = per_item["items_with_different_prompt"] == 0 and per_item["items_missing_in_lmeval"] == 0
    if worst <= TOLERANCE_POINTS and same_prompts:
        return True, f"agree within {TOLERANCE_POINTS} points (largest difference {worst:.2f} points)"
    reasons = []
    if worst > TOLERANCE_POINTS:
        reasons.append(f"DIFFER by {worst:.2f} points: {per_item['items_with_different_choice_acc']} / "
                       f"{per_item['items_with_different_choice_acc_norm']} items pick differently "
                       f"(acc / acc_norm), largest per-choice log-likelihood difference "
                       f"{per_item['max_abs_loglikelihood_diff']:.2e}")
    if not same_prompts:
        reasons.append(f"NOT the same requests: {per_item['items_with_different_prompt']} items with a different "
                       f"prompt, {per_item['items_missing_in_lmeval']} missing in lm-eval's samples")
    return False, "; ".join(reasons)


def markdown(rep: dict) -> str:
    env, lenv = rep["env"], rep["lmeval_env"]
    names = ", ".join(t["task"] for t in rep["tasks"])
    lines = [f"# qwen-eval vs lm-eval {lenv.get('lm_eval')}: {names}", "",
             f"Model: `{rep['model']}` (fp32, CPU), loaded by both tools from the same files. Each task's items "
             f"are written once to a JSONL file that both read; prompt 'Question: ...\\nAnswer:' + ' choice' in both "
             f"(lm-eval's arc_easy/piqa prompt, as a local YAML task). acc: highest summed log-likelihood; acc_norm: "
             f"highest log-likelihood per character of the choice. Tolerance: {rep['tolerance_points']} points.", "",
             "| task | items | metric | qwen-eval | lm-eval | difference (points) | within tolerance? |",
             "|---|---|---|---|---|---|---|"]
    for t in rep["tasks"]:
        o, l = t["ours"], t["lmeval"]
        for m in METRICS:
            diff = t["difference_points"][m]
            lines.append(f"| {t['task']} | {t['n']} | {m} | {o[m]:.2f} ± {o[m + '_stderr']:.2f} | "
                         f"{l[m]:.2f} ± {l[m + '_stderr']:.2f} | {diff:+.2f} | "
                         f"{'yes' if abs(diff) <= rep['tolerance_points'] else 'NO'} |")
    lines += ["", "## Item by item", ""]
    for t in rep["tasks"]:
        c, d = t["per_item"], t["dataset"]
        lines += [f"- **{t['task']}**: the first {t['n']} of {d.get('total_items', '?')} items of {d.get('dataset')} "
                  f"{d.get('split', '')} ({d.get('package')} {d.get('version')}, `{d.get('file')}`). "
                  f"{c['items_compared']} items compared, every choice: requests with a different "
                  f"(context, continuation) string: {c['items_with_different_prompt']}; largest log-likelihood "
                  f"difference {c['max_abs_loglikelihood_diff']:.2e} nats; items where the two pick a different "
                  f"choice: {c['items_with_different_choice_acc']} (acc), "
                  f"{c['items_with_different_choice_acc_norm']} (acc_norm). Time: qwen-eval "
                  f"{t['seconds']['ours']:.0f} s, lm-eval {t['seconds']['lmeval']:.0f} s (lm-eval's includes its "
                  f"start-up and model load; machine shared with other jobs, not a speed comparison). "
                  f"Verdict: {t['verdict']}."]
    lines += ["", f"**Verdict: {rep['verdict']}**", "", "## Provenance", "",
              f"- Command: `{rep['command']}`",
              f"- lm-eval command (per task; `<tmp>` is the task's temporary folder): `{rep['lmeval_command']}`",
              f"- Date: {rep['date']}; commit {env.get('commit')}"
              + (f" (uncommitted changes in: {', '.join(rep['dirty_files'])})" if rep.get("dirty_files") else ""),
              f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores), no GPU",
              f"- qwen-eval side: python {env.get('python')}, torch {env.get('torch')}, "
              f"transformers {env.get('transformers')}, qwen_quant {env.get('qwen_quant')}",
              "- lm-eval side (its own venv): " + ", ".join(f"{k} {v}" for k, v in lenv.items()),
              f"- Written by `experiments/lmeval_agreement.py` from `{rep['json_name']}`; no number typed by hand.", ""]
    return "\n".join(lines)


def dirty_files() -> list[str]:
    """Files with uncommitted changes (what '+dirty' in the commit means for this run)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(ROOT),
                          capture_output=True, text=True)
    return [line[3:] for line in proc.stdout.splitlines()] if proc.returncode == 0 else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", "--task", dest="tasks", default="arc-easy",
                   help=f"comma-separated, from: {', '.join(TASK_CHOICES)}")
    p.add_argument("--limit", type=int, default=300, help="first N items of each task (0: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lmeval-python", default="/tmp/lmeval-venv/bin/python")
    p.add_argument("--out", default=str(ROOT / "reports" / "lmeval-agreement"),
                   help="output path without suffix: writes OUT.json and OUT.md")
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_CHOICES]
    if not tasks or unknown:
        p.error(f"--tasks takes some of {', '.join(TASK_CHOICES)} (got {args.tasks!r})")
    os.environ.setdefault("QWEN_QUANT_QUIET", "1")
    python = Path(args.lmeval_python)
    if not python.exists():
        sys.exit(f"{python} not found: create the lm-eval venv first (see this script's docstring)")

    from qwen_quant.accuracy.tasks import load_items, questions as task_questions
    from qwen_quant.accuracy.tasks import TASKS, TaskRequest
    from qwen_quant.provenance import collect_env
    from qwen_quant.accuracy.evaluate import load_for_eval
    from qwen_quant.files import write_text_atomic
    from qwen_quant.models.demo import demo_model_dir

    lenv = lmeval_versions(python)
    model_dir = demo_model_dir()
    em = load_for_eval("demo")
    results = []
    for task in tasks:
        items, description = load_items(TaskRequest(TASKS[task]), args.limit or None)
        questions = task_questions(TaskRequest(TASKS[task]), items)
        name = "qq_" + task.replace("-", "_")
        print(f"{task}: {len(items)} items, lm-eval ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="lmeval-agreement-") as tmp:
            folder = Path(tmp)
            write_lmeval_task(items, folder, name)
            lmeval, lm_seconds = run_lmeval(python, model_dir, folder, name, args.batch)
        print(f"{task}: qwen-eval ...", file=sys.stderr, flush=True)
        ours, our_seconds = run_ours(em, task, questions, args.batch)
        per_item = compare_items(questions, ours.pop("loglikelihoods"), lmeval.pop("loglikelihoods"),
                                 lmeval.pop("prompts"))
        agree, verdict = task_verdict(ours, lmeval, per_item)
        results.append({"task": task, "n": len(items), "dataset": description, "ours": ours, "lmeval": lmeval,
                        "difference_points": {m: ours[m] - lmeval[m] for m in METRICS}, "agree": agree,
                        "verdict": verdict, "per_item": per_item,
                        "seconds": {"ours": our_seconds, "lmeval": lm_seconds}})

    agree = all(t["agree"] for t in results)
    worst = max(abs(d) for t in results for d in t["difference_points"].values())
    verdict = (f"qwen-eval and lm-eval {lenv.get('lm_eval')} agree within {TOLERANCE_POINTS} points on every task "
               f"and metric (largest difference {worst:.2f} points)" if agree else
               "; ".join(f"{t['task']}: {t['verdict']}" for t in results if not t["agree"]))
    out = Path(args.out)
    env = collect_env()
    template = lmeval_command(python, Path(home_relative(model_dir)), Path("<tmp>"), "qq_<task>", args.batch)
    rep = {"tasks": results, "model": f"demo ({home_relative(model_dir)})", "tolerance_points": TOLERANCE_POINTS,
           "agree": agree, "verdict": verdict, "lmeval_version": lenv.get("lm_eval"), "lmeval_env": lenv,
           "lmeval_command": " ".join(template), "lmeval_task_yaml": TASK_YAML.format(name="qq_<task>",
                                                                                        data="<tmp>/items.jsonl"),
           "command": " ".join([".venv/bin/python experiments/lmeval_agreement.py", *sys.argv[1:]]),
           "json_name": out.with_suffix(".json").name, "env": env, "dirty_files": dirty_files(),
           "platform": platform.platform(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(rep, indent=1, default=str) + "\n")
    rendered = json.loads(out.with_suffix(".json").read_text())  # the .md from the .json as written
    write_text_atomic(out.with_suffix(".md"), markdown(rendered))
    print(markdown(rendered))
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
