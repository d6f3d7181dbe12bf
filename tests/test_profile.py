"""qwen-profile's parts in-process: cells, roofline, HF engine, memory probe, tables and plots from JSON."""

import copy
import csv
import io
import json

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.profile import cells as cells_mod
from qwen_quant.profile import roofline, tables
from qwen_quant.profile.cells import CELL_FIELDS, Cell, empty_result, parse_lengths, parse_precisions, plan_cells


# ------------------------------------------------------------------ cells

def test_parse_lengths_and_precisions():
    assert parse_lengths("2048,8192", "--gen") == [2048, 8192]
    assert parse_lengths("16,16", "--gen") == [16]
    assert parse_lengths("none", "--encode") == []
    for bad in ("0", "-5", "2048,x", ""):
        with pytest.raises(UserError):
            parse_lengths(bad, "--gen")
    assert parse_precisions("BF16,int4") == ["bf16", "int4"]
    with pytest.raises(UserError):
        parse_precisions("int3")


def test_plan_is_model_major_with_seed_scenarios():
    plan = plan_cells([("synthetic:tiny", "synthetic-tiny", ["bf16", "int4"])], [2048], [2048, 8192], ["hf"], "auto")
    assert [(c.precision, c.scenario, c.context_tokens, c.new_tokens) for c in plan] == [
        ("bf16", "encode", 2048, 1), ("bf16", "generate", 1, 2048), ("bf16", "generate", 1, 8192),
        ("int4", "encode", 2048, 1), ("int4", "generate", 1, 2048), ("int4", "generate", 1, 8192)]
    assert Cell.from_dict(plan[0].to_dict()) == plan[0]
    row = empty_result(plan[1], "oom", "x")
    assert tuple(row) == CELL_FIELDS and row["tokens_per_s"] is None and row["status"] == "oom"


# ------------------------------------------------------------------ roofline

def test_kv_bytes_and_roofline():
    from qwen_quant.models.synthetic import synthetic_config

    # Qwen-7B: 32 layers x 32 heads x 128 dims, K and V, bf16 -> 512 KiB per position
    assert roofline.kv_bytes_per_position(synthetic_config("qwen-7b"), 2) == 2 * 32 * 32 * 128 * 2
    # Qwen2.5-7B has 4 KV heads: GQA shrinks the cache 7x
    assert roofline.kv_bytes_per_position(synthetic_config("qwen2.5-7b"), 2) == 2 * 28 * 4 * 128 * 2
    assert roofline.mean_kv_positions(1, 2048) == 1 + 1024
    r = roofline.roofline(1e9, 50.0, 100.0)
    assert r["achieved_gbps"] == pytest.approx(50.0) and r["roofline_pct"] == pytest.approx(50.0)
    assert r["ceiling_tokens_per_s"] == pytest.approx(100.0) and r["roofline_over_100"] is False
    assert roofline.roofline(1e9, 150.0, 100.0)["roofline_over_100"] is True
    assert roofline.roofline(None, 10.0, 100.0)["roofline_pct"] is None


def test_weight_bytes_count_tied_once_and_skip_input_embedding():
    emb = torch.nn.Embedding(100, 8)
    lin = torch.nn.Linear(8, 4, bias=False)

    class M(torch.nn.Module):
        def __init__(self, tie):
            super().__init__()
            self.embed, self.body = emb, lin
            self.head = torch.nn.Linear(8, 100, bias=False)
            if tie:
                self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    untied, tied = M(False), M(True)
    assert roofline.weight_bytes(untied) == (800 + 32 + 800) * 4
    assert roofline.weight_bytes(tied) == (800 + 32) * 4
    assert roofline.decode_weight_bytes(untied) == (32 + 800) * 4  # one embedding row is read, not the table
    assert roofline.decode_weight_bytes(tied) == (800 + 32) * 4  # the table is the head: read in full


def test_cpu_bandwidth_is_positive():
    bw = roofline.measure_copy_bandwidth("cpu", n_bytes=2 ** 22, repeats=2)
    assert bw["bandwidth_gbps"] > 0 and bw["bytes"] == 2 ** 22


# ------------------------------------------------------------------ engine + memory (tiny model, in-process)

@pytest.fixture(scope="module")
def tiny_model():
    from qwen_quant.profile.models import build_model, resolve_model

    return build_model(resolve_model("synthetic:tiny"), "bf16", "cpu")


def test_hf_engine_exact_lengths_and_token_times(tiny_model):
    from qwen_quant.engine import make_engine, total_seconds

    engine = make_engine("hf", tiny_model, 40, "cpu")
    ids = torch.randint(100, 1000, (1, 7))
    out = engine.timed_generate(ids, 9)
    assert tuple(out["tokens"].shape) == (1, 9)
    assert len(out["token_s"]) == 8 and all(t > 0 for t in out["token_s"])
    assert out["prefill_s"] > 0 and total_seconds(out) >= out["prefill_s"] + sum(out["token_s"]) * 0.99
    again = engine.timed_generate(ids, 9)["tokens"]
    assert torch.equal(again, out["tokens"])  # greedy: deterministic


