"""Report rendering from stored JSON: deltas, OOM and missing cells shown as such (never zeros), model card."""

import json

import pytest

from qwen_quant.profile.cells import CELL_FIELDS
from qwen_quant.accuracy.tables import accuracy_csv, accuracy_markdown, accuracy_table
from qwen_quant.errors import UserError
from qwen_quant.report import write_report


def row(model, task, metric, value, stderr=None, n=100, **details):
    return {"model": model, "task": task, "metric": metric, "value": value, "stderr": stderr, "n": n,
            "details": details}


EVAL = {
    "kind": "eval",
    "env": {"torch": "2.13.0", "transformers": "5.24", "commit": "abc123", "date": "2026-11-28", "cpu": "cpu",
            "command": "qwen-eval demo out/gptq"},
    "models": [{"label": "fp", "spec": "demo"}, {"label": "gptq-int4", "spec": "out/gptq"}],
    "results": [
        row("fp", "ppl-wiki", "perplexity", 20.0, 0.5, 10, corpus="wikipedia-summaries-en", split="eval",
            seqlen=512, tokens=5120, slice="first 12 documents", tokenizer="tok"),
        row("gptq-int4", "ppl-wiki", "perplexity", 20.75, 0.5, 10, corpus="wikipedia-summaries-en", split="eval",
            seqlen=512, tokens=5120, slice="first 12 documents", tokenizer="tok"),
        row("fp", "arc-easy", "accuracy", 55.0, 5.0),
        row("gptq-int4", "arc-easy", "accuracy", None, None, 0, oom=True),
        row("fp", "mmlu", "accuracy", 31.0, 4.6),
        row("gptq-int4", "mmlu", "accuracy", None, None, 0, missing="interrupted"),
        row("fp", "ppl-wiki", "perplexity@4096", None, None, 0, missing="beyond the model's context (2048)"),
    ],
}


def cell(precision, scenario, length, status="ok", tps=None, rss=None):
    c = {k: None for k in CELL_FIELDS}
    c.update(model="SmolLM2-135M-Instruct", precision=precision, engine="hf", backend="auto", scenario=scenario,
             context_tokens=length if scenario == "encode" else 1, new_tokens=1 if scenario == "encode" else length,
             status=status, tokens_per_s=tps, peak_rss_gib=rss, repeats=1)
    return c


PROFILE = {
    "env": {"cpu": "cpu", "torch": "2.13.0", "transformers": "5.24", "commit": "abc123", "date": "2026-11-28",
            "command": "qwen-profile demo"},
    "cells": [cell("fp32", "encode", 64, tps=900.0, rss=1.25), cell("fp32", "generate", 32, tps=14.5, rss=1.3),
              cell("int4", "encode", 64, status="oom"), cell("int4", "generate", 32, tps=11.0, rss=0.9)],
}


def test_accuracy_table_shows_deltas_oom_and_missing_never_zero():
    table = accuracy_table(EVAL)
    lines = table.splitlines()
    assert lines[0].startswith("| model | Wikipedia EN ppl")
    gptq = next(ln for ln in lines if ln.startswith("| gptq-int4"))
    assert "20.750 ± 0.500 (Δ +0.750)" in gptq
    assert "OOM" in gptq and "missing: interrupted" in gptq
    cells = [c.strip() for c in gptq.strip("|").split("|")]
    assert not any(c.startswith("0.0") for c in cells)
    md = accuracy_markdown(EVAL)
    assert "missing: beyond the model's context (2048)" in md
    assert "GPTQ convention" in md and "wikipedia-summaries-en" in md


def test_deltas_on_the_same_items_carry_their_paired_stderr():
    items = {"fp": "1111100000", "gptq-int4": "1111000001"}  # one item lost, one gained: Δ 0, yet not noise-free
    report = dict(EVAL, results=[row(m, "piqa", "accuracy", 50.0, 16.7, 10, per_item=items[m]) for m in items])
    gptq = next(ln for ln in accuracy_table(report).splitlines() if ln.startswith("| gptq-int4"))
    assert "(Δ +0.0 ± 14.9)" in gptq  # sd of (0 x8, -1, +1) = sqrt(2/9), / sqrt(10)
    line = next(ln for ln in accuracy_csv(report).splitlines() if ln.startswith("gptq-int4,piqa"))
    assert ",0.0,14.9" in line
    assert "paired" in accuracy_markdown(report)


