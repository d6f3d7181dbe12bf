#!/usr/bin/env python
"""Parts of the GPU user-path session (scripts/gpu_user_path.sh) that are not a CLI call.

    python scripts/gpu_user_path.py backends CKPT OUT.json [--device cuda]
        load_quantized(CKPT) with each backend (auto, cuda, triton, torch): the greedy tokens of a fixed prompt
        must agree across backends, the logits with the torch backend's within tolerance (fp16 rounding).
    python scripts/gpu_user_path.py render OUT_DIR [--report reports/gpu-user-path-<gpu>-<date>.md]
        the report from what the session wrote: quantize timing and memory, backends, profile, eval.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

BACKENDS = ("auto", "cuda", "triton", "torch")
NEW_TOKENS = 32


def backends(ckpt: str, out: str, device: str) -> int:
    import torch

    from qwen_quant.kernels.backends import backend_available
    from qwen_quant.kernels.loader import load_quantized
    from qwen_quant.provenance import collect_env

    ids = torch.tensor([[100 + 37 * i % 5000 for i in range(16)]], device=device)
    rows, logits, tokens = {}, {}, {}
    for name in BACKENDS:
        if name != "auto" and not backend_available(name)[0]:
            rows[name] = {"status": "unavailable", "why": backend_available(name)[1]}
            continue
        t0 = time.perf_counter()
        try:
            # on a CPU (the dry run) float32: bf16's near-ties would part correct backends' greedy tokens
            model = load_quantized(ckpt, backend=name, device=device,
                                   dtype=torch.float32 if device == "cpu" else None)
            with torch.no_grad():
                logits[name] = model(input_ids=ids).logits[0, -1].float().cpu()
                seq = ids
                for _ in range(NEW_TOKENS):  # greedy, the plain way: no engine in between
                    nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                    seq = torch.cat([seq, nxt], dim=1)
            tokens[name] = seq[0, ids.shape[1]:].tolist()
            used = sorted({getattr(m, "backend", None) for m in model.modules() if type(m).__name__ == "QuantLinear"}
                          - {None})
            rows[name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2), "backend_used": used}
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        except Exception as exc:
            rows[name] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    ref = logits.get("torch")
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        row["tokens_agree_with_torch"] = tokens[name] == tokens.get("torch")
        if ref is not None:
            diff = (logits[name] - ref).abs().max().item()
            row["max_logit_diff_vs_torch"] = diff
            row["logits_within_tolerance"] = diff <= 0.02 * ref.abs().max().item()  # fp16 activations through blocks
    report = {"checkpoint": ckpt, "device": device, "prompt_ids": ids[0].tolist(), "new_tokens": NEW_TOKENS,
              "tokens": tokens, "backends": rows, "env": collect_env(sys.argv)}
    Path(out).write_text(json.dumps(report, indent=1))
    bad = [n for n, r in rows.items() if r["status"] == "error" or r.get("tokens_agree_with_torch") is False
           or r.get("logits_within_tolerance") is False]
    print(f"backends: {json.dumps({n: r['status'] for n, r in rows.items()})}; disagreeing: {bad or 'none'}")
    return 1 if bad else 0


def _block_seconds(log: Path) -> list[float]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [float(s) for s in re.findall(r"block +\d+: mean rel\. error [0-9.]+, worst .*?, ([0-9.]+) s", text)]


def render(out_dir: str, report_path: str | None) -> Path:
    """The session's report, from the files it wrote (numbers come from them, none typed here)."""
    from qwen_quant.files import write_text_atomic

    out = Path(out_dir)
    lines = ["# The user's path on a GPU: qwen-quantize → load_quantized → qwen-profile / qwen-eval", ""]
    steps = (out / "steps.txt").read_text().strip() if (out / "steps.txt").is_file() else "(no steps.txt)"
    for method in ("gptq", "rtn"):
        secs = _block_seconds(out / f"quantize-{method}.log")
        rep = out / method / "quant_report.json"
        done = rep.is_file()
        q = json.loads(rep.read_text()) if done else {}
        n_blocks = q.get("model", {}).get("blocks") or None
        lines += [f"## qwen-quantize --method {method}", ""]
        if secs:
            mean = sum(secs) / len(secs)
            lines.append(f"- {len(secs)} blocks finished, {mean:.1f} s per block (min {min(secs):.1f}, max {max(secs):.1f})"
                         + ("" if done else f"; the run was stopped by its budget: the whole model would take about "
                            f"{mean:.0f} s x its block count (extrapolated, not measured)"))
        if done:
            res = q.get("resources") or {}
            lines.append(f"- whole run {q['totals']['seconds']:.0f} s; peak GPU memory allocated "
                         f"{res.get('peak_gpu_allocated_gib')} GiB, reserved {res.get('peak_gpu_reserved_gib')} GiB; "
                         f"peak host RSS {res.get('peak_host_rss_gib')} GiB; calibration "
                         f"{q['calibration'].get('nsamples')} x {q['calibration'].get('seqlen')}")
        lines.append("")
    nvml = out / "nvml.csv"
    if nvml.is_file():
        used = [int(x.split(",")[1]) for x in nvml.read_text().splitlines() if x.count(",") == 1 and x.split(",")[1].strip().isdigit()]
        if used:
            lines += [f"NVML: the largest per-process GPU memory sampled during the session: {max(used) / 1024:.2f} GiB.", ""]
    bk = out / "backends.json"
    if bk.is_file():
        b = json.loads(bk.read_text())
        lines += ["## load_quantized on every backend", "", "| backend | status | kernels used | seconds | greedy tokens = torch's | max logit diff vs torch |",
                  "|---|---|---|---|---|---|"]
        for name, r in b["backends"].items():
            lines.append(f"| {name} | {r['status']} | {', '.join(r.get('backend_used') or []) or '—'} | {r.get('seconds', '—')} | "
                         f"{r.get('tokens_agree_with_torch', '—')} | {r.get('max_logit_diff_vs_torch', '—')} |")
        lines.append("")
    for sub, title in (("profile", "qwen-profile on the checkpoint"), ("eval", "qwen-eval on the GPU (a path check: random weights)")):
        md = out / sub / ("speed.md" if sub == "profile" else "results.md")
        lines += [f"## {title}", "", md.read_text().split("\n## ")[0] if md.is_file() else "not measured", ""]
    lines += ["## Steps", "", "```", steps, "```", ""]
    env = json.loads(bk.read_text())["env"] if bk.is_file() else {}
    lines.append(f"GPU {env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}, commit {env.get('commit')}, "
                 f"{env.get('date')}. Reproduce: `bash scripts/gpu_check.sh OUT userpath`.")
    gpu = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    path = Path(report_path or f"reports/gpu-user-path-{gpu}-{(env.get('date') or '')[:10]}.md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backends")
    b.add_argument("ckpt"), b.add_argument("out")
    b.add_argument("--device", default="cuda")
    r = sub.add_parser("render")
    r.add_argument("out_dir")
    r.add_argument("--report", default=None)
    args = p.parse_args(argv)
    if args.cmd == "backends":
        return backends(args.ckpt, args.out, args.device)
    print(render(args.out_dir, args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