def test_model_checks():
    from qwen_quant.profile.models import check_precision, default_precisions, resolve_model

    info = resolve_model("synthetic:tiny")
    assert default_precisions(info) == ["bf16", "int4"]
    check_precision(info, "int4")
    demo = resolve_model("demo")
    with pytest.raises(UserError, match="no Int4 form"):
        check_precision(demo, "int4")
    with pytest.raises(UserError):
        resolve_model("synthetic:qwen-7bb")


def test_memory_probe_cpu_sees_a_new_allocation():
    from qwen_quant.profile.memory import is_out_of_memory

    # In a fresh process: earlier tests in this one (the quantize pipeline tunes glibc's mmap
    # threshold) leave freed, still-resident heap that a new 64 MiB block could reuse unseen.
    script = """
import json, torch
from qwen_quant.profile.memory import MemoryProbe
probe = MemoryProbe("cpu").start()
block = torch.ones(64 * 2 ** 20, dtype=torch.uint8)  # 64 MiB, touched
del block
mem = probe.stop()
base = MemoryProbe("cpu").start().stop()["peak_rss_gib"]
print(json.dumps({"mem": mem, "base": base}))
"""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    mem, base = got["mem"], got["base"]
    assert mem["peak_allocated_gib"] is None and mem["peak_nvml_gib"] is None
    assert mem["peak_rss_gib"] >= base + 0.05  # the high-water mark keeps the freed 64 MiB
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------ tables and plots from stored JSON

def _cell(model, precision, scenario, n, tps=None, status="ok", **kw):
    c = Cell(model, model, precision, "hf", "auto", scenario, n if scenario == "encode" else 1,
             1 if scenario == "encode" else n)
    row = empty_result(c, status, None if status == "ok" else "CUDA out of memory")
    if status == "ok":
        row.update(tokens_per_s=tps, decode_tokens_per_s=tps * 1.05 if scenario == "generate" else None,
                   prefill_s=0.05, peak_allocated_gib=kw.get("mem", 9.5), peak_reserved_gib=10.0,
                   peak_nvml_gib=10.4, peak_rss_gib=2.0, repeats=3, spread={"min": tps * 0.98, "max": tps * 1.01},
                   roofline_pct=kw.get("pct"))
    return c, row


def _stored_results():
    made = [_cell("synthetic-qwen-7b", "bf16", "encode", 2048, 3000.0),
            _cell("synthetic-qwen-7b", "bf16", "generate", 2048, 31.5, pct=12.0),
            _cell("synthetic-qwen-7b", "int4", "encode", 2048, status="oom"),
            _cell("synthetic-qwen-7b", "int4", "generate", 2048, 45.25, pct=140.0)]
    never_ran = Cell("synthetic:qwen-7b", "synthetic-qwen-7b", "int4", "hf", "auto", "generate", 1, 8192)
    details = [{"cell": c.name, "weight_bytes": 7e9, "kv_bytes_final": 1e9, "token_latency_s": [0.03] * 5,
                "achieved_gbps": 100.0, "roofline_over_100": False} for c, _ in made]
    return {"env": {"gpu": "H100", "torch": "2.11", "transformers": "5.17", "commit": "abc", "date": "today"},
            "bandwidth": {"bandwidth_gbps": 3000.0}, "cells": [r for _, r in made], "details": details,
            "plan": [c.to_dict() for c, _ in made] + [never_ran.to_dict()], "interrupted": True}


def test_tables_show_oom_and_missing_never_zero(tmp_path):
    results = _stored_results()
    speed = tables.speed_table(results)
    header = speed.splitlines()[0]
    assert "Speed (2048 tokens)" in header and "Speed (8192 tokens)" in header
    assert f"{tables.SEED_LABEL}, 2048 tokens" in header
    int4_row = next(line for line in speed.splitlines() if "Int4" in line)
    assert "45.25 (44.34–45.70)" in int4_row and "not measured" in int4_row and "43.56" in int4_row
    memory = tables.memory_table(results)
    assert "Peak Usage for Encoding 2048 Tokens" in memory and "Peak Usage for Generating 8192 Tokens" in memory
    int4_mem = next(line for line in memory.splitlines() if "Int4" in line)
    assert "OOM" in int4_mem and "not measured" in int4_mem and "0.00" not in int4_mem
    assert "8.21 GiB" in int4_mem and "13.62 GiB" in int4_mem  # the seed's figures beside ours
    assert "above 100 %" in tables.decode_detail_table(results)

    paths = tables.render_tables(results, tmp_path)
    assert sorted(p.name for p in paths) == ["details.csv", "memory.md", "speed.md"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "details.csv").read_text())))
    assert len(rows) == 4 and rows[2]["status"] == "oom" and rows[2]["tokens_per_s"] == ""
    assert set(CELL_FIELDS) - {"spread"} <= set(rows[0]) and rows[3]["roofline_pct"] == "140.0"
    assert "interrupted" in (tmp_path / "speed.md").read_text()
    assert tables.CPU_INT4_NOTE not in (tmp_path / "speed.md").read_text()  # said only where the CPU backend ran