def test_item_by_item_counts_gained_and_lost_with_the_exact_sign_test():
    """Δ 0 can hide items moving both ways; 0 gained and 6 lost is the sign test's p = 2 / 2^6."""
    items = {"fp": "1111110000", "swap": "1111000011", "worse": "0000000000", "longer": "101110000011"}
    report = dict(EVAL, models=[{"label": m} for m in items],
                  results=[row(m, "piqa", "accuracy", 50.0, 16.7, len(f), per_item=f) for m, f in items.items()]
                  + [row(m, "ppl-wiki", "perplexity", 9.0, 0.5, 2, per_window_nll=[2.0, 2.1]) for m in items])
    md = accuracy_markdown(report)
    section = md[md.index("## Item by item"):md.index("## Data")]
    line = next(ln for ln in section.splitlines() if ln.startswith("| piqa"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "2 / 2 (p 1.00)"
    assert cells[3] == "0 / 6 (p 0.03)"
    assert cells[4] == "0 / 2 (p 0.50) (first 10)"  # fp's 10 items against the longer row's first 10
    assert "ppl-wiki" not in section  # perplexity has windows, not right/wrong items
    assert "## Item by item" not in accuracy_markdown(dict(EVAL, results=[r for r in report["results"]
                                                                        if r["task"] == "ppl-wiki"]))


def test_rows_on_different_item_counts_differ_only_on_the_items_both_scored():
    """A table grown across sessions: fp scored 10 items, an older row 6 (qwen-eval's first 6 of the same
    order). The Δ is paired over those 6, says so, and is never the values' difference over different items."""
    fp_items, q_items = "1111100000", "101110"  # fp's first 6: 111110; q loses item 2, gains none
    fp_nlls, q_nlls = [2.0, 2.2, 1.9, 2.1, 2.5, 2.4], [2.1, 2.3, 2.0, 2.2]
    results = [row("fp", "piqa", "accuracy", 50.0, 16.7, 10, per_item=fp_items),
               row("gptq-int4", "piqa", "accuracy", 66.7, 21.1, 6, per_item=q_items),
               row("fp", "mmlu", "accuracy_macro", 40.0, None, 10),
               row("gptq-int4", "mmlu", "accuracy_macro", 30.0, None, 6),
               row("fp", "ppl-wiki", "perplexity", 9.0, 0.5, 6, per_window_nll=fp_nlls),
               row("gptq-int4", "ppl-wiki", "perplexity", 8.5, 0.5, 4, per_window_nll=q_nlls)]
    report = dict(EVAL, results=results)
    gptq = next(ln for ln in accuracy_table(report).splitlines() if ln.startswith("| gptq-int4"))
    # on the 6 common items: fp 5/6, q 4/6: Δ -16.7; differences (0,-1,0,0,0,0): sd sqrt(1/6) / sqrt(6)
    assert "(Δ -16.7 ± 16.7 (first 6))" in gptq and "+16.7" not in gptq
    assert "(first 4)" in gptq  # perplexity: 4 windows in common
    csv_lines = accuracy_csv(report).splitlines()
    assert csv_lines[0].startswith("model,task,metric,value,stderr,n,delta_vs_first,delta_stderr_paired,delta_n")
    piqa = next(ln for ln in csv_lines if ln.startswith("gptq-int4,piqa,"))
    assert piqa.split(",")[8] == "6" and float(piqa.split(",")[6]) == pytest.approx(-100 / 6)
    macro = next(ln for ln in csv_lines if ln.startswith("gptq-int4,mmlu,accuracy_macro"))
    assert macro.split(",")[6:9] == ["", "", ""]  # no per-item results: no difference across different items

    from qwen_quant.accuracy.paired import loss_ratio
    from qwen_quant.accuracy.tables import loss_ratio_table

    rtn_nlls = [2.3, 2.45, 2.2, 2.4, 2.6]
    report["results"].append(row("rtn", "ppl-wiki", "perplexity", 10.0, 0.5, 5, per_window_nll=rtn_nlls))
    ratio, se = loss_ratio(fp_nlls[:4], rtn_nlls[:4], q_nlls)
    assert f"{ratio:.2f} ± {se:.2f} (first 4)" in loss_ratio_table(report, "rtn")


def test_csv_keeps_holes_empty_and_deltas():
    lines = accuracy_csv(EVAL).splitlines()
    assert lines[0].startswith("model,task,metric,value,stderr,n,delta_vs_first")
    ppl = next(ln for ln in lines if ln.startswith("gptq-int4,ppl-wiki,perplexity,"))
    assert ",0.75," in ppl
    oom = next(ln for ln in lines if ln.startswith("gptq-int4,arc-easy,accuracy,"))
    assert oom.startswith("gptq-int4,arc-easy,accuracy,,,0,,")


def test_report_joins_eval_profile_and_quant(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(EVAL))
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "results.json").write_text(json.dumps(PROFILE))
    (tmp_path / "prof" / "memory.png").write_bytes(b"\x89PNG fake")
    readme = write_report([tmp_path / "eval", tmp_path / "prof"], tmp_path / "report")
    text = readme.read_text()
    assert "## Accuracy" in text and "## Speed" in text and "## Memory" in text
    assert "Speed (32 tokens)" in text and "Peak Usage for Encoding 64 Tokens" in text
    assert "OOM" in text.split("## Memory")[1]
    assert "![memory](memory.png)" in text and (tmp_path / "report" / "memory.png").exists()
    assert "tokens/s" in text and "GiB" in text and "GPTQ convention" in text
    assert "qwen-eval demo out/gptq" in text and "qwen-profile demo" in text


def test_combined_report_shows_items_gained_and_lost_under_accuracy(tmp_path):
    items = {"fp": "1111110000", "worse": "0000000000"}
    report = dict(EVAL, models=[{"label": m} for m in items],
                  results=[row(m, "piqa", "accuracy", 50.0, 16.7, 10, per_item=f) for m, f in items.items()])
    (tmp_path / "results.json").write_text(json.dumps(report))
    text = write_report([tmp_path / "results.json"], tmp_path / "r").read_text()
    section = text[text.index("### Item by item"):text.index("## Speed")]  # nested under ## Accuracy
    assert "0 / 6 (p 0.03)" in section


def test_report_without_profile_says_not_measured(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(EVAL))
    text = write_report([tmp_path / "results.json"], tmp_path / "r").read_text()
    assert "not measured: no qwen-profile results.json" in text


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    from qwen_quant.report_cli import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results.json" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["--model-card", str(tmp_path)])
    assert e.value.code == 2 and "quant_report.json" in capsys.readouterr().err


QUANT_REPORT = {
    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                            "damp_percent": 0.01, "static_groups": False, "meta": {"date": "2026-11-28T06:00:00Z"}},
    "settings": {"method": "gptq", "mse": False},
    "model": {"source": "demo", "synthetic": False, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
              "license": "apache-2.0"},
    "calibration": {"source": "default", "nsamples": 32, "seqlen": 512, "tokens": 16384, "corpora": []},
    "layers": [{"name": "model.layers.0.mlp.down_proj", "rel_error": 0.05, "fallback": None}],
    "totals": {"layers": 1, "mean_rel_error": 0.05, "max_rel_error": 0.05, "worst_layer": "model.layers.0.mlp.down_proj",
               "fallbacks": 0, "seconds": 12.0},
    "downstream": {"note": "K % 128 == 0 everywhere."},
    "device": "cpu", "versions": {"qwen_quant": "0.1.0"}, "command": "qwen-quantize demo", "git_commit": "abc",
}


