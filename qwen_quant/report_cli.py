"""qwen-report: the release report (accuracy, speed, memory tables) or a checkpoint's model card."""

from __future__ import annotations

import argparse

from qwen_quant.cli_util import Parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qwen-report",
        description="Join qwen-eval, qwen-profile and qwen-quantize JSON results into reports/<model>/README.md, "
                    "or write a checkpoint's model card (README.md with Hugging Face front matter).")
    p.add_argument("paths", nargs="*", metavar="DIR",
                   help="folders (searched for results.json / quant_report.json) or those files")
    p.add_argument("--out", default=None, help="report folder (default reports/<model>)")
    p.add_argument("--model-card", metavar="CHECKPOINT", default=None,
                   help="write CHECKPOINT/README.md: its quantization card plus the tables from DIR...")
    p.add_argument("--compare", action="store_true",
                   help="one table from several qwen-eval results (DIR... in order, the first model the reference), "
                        "written to --out/README.md with paired errors on the shared items and, for right/wrong tasks, "
                        "the items gained and lost against the reference with an exact sign test")
    p.add_argument("--baseline", default=None, metavar="LABEL",
                   help="with --compare: every model's perplexity loss as a fraction of this model's (e.g. rtn)")
    p.add_argument("--keep", default=None, metavar="COMPARISON_JSON",
                   help="with --compare: keep the rows of an earlier comparison.json (a table that grows across "
                        "sessions); the tasks that DIR... measure again replace that model's old ones, its other "
                        "tasks stay (a column added later), new models are added at the end; with no DIR, the kept "
                        "table is written again (e.g. under a new --title)")
    p.add_argument("--title", default="Comparison", help="with --compare: the page's title")
    p.add_argument("--seed-tables", action="store_true",
                   help="write the seed's speed and memory tables for Qwen-7B/14B from the qwen-profile results in "
                        "DIR... (default reports/profile/seed-tables.md, or --out) with the seed's A100 rows beside")
    return p


@run_cli
def main(argv=None):
    from qwen_quant.errors import UserError

    args = build_parser().parse_args(argv)
    if args.model_card:
        from qwen_quant.report import write_model_card

        path = write_model_card(args.model_card, args.paths)
        print(f"model card: {path}")
        return 0
    if args.compare:
        from qwen_quant.report import write_comparison

        if not (args.paths or args.keep) or not args.out:
            raise UserError("--compare needs qwen-eval output folders (DIR...) or --keep COMPARISON_JSON, and --out")
        print(f"comparison: {write_comparison(args.paths, args.out, args.baseline, args.title, args.keep)}")
        return 0
    if args.seed_tables:
        from qwen_quant.report import write_seed_tables

        print(f"seed tables: {write_seed_tables(args.paths, args.out)}")
        return 0
    if not args.paths:
        raise UserError("give one or more folders with results.json / quant_report.json (or --model-card CHECKPOINT)")
    from qwen_quant.report import write_report

    print(f"report: {write_report(args.paths, args.out)}")
    return 0