def test_the_speed_page_explains_cpu_int4_encoding_when_the_cpu_backend_ran():
    results = _stored_results()
    results["details"][3]["backend_used"] = ["cpu"]
    assert tables.CPU_INT4_NOTE in tables.speed_markdown(results)


def test_tables_follow_other_lengths_and_skip_seed_for_other_models():
    results = copy.deepcopy(_stored_results())
    for c in results["cells"] + results["plan"]:
        c["model"] = "SmolLM2-135M-Instruct"
        if "label" in c:
            c["label"] = c["model"]
    results["cells"][1]["new_tokens"] = 64
    speed = tables.speed_table(results)
    assert "Speed (64 tokens)" in speed and tables.SEED_LABEL not in speed
    assert tables.seed_model_size("synthetic-qwen-14b") == "14b"
    assert tables.seed_model_size("Qwen-7B-Chat-Int4") == "7b"
    assert tables.seed_model_size("Qwen2.5-7B") is None


def _timeline_results():
    """BF16 and Int4 rows (HF engine) with an 8192 run each; BF16 also a separate 2048 run."""
    made = [_cell("synthetic-qwen-7b", "bf16", "generate", 8192, 25.0, mem=22.0),
            _cell("synthetic-qwen-7b", "bf16", "generate", 2048, 30.0),
            _cell("synthetic-qwen-7b", "int4", "generate", 8192, 50.0, mem=11.0)]
    details = [{"cell": c.name, "token_latency_s": [0.03] * (r["new_tokens"] - 1)} for c, r in made]
    details[2]["token_latency_s"] = [0.01] * 8191
    return {"env": {"gpu": "H200", "date": "2026-12-05T00:00:00"}, "cells": [r for _, r in made],
            "details": details, "plan": [c.to_dict() for c, _ in made]}


def test_a_column_is_read_off_a_longer_runs_timeline_and_checked_against_a_separate_run():
    results = _timeline_results()
    # Int4 has no 2048 run: its first 2048 tokens took prefill 0.05 s + 2047 x 0.01 s
    assert tables.prefix_speed(results, ("synthetic-qwen-7b", "int4", "hf"), 2048) == pytest.approx(
        2048 / (0.05 + 2047 * 0.01))
    speed = tables.speed_table(results)
    int4 = next(line for line in speed.splitlines() if line.startswith("| synthetic-qwen-7b Int4 |"))
    assert f"{2048 / (0.05 + 20.47):.2f} †" in int4 and "50.00" in int4
    ratio = next(line for line in speed.splitlines() if "Int4 / BF16" in line)
    assert f"{2048 / (0.05 + 20.47) / 30.0:.2f}x" in ratio and "2.00x" in ratio  # 2048: vs the separate run
    check = tables.timeline_check(results)
    bf16_prefix = 2048 / (0.05 + 2047 * 0.03)
    assert f"| 30.00 | {bf16_prefix:.2f} | {100 * (bf16_prefix - 30) / 30:+.1f} % |" in check
    memory = tables.memory_table(results)
    assert "0.50x" in next(line for line in memory.splitlines() if "Int4 / BF16" in line)  # 11 / 22 GiB


def test_seed_tables_page_names_every_row_and_says_not_measured(tmp_path):
    from qwen_quant.report import write_seed_tables

    run = tmp_path / "h200-seed-7b"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_timeline_results()))
    page = write_seed_tables([tmp_path], tmp_path / "seed-tables.md").read_text()
    rows = {line.split("|")[2].strip() + line.split("|")[3].strip(): line for line in page.splitlines()
            if line.startswith("| Qwen-7B") and "qwen-quant" in line}
    assert "30.00" in page and "25.00" in page and "† |" in page  # measured, and the Int4 2048 from its timeline
    assert page.count("| Qwen-14B | BF16 | ours | — | — | not measured | not measured |") == 2  # speed, memory
    assert "H200 | 2026-12-05" in page and "17.66 GiB" in page  # our date and GPU; the seed's figures beside
    saved = json.loads((tmp_path / "seed-tables.json").read_text())["rows"]
    assert {r["precision"] for r in saved} == {"bf16", "int4"} and saved[0]["source"].endswith("results.json")
    assert rows


def test_plots_from_stored_json(tmp_path):
    from qwen_quant.profile.plots import memory_breakdown, render_plots

    results = _stored_results()
    paths = render_plots(results, tmp_path)
    assert {p.name for p in paths} == {"decode_latency.png", "memory.png"}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    parts = memory_breakdown(results["cells"][0], results["details"][0])
    assert parts["weights"] + parts["kv_cache"] + parts["activations"] == pytest.approx(9.5)
    assert cells_mod.STATUSES == ("ok", "oom", "error")