def test_model_card_carries_front_matter_and_tables(tmp_path):
    from qwen_quant.report import write_model_card

    ckpt = tmp_path / "gptq-int4"
    ckpt.mkdir()
    (ckpt / "quant_report.json").write_text(json.dumps(QUANT_REPORT))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(EVAL))
    text = write_model_card(ckpt, [tmp_path / "eval"]).read_text()
    front = text.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "license: apache-2.0" in front
    assert "gptq" in front and "int4" in front
    assert "group size 128" in text and "32 samples x 512 tokens" in text
    assert "20.750 ± 0.500 (Δ +0.750)" in text and "OOM" in text


def _ppl_row(model, task, nlls):
    import math

    mean = sum(nlls) / len(nlls)
    return {"model": model, "task": task, "metric": "perplexity", "value": math.exp(mean), "stderr": 0.1,
            "n": len(nlls), "details": {"per_window_nll": nlls, "seqlen": 512}}


def test_comparison_joins_runs_and_gives_loss_ratios_against_a_baseline(tmp_path):
    from qwen_quant.accuracy.paired import loss_ratio
    from qwen_quant.report import write_comparison

    fp, rtn, q = [2.0, 2.2, 1.9, 2.1], [2.3, 2.45, 2.2, 2.4], [2.1, 2.3, 2.0, 2.2]
    runs = {"fp": fp, "rtn": rtn, "gptq": q}
    for name, nlls in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "env": {"commit": "c", "date": "d", "command": f"qwen-eval {name}"}, "models": [{"label": name}],
            "results": [_ppl_row(name, "ppl-wiki", nlls),
                        {"model": name, "task": "arc-easy", "metric": "accuracy", "value": 50.0, "stderr": 5.0,
                         "n": 4, "details": {"per_item": "1100" if name == "fp" else "1000"}}]}))
    page = write_comparison([tmp_path / n for n in runs], tmp_path / "out", baseline="rtn").read_text()
    ratio, se = loss_ratio(fp, rtn, q)
    assert f"{ratio:.2f} ± {se:.2f}" in page and "loss / rtn's" in page
    assert "(Δ +0.0 ± 25.0)" in page  # paired over the same 4 items: differences 0,-1,0,0
    joined = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [m["label"] for m in joined["models"]] == ["fp", "rtn", "gptq"] and len(joined["runs"]) == 3
    with pytest.raises(UserError, match="none of the models"):
        write_comparison([tmp_path / "fp", tmp_path / "gptq"], tmp_path / "o2", baseline="rtn")


