"""The 95% interval verdict (accuracy/paired.py) and the demo lever table's paired differences
(experiments/demo_accuracy_levers.py, loaded by path: an experiment, not the product)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "experiments"


def load_script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # the levers script imports the goals script by name
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("delta, stderr, want", [
    (-0.5, 0.5, "inside"),                         # [-1.48, +0.48]
    (-4.0, 0.9, "outside"),                        # [-5.76, -2.24]
    (+3.0, 0.4, "outside"),                        # [+2.22, +3.78]
    (-4.0, 2.0, "across (more items needed)"),     # [-7.92, -0.08]
    (0.0, 1.1, "across (more items needed)"),      # [-2.16, +2.16]
    (-1.0, None, "n/a"),
])
def test_interval_verdict(delta, stderr, want):
    from qwen_quant.accuracy.paired import interval95, interval_vs_goal

    interval = interval95(delta, stderr)
    assert interval_vs_goal(interval) == want
    if stderr is not None:
        assert interval == pytest.approx([delta - 1.96 * stderr, delta + 1.96 * stderr])


def _result(model, task, metric, value, per_item=None, n=4):
    details = {"dataset": {"file": "items.arrow"}}
    if per_item:
        details["per_item"] = per_item
    else:
        details.update(seqlen=512, slice="first 4 windows")
    return {"model": model, "task": task, "metric": metric, "value": value, "n": n, "details": details}


def test_lever_rows_pair_each_checkpoint_with_fp_on_the_same_items(tmp_path, monkeypatch):
    levers = load_script("demo_accuracy_levers")
    monkeypatch.setattr(levers, "ROOT", tmp_path)
    reference = {"models": [{"label": "fp"}, {"label": "ours"}], "env": {"command": "goals", "commit": "abc"},
                 "results": [_result("fp", "hellaswag", "accuracy", 50.0, "1100"),
                             _result("fp", "ppl-wiki", "perplexity", 10.0),
                             _result("ours", "hellaswag", "accuracy", 25.0, "1000")]}
    # recorded before forward_dtype was: the default, auto, is filled in
    goals = {"checkpoints": {"ours": {"method": "gptq", "group_size": 128, "damp": 0.01, "mse": True, "path": "x",
                                      "calibration": "32 x 512 tokens (default)"}}}
    lever = tmp_path / "levers" / "g32"
    lever.mkdir(parents=True)
    (lever / "quant_report.json").write_text(json.dumps({
        "quantization_config": {"bits": 4, "group_size": 32, "damp_percent": 0.01},
        "calibration": {"nsamples": 32, "seqlen": 512, "source": "default"},
        "settings": {"method": "gptq", "mse": True, "forward_dtype": "auto"}, "command": "q", "git_commit": "c"}))
    # scored twice: a benchmark with per-item answers, then perplexity on the reference's windows
    (lever / "results.json").write_text(json.dumps({"env": {"command": "e1", "commit": "d"}, "results": [
        _result("g32", "hellaswag", "accuracy", 75.0, "1110")]}))
    (lever / "results-2.json").write_text(json.dumps({"env": {"command": "e2", "commit": "d"}, "results": [
        _result("g32", "ppl-wiki", "perplexity", 12.5), _result("g32", "ppl-zh", "perplexity", 9.0)]}))

    rows = levers.lever_rows([("reports/ref", reference, goals)], tmp_path / "levers")
    assert [r["lever"] for r in rows] == ["ours", "g32"]
    ours, g32 = rows
    assert ours["scored_by"] == [{"command": "goals", "commit": "abc", "json": "reports/ref/results.json"}]
    assert ours["cells"]["hellaswag accuracy (n=4)"]["minus_fp"] == -25.0
    # per-item differences 0,-1,0,0: mean -25 %, stderr sqrt(var/n) = sqrt(0.25/4) = 25 %
    assert ours["cells"]["hellaswag accuracy (n=4)"]["minus_fp_stderr"] == pytest.approx(25.0)
    assert g32["cells"]["hellaswag accuracy (n=4)"]["minus_fp"] == 25.0
    assert g32["cells"]["ppl-wiki perplexity"]["minus_fp"] == 2.5
    assert "minus_fp" not in g32["cells"]["ppl-zh perplexity"]  # fp has no ppl-zh on these windows
    assert ours["settings"]["forward_dtype"] == "auto" and "path" not in ours["settings"]
    # asymmetric calibration is off in records that predate it, on both sides: still the same recipe
    assert ours["settings"]["gptaq_alpha"] == 0.0 == g32["settings"]["gptaq_alpha"]
    assert ours["settings"]["refit_scales"] is False is g32["settings"]["refit_scales"]
    assert levers.changed(g32["settings"], ours["settings"]) == "group_size=32"
    assert levers.changed(ours["settings"], ours["settings"]) == "(the reference settings)"
    assert [x["json"] for x in g32["scored_by"]] == ["levers/g32/results.json", "levers/g32/results-2.json"]
    text = levers.markdown(rows, [("reports/ref", reference, goals)])
    assert "| `g32` |" in text and "75.0 (+25.0 ± 25.0)" in text and "(no fp on these windows)" in text


def test_lever_provenance_keeps_the_dirty_flag():
    levers = load_script("demo_accuracy_levers")
    assert levers.short("f27fdc030537351b4cc607a1f8a170c84c5ac840+dirty") == "f27fdc0305+dirty"
    assert levers.short("f27fdc030537351b4cc607a1f8a170c84c5ac840") == "f27fdc0305"
    assert levers.short(None) == "None"


def test_goal_summary_counts_metrics_within_two_points_and_their_intervals():
    levers = load_script("demo_accuracy_levers")
    rows = [{"lever": "a", "cells": {
        "piqa accuracy (n=1000)": {"minus_fp": -0.5, "minus_fp_stderr": 0.5},  # [-1.48, 0.48]: inside
        "arc-easy accuracy (n=1000)": {"minus_fp": -3.0, "minus_fp_stderr": 0.4},  # [-3.78, -2.22]: outside
        "hellaswag accuracy (n=1000)": {"minus_fp": -1.5, "minus_fp_stderr": 1.0},  # within, interval across
        "hellaswag accuracy (n=300)": {"minus_fp": -9.0, "minus_fp_stderr": 1.0},  # another item count: left out
        "ppl-wiki perplexity": {"minus_fp": 3.0}}},
        {"lever": "only-300", "cells": {"piqa accuracy (n=300)": {"minus_fp": 0.0, "minus_fp_stderr": 1.0}}}]
    lines = levers.goal_summary(rows)
    assert lines[-1] == "| `a` | 3 | 2 of 3 | 1 / 1 / 1 | arc-easy accuracy -3.0 |"
    assert not any("only-300" in line for line in lines)
    assert levers.goal_summary(rows[1:]) == []


def test_contrast_is_the_per_window_contrast_and_its_spread():
    from qwen_quant.accuracy.paired import contrast

    a, b = [2.0, 3.0, 4.0, 5.0], [2.5, 3.0, 4.75, 5.25]   # b - a per window: 0.5, 0, 0.75, 0.25
    mean, se = contrast([a, b], [-1, 1])
    assert mean == pytest.approx(0.375)
    # sample variance of (0.5, 0, 0.75, 0.25) is 0.104167; stderr sqrt(var / 4): a's own spread (var 1.67) cancels
    assert se == pytest.approx((0.3125 / 3 / 4) ** 0.5)
    # a 2x2 main effect is the mean of two paired differences, its error that of their per-window mean
    c, d = [1.0, 1.0, 1.0, 1.0], [1.5, 1.0, 1.0, 1.5]     # d - c: 0.5, 0, 0, 0.5
    main, main_se = contrast([a, b, c, d], [-.5, .5, -.5, .5])
    per_window = [(0.5 + 0.5) / 2, 0.0, 0.75 / 2, (0.25 + 0.5) / 2]
    m = sum(per_window) / 4
    assert main == pytest.approx(m)
    assert main_se == pytest.approx((sum((x - m) ** 2 for x in per_window) / 3 / 4) ** 0.5)
    with pytest.raises(ValueError):
        contrast([a, b[:3]], [-1, 1])


def test_draw_spread_separates_a_shared_shift_from_the_windows_noise():
    from qwen_quant.accuracy.paired import draw_spread, f_upper_tail, with_draws

    # three runs of one recipe on 4 windows: run 2 is shifted by 0.1 on every window, the rest is the same
    # interaction pattern (+e, -e) that a paired stderr sees
    base = [2.0, 3.0, 4.0, 5.0]
    e = [0.01, -0.01, 0.01, -0.01]
    runs = [[b + x for b, x in zip(base, e)], [b - x for b, x in zip(base, e)], [b + 0.1 for b in base]]
    out = draw_spread(runs)
    # by hand: run means 3.5, 3.5, 3.6 (grand 3.5333); ms_draw = 4 * (2 * 0.0333^2 + 0.0667^2) / 2
    assert out["ms_draw"] == pytest.approx(4 * (2 * (0.1 / 3) ** 2 + (0.2 / 3) ** 2) / 2)
    # residuals: +-e around the window means for runs 0 and 1 (run 2 has none); 8 * 1e-4 over (2 * 3) df
    assert out["ms_window"] == pytest.approx(8e-4 / 6)
    assert out["sigma_draw"] == pytest.approx(((out["ms_draw"] - out["ms_window"]) / 4) ** 0.5)
    assert out["df"] == [2, 6] and out["p"] < 0.001
    # no shift at all: sigma_draw 0, p large
    flat = draw_spread(runs[:2] + [[b + x for b, x in zip(base, e)]])
    assert flat["sigma_draw"] == 0 and flat["p"] > 0.5
    # F's tail: closed form at df1 = 2, (d2 / (d2 + 2 f)) ** (d2 / 2); tabulated 5 % points at other df
    assert f_upper_tail(3.316, 2, 30) == pytest.approx((30 / (30 + 2 * 3.316)) ** 15, rel=1e-9)
    assert f_upper_tail(4.171, 1, 30) == pytest.approx(0.05, abs=2e-4)
    assert f_upper_tail(2.812, 3, 45) == pytest.approx(0.05, abs=2e-4)
    assert f_upper_tail(1.0, 5, 5) == pytest.approx(0.5)
    # a 2x2 main effect weighs four single runs by 1/2: their shifts add sigma_draw^2 in all
    assert with_draws(0.003, [.5, .5, -.5, -.5], 0.004) == pytest.approx(0.005)
    assert draw_spread([base, base])["p"] == 1.0   # identical runs: nothing to test, no shift
    with pytest.raises(ValueError):
        draw_spread([base])


def test_replicated_contrast_counts_the_draws_and_the_windows_as_samples():
    import random

    from qwen_quant.accuracy.paired import contrast, replicated_contrast

    # the effect the same on every draw: the error is one draw's paired stderr over the windows, on n - 1 df
    effect = [0.03, -0.01, 0.02, 0.05, 0.00, 0.01]
    out = replicated_contrast([effect] * 3)
    assert out["mean"] == pytest.approx(sum(effect) / 6)
    assert out["stderr"] == pytest.approx(contrast([effect], [1])[1])
    assert out["df"] == pytest.approx(5) and out["per_draw"] == pytest.approx([sum(effect) / 6] * 3)
    # a draw that moves the effect by a shift shared by its windows adds the shifts' variance / k to the windows'
    moved = [[x + s for x in effect] for s in (-0.02, 0.0, 0.02)]
    wide = replicated_contrast(moved)
    assert wide["mean"] == pytest.approx(out["mean"])
    assert wide["stderr"] ** 2 == pytest.approx(out["stderr"] ** 2 + 0.02 ** 2 / 3)
    assert wide["p"] > out["p"] and 2 < wide["df"] < 5   # Satterthwaite: between the draws' 2 df and the windows' 5
    # on data drawn from the model (draw, window and interaction effects, no effect on average), the stderr's
    # square is unbiased for the grand mean's variance and p < 0.05 about 5 % of the time
    rng = random.Random(0)
    k, n, sd_draw, sd_window, sd_e = 4, 16, 0.008, 0.01, 0.006
    truth = sd_draw ** 2 / k + sd_window ** 2 / n + sd_e ** 2 / (k * n)
    var_estimates, rejected, trials = [], 0, 1500
    for _ in range(trials):
        a = [rng.gauss(0, sd_draw) for _ in range(k)]
        b = [rng.gauss(0, sd_window) for _ in range(n)]
        r = replicated_contrast([[a[j] + b[w] + rng.gauss(0, sd_e) for w in range(n)] for j in range(k)])
        var_estimates.append(r["stderr"] ** 2)
        rejected += r["p"] < 0.05
    assert sum(var_estimates) / trials == pytest.approx(truth, rel=0.1)
    assert 0.02 < rejected / trials < 0.08


def test_spread_ratio_says_which_recipe_moves_less_with_its_draw():
    from qwen_quant.accuracy.paired import draw_spread, f_upper_tail, spread_ratio

    base = [2.0, 3.0, 4.0, 5.0, 4.5]
    e = [0.01, -0.01, 0.02, -0.02, 0.01]
    steady = [[b + s * x for b, x in zip(base, e)] for s in (1, -1, 0.5)]
    moving = [[b + s * x + shift for b, x in zip(base, e)] for s, shift in ((1, 0.0), (-1, 0.1), (0.5, -0.1))]
    out = spread_ratio(steady, moving)
    assert out["f"] == pytest.approx(draw_spread(moving)["ms_draw"] / draw_spread(steady)["ms_draw"])
    assert out["f"] > 100 and out["df"] == [2, 2]
    assert out["p"] == pytest.approx(2 * f_upper_tail(out["f"], 2, 2)) and out["p"] < 0.02
    assert spread_ratio(moving, steady)["p"] == pytest.approx(out["p"])   # two-sided: the same either way round
    assert out["sigma_draw"][0] < out["sigma_draw"][1]


def test_domain_study_factorial_pairs_the_four_cells_per_domain(tmp_path, monkeypatch):
    study = load_script("qwen_coder_domains")
    monkeypatch.setattr(study, "REPORT", tmp_path)
    base = [2.0, 2.2, 1.8, 2.4]
    shift = {"rule-32x512": 0.0, "rule-128x512": 0.01, "rule-32x2048": 0.03, "rule-128x2048": 0.04}
    results = [{"model": row, "task": "ppl-fiction", "details": {"per_window_nll": [x + s for x in base]}}
               for row, s in shift.items()]
    results.append({"model": "rule-32x512", "task": "ppl-fr", "details": {"per_window_nll": base}})  # one cell only
    # two calibration seeds of rule-32x512's recipe: seed 1 shifted by 0.05 on every window, plus a little noise
    wobble = [0.001, -0.001, 0.001, -0.001]
    for row, s in {"amd-32x512": 0.0, "seed1-32x512": 0.05}.items():
        results.append({"model": row, "task": "ppl-fiction",
                        "details": {"per_window_nll": [x + s + (w if s else -w) for x, w in zip(base, wobble)]}})
    # the same two draws with --shrink auto: 0.02 better on seed 0, 0.04 on seed 1
    for row, base_row, s in (("shrink-seed0-32x512", "amd-32x512", -0.02),
                             ("shrink-seed1-32x512", "seed1-32x512", -0.04)):
        nll = next(r["details"]["per_window_nll"] for r in results if r["model"] == base_row)
        results.append({"model": row, "task": "ppl-fiction", "details": {"per_window_nll": [x + s for x in nll]}})
    (tmp_path / "comparison.json").write_text(json.dumps({"results": results}))
    text = study.factorial().read_text()
    out = json.loads((tmp_path / "calibration-factorial.json").read_text())
    effects = {c["contrast"]: c["domains"] for c in out["contrasts"]}
    assert effects["sample length, main effect (mean of the two)"]["ppl-fiction"]["nats"] == pytest.approx(0.03)
    assert effects["samples, main effect (mean of the two)"]["ppl-fiction"]["nats"] == pytest.approx(0.01)
    assert effects["interaction (length's effect at 128 minus at 32)"]["ppl-fiction"]["nats"] == pytest.approx(0)
    assert all("ppl-fr" not in d for d in effects.values())   # French lacks three cells: no contrast there
    assert "| samples 32 -> 128, at 512 tokens |" in text and "Windows per domain: 4." in text
    seeds = out["replicates"][0]
    assert seeds["domains"]["ppl-fiction"]["rows"] == ["amd-32x512", "seed1-32x512"]
    assert seeds["domains"]["ppl-fiction"]["sigma_draw"] == pytest.approx(0.05 / 2 ** 0.5, rel=0.01)
    # the 2x2 rows are single runs: the seeds' shift widens their contrasts (exactly 0 paired error here)
    main = effects["sample length, main effect (mean of the two)"]["ppl-fiction"]
    assert main["stderr"] == pytest.approx(0) and main["stderr_with_draws"] == pytest.approx(0.05 / 2 ** 0.5, rel=0.01)
    assert effects["another draw of the calibration (seed 0 -> 1; AMD)"]["ppl-fiction"]["nats"] == pytest.approx(0.05)
    assert "## How far one recipe moves between runs" in text
    shrink = out["replicated_changes"][0]["domains"]["ppl-fiction"]
    assert shrink["pairs"] == [["shrink-seed0-32x512", "amd-32x512"], ["shrink-seed1-32x512", "seed1-32x512"]]
    assert shrink["mean"] == pytest.approx(-0.03) and shrink["per_draw"] == pytest.approx([-0.02, -0.04])
    # the windows agree exactly, so the error is the two draws' own: |0.02 - 0.04| / 2
    assert shrink["stderr"] == pytest.approx(0.01) and shrink["df"] == pytest.approx(1)
    assert "## A change averaged over calibration draws" in text and "per draw -0.0200, -0.0400" in text
    # the draws' means differ by 0.05 without the change and by 0.03 with it: spread F = (0.05 / 0.03)^2
    assert shrink["spread_ratio"]["f"] == pytest.approx((0.05 / 0.03) ** 2) and shrink["spread_ratio"]["df"] == [1, 1]


@pytest.mark.parametrize("task,metric", [("humaneval", "pass@1"), ("arc-challenge", "accuracy")])
def test_domain_study_benchmark_table_pairs_rows_by_item_and_averages_a_change_over_draws(tmp_path, monkeypatch,
                                                                                          task, metric):
    study = load_script("qwen_coder_domains")
    monkeypatch.setitem(study.BENCHMARKS, task, study.BENCHMARKS[task]._replace(folder=tmp_path))
    env = {"cpu": "test cpu", "cpu_count": 2, "date": "2026-12-07T00:00:00+00:00", "commit": "0" * 40,
           "command": "qwen-eval ..."}
    n = 20
    solved = {"amd-32x512": set(range(10)), "prose-seed0-32x512": set(range(2, 10)) | {15},   # lost 0, 1; gained 15
              "seed1-32x512": set(range(12)), "prose-seed1-32x512": set(range(12)) - {11}}     # lost 11
    for row, ok in solved.items():
        per_item = "".join("1" if i in ok else "0" for i in range(n))
        norm = [{"task": task, "metric": "accuracy_norm", "value": 0.0, "stderr": 1.0, "n": n,
                 "details": {"per_item": "0" * n}}] if task == "arc-challenge" else []   # not the table's score
        (tmp_path / f"{row}.json").write_text(json.dumps({"env": env, "results": norm + [
            {"task": task, "metric": metric, "value": 100 * len(ok) / n, "stderr": 1.0, "n": n,
             "details": {"per_item": per_item}}]}))
    text = study.benchmark_table(task).read_text()
    out = json.loads((tmp_path / "table.json").read_text())
    seed0 = next(c for c in out["contrasts"] if c["rows"] == ["prose-seed0-32x512", "amd-32x512"])
    assert (seed0["gained"], seed0["lost"]) == (1, 2) and seed0["points"] == pytest.approx(-5.0)
    assert seed0["sign_p"] == pytest.approx(1.0)   # 1 against 2: as even as three coins get
    prose = next(c for c in out["replicated_changes"] if c["pairs"][0] == ["prose-seed0-32x512", "amd-32x512"])
    assert prose["per_draw"] == [-5.0, -5.0] and prose["points"] == pytest.approx(-5.0)
    seeds = next(sp for sp in out["replicates"] if sp["rows"] == ["amd-32x512", "seed1-32x512"])
    assert seeds[metric] == [50.0, 60.0] and f"| contrast | Δ {metric} (points) |" in text
    assert "| amd-32x512 | 50.0 ± 1.0 | test cpu | 2026-12-07 |" in text and "## A change averaged" in text


def test_sign_test_is_the_exact_binomial_tail():
    from math import comb

    from qwen_quant.accuracy.paired import sign_test

    assert sign_test(8, 19) == pytest.approx(2 * sum(comb(27, i) for i in range(9)) / 2 ** 27)
    assert sign_test(19, 8) == sign_test(8, 19) and 0.05 < sign_test(8, 19) < 0.053
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0 and sign_test(0, 10) == pytest.approx(2 / 1024)


def test_diagnosis_spectrum_counts_the_directions_a_damping_overrides_and_each_texts_energy_there():
    diagnosis = load_script("qwen_coder_diagnosis")
    h = torch.diag(torch.tensor([1.0, 2.0, 3.0, 94.0]))   # mean diagonal 25
    weak = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])   # energy 1 + 4 in the two weakest directions
    strong = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    mixed = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    out = diagnosis.energy_below(h, {"weak": weak, "strong": strong, "mixed": mixed}, [0.1, 0.01])
    assert out["diag_max_over_mean"] == pytest.approx(94 / 25, abs=0.05)
    assert out["top_eigenvalue_share"] == pytest.approx(0.94, abs=1e-3)
    at = out["damps"]["0.1"]   # damping 2.5: eigenvalues 1 and 2 are below it
    assert at["directions"] == pytest.approx(0.5) and at["calibration_energy"] == pytest.approx(0.03, abs=1e-4)
    assert at["held_out_energy"] == pytest.approx({"weak": 1.0, "strong": 0.0, "mixed": 0.5})
    low = out["damps"]["0.01"]   # damping 0.25: nothing below it
    assert low["directions"] == 0 and low["held_out_energy"]["weak"] == 0
