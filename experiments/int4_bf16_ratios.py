"""Int4 against BF16 from one qwen-profile run of an fp model and its Int4 checkpoint(s) (issue 22's goals): for
each Int4 model, engine and scenario, tokens/s (decode-only for generate rows, prompt tokens/s for encode rows)
and peak RSS side by side with their ratios to the BF16 row of the same engine and scenario.

    python experiments/int4_bf16_ratios.py RESULTS_JSON
"""

import json
import sys


def main(path: str) -> None:
    cells = [c for c in json.load(open(path))["cells"] if c["status"] == "ok"]
    int4_models = list(dict.fromkeys(c["model"] for c in cells if c["precision"] == "int4"))
    for model in int4_models:
        if len(int4_models) > 1:
            print(f"\nInt4 = {model}\n")
        print("| engine | scenario | BF16 tok/s | Int4 tok/s | Int4 / BF16 | BF16 peak RSS GiB | Int4 peak RSS GiB | Int4 / BF16 |")
        print("|---|---|---|---|---|---|---|---|")
        for b in (c for c in cells if c["precision"] == "bf16"):
            key = (b["engine"], b["scenario"], b["context_tokens"], b["new_tokens"])
            q = next((c for c in cells if c["precision"] == "int4" and c["model"] == model
                      and (c["engine"], c["scenario"], c["context_tokens"], c["new_tokens"]) == key), None)
            if q is None:
                continue
            speed = "decode_tokens_per_s" if b["scenario"] == "generate" else "tokens_per_s"
            n = b["new_tokens"] if b["scenario"] == "generate" else b["context_tokens"]
            print(f"| {b['engine']} | {b['scenario']} {n} | {b[speed]:.2f} | {q[speed]:.2f} | {q[speed] / b[speed]:.2f}x | "
                  f"{b['peak_rss_gib']:.2f} | {q['peak_rss_gib']:.2f} | {q['peak_rss_gib'] / b['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