def test_comparison_keeps_an_earlier_tables_rows_and_replaces_what_is_measured_again(tmp_path):
    """A table that grows across sessions: the earlier comparison.json carries its rows (per-window lists
    included, so loss ratios still pair), a re-measured model replaces its old rows in place."""
    from qwen_quant.accuracy.paired import loss_ratio
    from qwen_quant.report import write_comparison

    def results(name, nlls, cpu):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "results.json").write_text(json.dumps({
            "env": {"commit": "c", "date": "d", "command": f"qwen-eval {name}", "cpu": cpu},
            "models": [{"label": name}], "results": [_ppl_row(name, "ppl-wiki", nlls)]}))
        return tmp_path / name

    fp, rtn, old_q = [2.0, 2.2, 1.9, 2.1], [2.3, 2.45, 2.2, 2.4], [2.1, 2.3, 2.0, 2.2]
    write_comparison([results("fp", fp, "old cpu"), results("rtn", rtn, "old cpu"), results("gptq", old_q, "old cpu")],
                     tmp_path / "t1", baseline="rtn")
    for name in ("fp", "rtn", "gptq"):  # the work folder is gone: only the committed table remains
        (tmp_path / name / "results.json").unlink()
    new_q, extra = [2.05, 2.25, 1.95, 2.15], [2.2, 2.4, 2.1, 2.3]
    page = write_comparison([results("gptq", new_q, "new cpu"), results("big", extra, "new cpu")], tmp_path / "t2",
                            baseline="rtn", keep=tmp_path / "t1" / "comparison.json").read_text()
    joined = json.loads((tmp_path / "t2" / "comparison.json").read_text())
    assert [m["label"] for m in joined["models"]] == ["fp", "rtn", "gptq", "big"]
    assert [r["details"]["per_window_nll"] for r in joined["results"] if r["model"] == "gptq"] == [new_q]
    for nlls in (new_q, extra):
        ratio, se = loss_ratio(fp, rtn, nlls)
        assert f"{ratio:.2f} ± {se:.2f}" in page
    old_ratio = loss_ratio(fp, rtn, old_q)[0]
    assert f"| gptq | {old_ratio:.2f}" not in page
    assert [r["models"] for r in joined["runs"]] == [["fp"], ["rtn"], ["gptq"], ["big"]]
    assert "old cpu" in page and "new cpu" in page  # each run says where it ran
    with pytest.raises(UserError, match="no such file"):
        write_comparison([tmp_path / "big"], tmp_path / "t3", keep=tmp_path / "missing.json")
    with pytest.raises(UserError, match="not a comparison.json"):
        write_comparison([tmp_path / "big"], tmp_path / "t3", keep=tmp_path / "big" / "results.json")
    # the kept table alone, written again under a new title: the same rows, nothing measured
    again = write_comparison([], tmp_path / "t4", baseline="rtn", title="Renamed",
                             keep=tmp_path / "t2" / "comparison.json").read_text()
    assert again.startswith("# Renamed") and again.replace("# Renamed", "", 1) == page.replace("# Comparison", "", 1)
    assert json.loads((tmp_path / "t4" / "comparison.json").read_text()) == joined
    with pytest.raises(UserError, match="nothing to compare"):
        write_comparison([], tmp_path / "t5")


