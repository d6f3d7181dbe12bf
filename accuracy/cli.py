"""qwen-eval: accuracy of one or more models on the same items, side by side (deltas vs the first)."""

from __future__ import annotations

import argparse
import os

from qwen_quant.cli_util import Parser, quiet_hf_libraries, run_cli
from qwen_quant.errors import UserError


def _lengths(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ppl-lengths takes token counts like 1024,2048,4096, not {text!r}") from None
    if not values or min(values) < 2:
        raise UserError("--ppl-lengths needs positive token counts (at least 2), e.g. 1024,2048")
    return values


def _windows(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--ppl-windows takes a number of windows or 'all', not {text!r}") from None
    if value < 1:
        raise UserError("--ppl-windows must be at least 1 (or 'all')")
    return value


def build_parser() -> argparse.ArgumentParser:
    from qwen_quant.accuracy.tasks import TASKS
    from qwen_quant.accuracy.evaluate import DEFAULT_PPL_WINDOWS, DTYPES

    p = Parser(
        prog="qwen-eval",
        description="Evaluate models on perplexity and benchmarks; several models get exactly the same items.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="HF id, local folder, quantized checkpoint folder, or 'demo' (the first is the reference)")
    p.add_argument("--tasks", required=True,
                   help=f"comma list of: {', '.join(TASKS)} (ceval=FILE / cmmlu=FILE for a local CSV/JSONL, "
                        f"=hf:<id> for the hub)")
    p.add_argument("--limit", type=int, default=None, help="first N items per benchmark (the same items for every model)")
    p.add_argument("--ppl-windows", type=_windows, default=DEFAULT_PPL_WINDOWS,
                   help=f"first N windows of --seqlen tokens for perplexity tasks (default {DEFAULT_PPL_WINDOWS}, "
                        f"whatever --limit says; 'all' = the whole held-out split)")
    p.add_argument("--seqlen", type=int, default=None, help="perplexity window in tokens (default 2048)")
    p.add_argument("--batch", type=int, default=8, help="rows per forward pass when scoring")
    p.add_argument("--out", default=None,
                   help="folder for results.json/.md/.csv and the per-item store (default reports/eval/<first model>-<date>); "
                        "the same command with the same --out resumes a stopped run")
    p.add_argument("--ppl-text", default=None,
                   help="a file for the 'ppl' task: a .txt is scored verbatim, as one text; a .jsonl's \"text\" "
                        "records are documents joined by blank lines")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations of every model: auto (each model's own: an fp model's config dtype; "
                        "Int4 checkpoints bf16 on a CPU, fp16 on a GPU) or one dtype for all, e.g. bf16 to compare "
                        "fp and Int4 in the same precision (fast on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--ppl-lengths", type=_lengths, default=None,
                   help="extra window lengths for a long-context perplexity table, e.g. 1024,2048,4096")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="auto", help="Int4 kernel backend for quantized checkpoints")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code (Qwen v1)")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="score synthetic models too (random weights), to check the evaluation path and its cost on a "
                        "machine: the results are marked so and are not an accuracy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@run_cli
def main(argv=None):
    import sys

    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["QWEN_QUANT_QUIET"] = "1"
    quiet_hf_libraries()
    if args.seqlen is not None and args.seqlen < 2:
        raise UserError("--seqlen must be at least 2 tokens")
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    from qwen_quant.accuracy.evaluate import default_out_dir, evaluate

    out = args.out or default_out_dir(args.models[0])
    report = evaluate(args.models, args.tasks, limit=args.limit, seqlen=args.seqlen, batch=args.batch, out=out,
                      ppl_text=args.ppl_text, ppl_lengths=args.ppl_lengths, device=args.device,
                      backend=args.backend, trust_remote_code=args.trust_remote_code, ppl_windows=args.ppl_windows,
                      dtype=args.dtype, allow_synthetic=args.allow_synthetic,
                      argv=["qwen-eval", *(sys.argv[1:] if argv is None else argv)])
    from qwen_quant.accuracy.tables import accuracy_table

    print(accuracy_table(report), end="")
    print(f"results: {os.path.join(out, 'results.md')} (json, csv beside it)")
    return 0