def test_comparison_adds_a_task_to_a_kept_row_without_scoring_its_other_tasks_again(tmp_path):
    """A column scored in a later session (HumanEval after the perplexities): the model's new task joins its
    kept results, its re-measured task replaces the old one, and both runs stay listed."""
    from qwen_quant.report import write_comparison

    def results(folder, name, rows, command):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "results.json").write_text(json.dumps({
            "env": {"commit": "c", "date": "d", "command": command},
            "models": [{"label": name}], "results": rows}))
        return tmp_path / folder

    first = [results("fp", "fp", [_ppl_row("fp", "ppl-wiki", [2.0, 2.2]), _ppl_row("fp", "ppl-zh", [3.0, 3.1])],
                     "qwen-eval fp --tasks ppl-wiki,ppl-zh")]
    write_comparison(first, tmp_path / "t1")
    later = results("fp-later", "fp", [_ppl_row("fp", "ppl-zh", [3.5, 3.6]), _ppl_row("fp", "ppl-code", [1.0, 1.1])],
                    "qwen-eval fp --tasks ppl-zh,ppl-code")
    write_comparison([later], tmp_path / "t2", keep=tmp_path / "t1" / "comparison.json")
    joined = json.loads((tmp_path / "t2" / "comparison.json").read_text())
    got = {r["task"]: r["details"]["per_window_nll"] for r in joined["results"]}
    assert got == {"ppl-wiki": [2.0, 2.2], "ppl-zh": [3.5, 3.6], "ppl-code": [1.0, 1.1]}
    assert [r["env"]["command"] for r in joined["runs"]] == ["qwen-eval fp --tasks ppl-wiki,ppl-zh",
                                                             "qwen-eval fp --tasks ppl-zh,ppl-code"]
    assert [m["label"] for m in joined["models"]] == ["fp"]
    # rendered again with the later results folder still there (the next session's render): each run once
    write_comparison([later], tmp_path / "t3", keep=tmp_path / "t2" / "comparison.json")
    again = json.loads((tmp_path / "t3" / "comparison.json").read_text())
    assert [r["env"]["command"] for r in again["runs"]] == [r["env"]["command"] for r in joined["runs"]]
    assert again["results"] == joined["results"]
