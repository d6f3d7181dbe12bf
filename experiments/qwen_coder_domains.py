#!/usr/bin/env python
"""Which GPTQ settings hold up out of domain: Qwen2.5-Coder-1.5B-Instruct, Int4 g128, perplexity on five
held-out domains, every quantized row against fp and round-to-nearest on the same windows.

Rows are qwen-quantize settings (ROWS); columns are qwen-eval perplexity tasks (DOMAINS), 16 windows of
512 tokens per domain (--windows), fp and every checkpoint in bfloat16. The verdict per domain is the loss ratio
(ppl - ppl_fp) / (ppl_rtn - ppl_fp) with its paired standard error over the windows (below 1: the
row loses less than RTN; the goal is <= 0.7 on every domain). Calibration corpora never overlap
the evaluation text: wiki and People's Daily are split by a fixed rule (calib / eval), the code
corpus (MBPP, 17 languages) is not HumanEval, and French and fiction are in no calibration corpus.

Each step only calls our CLIs (qwen-quantize, qwen-eval) and is resumable: a finished checkpoint is
skipped, a stopped one continues with --resume, qwen-eval's item store keeps every scored window.

    python experiments/qwen_coder_domains.py quantize defaults-16x512 plain-16x512   # one thread each
    python experiments/qwen_coder_domains.py eval fp rtn defaults-16x512
    python experiments/qwen_coder_domains.py render      # reports/qwen2.5-coder-1.5b-domains/ (qwen-report --compare)
    python experiments/qwen_coder_domains.py eval fp rtn rule-32x512 rule-32x2048 --long   # 2048-token windows
    python experiments/qwen_coder_domains.py render --long   # reports/qwen2.5-coder-1.5b-domains/windows-2048/
    python experiments/qwen_coder_domains.py factorial [--long]   # more calibration samples or longer ones?
    python experiments/qwen_coder_domains.py humaneval amd-32x512 prose-seed0-32x512   # code generation, not ppl
    python experiments/qwen_coder_domains.py arc prose-seed1-32x512 prose-spanish-seed1-32x512   # ARC-Challenge
Checkpoints and evaluation outputs go to $QWEN_QUANT_WORK (default ~/.cache/qwen_quant/qwen-coder-study);
the rendered table, the JSON it was made from (every row's per-window losses) and each step's seconds
(steps.jsonl) go to reports/. The work folder does not outlive a session's machine: `render` keeps the
committed table's rows (qwen-report --keep) and replaces those evaluated again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # offline_qwen, beside this script
from offline_qwen import fp_folder, study_dir  # noqa: E402
REPORT = ROOT / "reports" / "qwen2.5-coder-1.5b-domains"
HUMANEVAL = REPORT / "humaneval"   # per-row qwen-eval results (every problem's pass) and the table made from them
STEPS = REPORT / "steps.jsonl"  # seconds and load of every quantize / eval step, appended by _run
DOMAINS = ("ppl-wiki", "ppl-zh", "ppl-code", "ppl-fr", "ppl-fiction")
EVAL_ARGS = ["--seqlen", "512", "--dtype", "bf16", "--batch", "8", "--quiet"]
# windows per domain: 16 for the study's screening rows (a ratio's paired error ~0.05-0.08), more for the rows
# the accuracy table keeps (qwen-eval's item store adds only the new windows)
WINDOWS = 16
SMALL = ["--nsamples", "16", "--seqlen", "512"]  # what a CPU user can afford
PLAIN = ["--no-desc-act", "--no-static-groups", "--no-mse"]
BROAD = ["--calib", "wiki+peoples-daily+code+chat"]  # the default mix until 2026-12-07 (prose joined it then)
SPANISH = ["--calib", "wiki+peoples-daily+code+chat+wiki-es"]  # the four-source default mix and Spanish Wikipedia
PROSE = ["--calib", "wiki+peoples-daily+code+chat+prose"]  # the four and CoQA's passages: the default since 2026-12-07
# prose inside English's quarter, code's quarter kept: on two pairs the five-source mix lost HumanEval as code went
# from a quarter of the samples to a fifth (DIAGNOSIS.md section 15); does prose pay for fiction at half the dose?
PROSE_SHARED = ["--calib", "wiki+peoples-daily*2+code*2+chat*2+prose"]
PROSE_SPANISH = ["--calib", "wiki+peoples-daily+code+chat+prose+wiki-es"]  # the default mix now and Spanish Wikipedia
# the default five sources with English Wikipedia on two shares: 11, 6, 5, 5, 5 samples of 32 (7, 7, 6, 6, 6 without):
# English is the one calibrated domain short of 0.7x on every mix; is it short of its own text?
PROSE_WIKI_TWICE = ["--calib", "wiki*2+peoples-daily+code+chat+prose"]
# the settings this study changed, pinned to their values before it, so that every row says what it ran
BEFORE = ["--calib", "wiki+peoples-daily", "--damp-auto", "0"]
FIXED_DAMP = ["--damp-auto", "0"]
# --long: the question 512-token windows cannot answer, whether calibration in 2048-token samples (the default)
# costs text read in 2048-token windows (qwen-eval's default) too: the held-out domains only (English is wiki's
# eval split), 2048 tokens a window, batch 2 (a batch's logits are ~1.2 GB a row in float32)
LONG = 2048
LONG_DOMAINS = ("ppl-wiki", "ppl-fr", "ppl-fiction")
LONG_EVAL_ARGS = ["--seqlen", str(LONG), "--dtype", "bf16", "--batch", "2", "--quiet"]
LONG_REPORT = REPORT / f"windows-{LONG}"
# rows made before --rtn-massive became a default (2026-12-06): the flag that reproduces them today
NO_RULE = ["--rtn-massive", "0"]
# rows made while the range search was a default (until 2026-12-06, the second default change that day)
WITH_MSE = ["--mse"]
# rows made while --rtn-massive waited for thin calibration (--rtn-massive-thin, a default until 2026-12-06 late):
# the same at 16 x 512 (the rule fires there either way), not at 32 x 512 or 128 x 2048
WAIT = ["--rtn-massive-thin"]

# name -> (what the row is, qwen-quantize arguments beyond the model and --out)
ROWS = {
    "fp": ("the GGUF's Q4_K_M weights dequantized (the reference)", None),
    "rtn": ("round-to-nearest, min-max scales (the baseline; no calibration, so the accuracy table's rtn checkpoint "
            "is the same weights and may stand in)", ["--method", "rtn", "--no-mse", "--nsamples", "4",
                                                                "--seqlen", "512"]),
    "rtn-mse": ("round-to-nearest with the range search",
                ["--method", "rtn", "--nsamples", "4", "--seqlen", "512"] + WITH_MSE),
    "defaults-16x512": ("defaults before this study: act-order + static groups + range search, damp 0.01, "
                        "wiki + People's Daily", SMALL + BEFORE + NO_RULE + WITH_MSE),
    "plain-16x512": ("plain GPTQ: no act-order, no range search", SMALL + BEFORE + PLAIN + NO_RULE),
    "defaults-damp0.1-16x512": ("defaults, damp 0.1", SMALL + BEFORE + ["--damp", "0.1"] + NO_RULE + WITH_MSE),
    "plain-damp0.1-16x512": ("plain GPTQ, damp 0.1", SMALL + BEFORE + PLAIN + ["--damp", "0.1"] + NO_RULE),
    "broad-16x512": ("defaults, broad calibration mix", SMALL + BROAD + FIXED_DAMP + NO_RULE + WITH_MSE),
    "broad-damp0.1-16x512": ("defaults, broad mix, damp 0.1",
                             SMALL + BROAD + FIXED_DAMP + ["--damp", "0.1"] + NO_RULE + WITH_MSE),
    "broad-plain-damp0.1-16x512": ("plain GPTQ, broad mix, damp 0.1",
                                   SMALL + BROAD + FIXED_DAMP + PLAIN + ["--damp", "0.1"] + NO_RULE),
    "broad-auto-16x512": ("the defaults after this study's first round: act-order + static groups + range search, "
                          "damping raised where calibration is thin (--damp-auto 0.5), English + Chinese + code + chat "
                          "(the accuracy table's gptq row until 2026-12-06, before --rtn-massive)",
                          SMALL + BROAD + ["--damp-auto", "0.5"] + NO_RULE + WITH_MSE),
    "lmhead-16x512": ("the defaults (broad-auto-16x512's settings) with --lm-head: the output head quantized too",
                      SMALL + ["--lm-head"] + NO_RULE + WITH_MSE),
    "defaults-64x512": ("the defaults (broad-auto-16x512's settings) on 4x the calibration: 64 x 512 tokens, "
                        "more than every layer's inputs (damp-auto then gives down_proj 0.14, the rest 0.02)",
                        ["--nsamples", "64", "--seqlen", "512"] + NO_RULE + WITH_MSE),
    "gptaq-16x512": ("the defaults (broad-auto-16x512's settings) with asymmetric calibration (GPTAQ, --gptaq 0.25, "
                     "the GPTAQ authors' value): each layer fit to the fp model's outputs",
                     SMALL + ["--gptaq", "0.25"] + NO_RULE + WITH_MSE),
    "gptaq-refit-16x512": ("gptaq-16x512 with the scales refit by least squares once GPTQ has fixed the codes "
                           "(--refit-scales; on the demo model each helped, and with asym the pair did most)",
                           SMALL + ["--gptaq", "0.25", "--refit-scales"] + NO_RULE + WITH_MSE),
    "massive-rtn-16x512": ("the defaults (broad-auto-16x512's settings) with the linears whose inputs carry massive "
                           "activations rounded to nearest (--rtn-massive 3.5: a sample's peak token norm over its "
                           "median above 3.5; DIAGNOSIS.md sections 3-4)", SMALL + ["--rtn-massive", "3.5"] + WITH_MSE),
    "massive3-rtn-16x512": ("massive-rtn-16x512 at the ratio 3.0: its calibration stream put layer 27's down_proj at "
                            "3.49, just under 3.5 (the next linear: 2.60). The defaults at 16 x 512 "
                            "until the range search went off; the accuracy table's gptq row until then",
                            SMALL + ["--rtn-massive", "3.0"] + WAIT + WITH_MSE),
    "massive-rtn-64x512": ("massive-rtn-16x512 on 4x the calibration (64 x 512 tokens, as defaults-64x512, more "
                           "tokens than down_proj's inputs): does the rule still pay where GPTQ's Hessian has full "
                           "rank? (run before --rtn-massive-thin existed, as the flag below now asks)",
                           ["--nsamples", "64", "--seqlen", "512", "--rtn-massive", "3.5", "--no-rtn-massive-thin"]
                           + WITH_MSE),
    "gptaq-massive-16x512": ("massive3-rtn-16x512's settings with asymmetric calibration "
                             "(--gptaq 0.25): do the two levers add up?", SMALL + ["--gptaq", "0.25"] + WAIT + WITH_MSE),
    "nomse-16x512": ("massive3-rtn-16x512's settings with min-max scales (--no-mse): does the range search, chosen "
                     "on weight error alone, cost out of domain? (it did, on every domain: qwen-quantize's defaults "
                     "at 16 x 512 since; its checkpoint is the accuracy table's gptq row)", SMALL + ["--no-mse"] + WAIT),
    "nomse-shrinkauto-16x512": ("the defaults now (nomse-16x512's settings) with every Hessian shrunk toward its "
                                "diagonal by its own Ledoit-Wolf intensity (--shrink auto: how much the 16 calibration "
                                "samples' Hessians disagree; 0.03-0.53 by layer, DIAGNOSIS.md section 5)",
                                SMALL + ["--no-mse", "--shrink", "auto"] + WAIT),
    "spanish-16x512": ("the defaults now with Spanish Wikipedia as a fifth calibration source (--calib "
                       "wiki+peoples-daily+code+chat+wiki-es): French, still held out, is GPTQ's worst layer-level "
                       "domain (DIAGNOSIS.md, section 5); does a related language in the calibration carry over?",
                       SMALL + ["--no-mse"] + WAIT + SPANISH),
    "spanish-shrinkauto-16x512": ("spanish-16x512 with --shrink auto: the two rows nearest the 0.7x goal (French "
                                  "from Spanish, fiction from the shrinkage): do they add up?",
                                  SMALL + ["--no-mse", "--shrink", "auto"] + WAIT + SPANISH),
    "spanish-32x512": ("spanish-16x512 on twice the calibration (32 x 512 tokens, more than every layer's inputs: "
                       "--rtn-massive-thin then stops firing and --damp-auto gives down_proj 0.27): does the Spanish "
                       "mix still hold up at a second size, where the thin-calibration rules fade?",
                       ["--nsamples", "32", "--seqlen", "512", "--no-mse"] + WAIT + SPANISH),
    "spanish-rule-32x512": ("spanish-32x512 with the massive-activation rule at any calibration size "
                            "(--no-rtn-massive-thin): spanish-32x512 lost the 16 x 512 row's edge where the rule "
                            "stopped firing; is the rule what fades?",
                            ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin"] + SPANISH),
    "defaults-32x512": ("qwen-quantize's defaults of the day at 32 x 512 tokens (the rule waiting for thin "
                        "calibration, so not firing): spanish-32x512's pair, the same size without Spanish", ["--nsamples", "32", "--seqlen", "512", "--no-mse"] + WAIT),
    "defaults-128x2048": ("qwen-quantize's defaults of 2026-12-06, calibration included (128 x 2048 tokens, the "
                          "literature's setting; --rtn-massive-thin, then a default, never fires there and --damp-auto gives 0.01-0.017): 2 h 05 min "
                          "at two threads on the 2-core Xeon (steps.jsonl: a block took ~3.1 min alone, 7-8 min "
                          "beside a one-thread eval; blocks 0-2 summed X^T X whole, the rest its upper triangle, the "
                          "same float32 sums in another order; resumable: the same command continues it)",
                          ["--no-mse"] + WAIT),
    "rule-128x2048": ("qwen-quantize's defaults now at 128 x 2048 tokens: defaults-128x2048 with the "
                      "massive-activation rule at any calibration size (--no-rtn-massive-thin, the default since "
                      "2026-12-06 late); DIAGNOSIS.md section 6's splice predicted English 0.74, French 0.86, "
                      "fiction 0.95 from defaults-128x2048's 0.83 / 0.98 / 1.04 (the run: English and French as predicted, "
                      "fiction not; DIAGNOSIS.md section 6)",
                      ["--no-mse", "--no-rtn-massive-thin"]),
    "rule-32x512": ("the defaults now at 32 x 512 (defaults-32x512 with the rule at any calibration size): with "
                    "nomse-16x512 and rule-128x2048, what more calibration tokens buy at the defaults",
                    ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin"]),
    "rule-128x512": ("the defaults at 128 x 512 (65,536 tokens, a quarter of 128 x 2048's, at 32 x 512's sample length): "
                     "with rule-32x2048, which of more tokens or longer samples costs fiction at 128 x 2048 "
                     "(4.8 SE worse than rule-32x512). French's best row at the defaults (0.79); fiction 1.3 SE worse "
                     "than at 32 x 512 (calibration-factorial.md, DIAGNOSIS.md section 7)",
                     ["--nsamples", "128", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin"]),
    "rule-32x2048": ("the defaults at 32 x 2048 (rule-128x512's 65,536 tokens in 2048-token samples): against "
                     "rule-128x512, what sample length alone does; against rule-128x2048, what four times the "
                     "tokens does at 2048. Fiction 3.1 SE worse than rule-32x512, 1.3 SE worse than rule-128x512: "
                     "fiction's cost grows with the tokens, the length at most a part (DIAGNOSIS.md section 7)",
                     ["--nsamples", "32", "--seqlen", "2048", "--no-mse", "--no-rtn-massive-thin"]),
    "short-128x128": ("the defaults at 128 x 128: amd-32x512's 16,384 tokens (so its damping and quantize time) in four "
                      "times as many, shorter samples. Section 7's factorial had the shorter samples better at equal "
                      "tokens (128 x 512 against 32 x 2048, fiction 1.3 SE) and more samples better for French: "
                      "does more documents per token carry further out of domain? (AMD; DIAGNOSIS.md section 13)",
                      ["--nsamples", "128", "--seqlen", "128", "--no-mse", "--no-rtn-massive-thin"]),
    # short-128x128 took French from 0.97 to 0.79 x RTN's loss (-0.024 nats, 2.9 SE) and left the rest level: the same
    # on seed 1's draw (paired with seed1-32x512)
    "short-seed1-128x128": ("short-128x128 with --seed 1: its change on a second calibration draw (DIAGNOSIS.md "
                            "section 13)",
                            ["--nsamples", "128", "--seqlen", "128", "--no-mse", "--no-rtn-massive-thin", "--seed",
                             "1"]),
    "amd-32x512": ("rule-32x512 quantized and evaluated again, the same command on the 2-core AMD EPYC (rule-32x512 is "
                   "the Xeon's): what one recipe moves between two machines (other CPU kernels, slightly different "
                   "calibration forwards and sums, GPTQ's rounding decisions cascading from them), and the "
                   "same-machine reference of lowdamp-32x512, mindamp-32x512 and damp32-128x512 (its quantize is "
                   "steps.jsonl's rule-32x512 line on the AMD "
                   "EPYC, the folder renamed after)",
                   ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin"]),
    "lowdamp-32x512": ("rule-32x512 at rule-128x512's damping: --damp-auto 0.125 gives every layer max(0.01, 0.125 x "
                       "inputs / 16,384), the 0.5 x inputs / 65,536 of 128 x 512 (down_proj 0.068, the rest 0.012): "
                       "against amd-32x512 (the same machine), what the damping that fades with more tokens does at "
                       "fixed tokens (DIAGNOSIS.md section 7)",
                       ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--damp-auto",
                        "0.125"]),
    "mindamp-32x512": ("rule-32x512 at rule-128x2048's damping: --damp-auto 0.03125 gives max(0.01, 0.03125 x inputs / "
                       "16,384), the 0.5 x inputs / 262,144 of 128 x 2048 (down_proj 0.017, the rest 0.01): the whole "
                       "fade of --damp-auto from 32 x 512 to 128 x 2048 at 32 x 512's tokens (DIAGNOSIS.md section 7)",
                       ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--damp-auto",
                        "0.03125"]),
    "damp32-128x512": ("rule-128x512 at rule-32x512's damping: --damp-auto 2.0 gives every layer max(0.01, 2.0 x "
                       "inputs / 65,536), the 0.5 x inputs / 16,384 of 32 x 512 (down_proj 0.27, the rest 0.047): "
                       "against amd-32x512 (the same machine), what four times the samples do at fixed damping; "
                       "does 128 x 512 keep its gains on English and French without the fiction it cost? (code 2.3 SE "
                       "better; French better and fiction worse by amounts inside the calibration draw's spread: "
                       "DIAGNOSIS.md section 8)",
                       ["--nsamples", "128", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--damp-auto",
                        "2.0"]),
    # the other side of the damping: lowdamp and mindamp (4x and 16x less) cost English and fiction at 32 x 512; does
    # more damping than the default help held-out text, or does it hand GPTQ's gain back to round-to-nearest?
    # (damping is capped at 0.95 of the mean Hessian diagonal: down_proj reaches the cap in both rows)
    "highdamp-32x512": ("amd-32x512 at 4x its damping: --damp-auto 2.0 gives every layer max(0.01, 2.0 x inputs / "
                        "16,384) (q/k/v, o_proj, gate/up 0.19, down_proj 0.95, the cap): lowdamp-32x512's mirror "
                        "image (DIAGNOSIS.md section 12)",
                        ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--damp-auto",
                         "2.0"]),
    "maxdamp-32x512": ("amd-32x512 at 16x its damping: --damp-auto 8.0 (q/k/v, o_proj, gate/up 0.75, down_proj 0.95, "
                       "the cap): mindamp-32x512's mirror image, GPTQ's compensation nearly gone "
                       "(DIAGNOSIS.md section 12)",
                       ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--damp-auto",
                        "8.0"]),
    # the column order and when each group's scales are set, at today's other defaults (plain-16x512 turned both off
    # at the earlier defaults, damp 0.01, where everything overfit): amd-32x512 with each changed, the same draw
    "noact-32x512": ("amd-32x512 without act-order (--no-desc-act --no-static-groups): columns in their own order, each "
                     "group's scales set from the weights as GPTQ has updated them when it reaches the group, as in "
                     "the GPTQ paper and Qwen's Int4 release (DIAGNOSIS.md section 12)",
                     ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin"] + PLAIN[:2]),
    "dyngroups-32x512": ("amd-32x512 with act-order's groups set as GPTQ reaches them (--no-static-groups, AutoGPTQ's "
                         "desc_act without static groups: g_idx out of order) instead of fixed up front from the "
                         "original weights (DIAGNOSIS.md section 12)",
                         ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                          "--no-static-groups"]),
    # dyngroups-32x512 on the other draws (paired by seed with the seed rows): seed 0 gained 0.024 nats on Chinese
    **{f"dyngroups-seed{k}-32x512": (f"seed{k}-32x512 with --no-static-groups: dyngroups-32x512's change on another "
                                     "calibration draw (DIAGNOSIS.md section 12)",
                                     ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                      "--seed", str(k), "--no-static-groups"]) for k in (1, 2, 3)},
    # other draws of amd-32x512's calibration samples (--seed picks each corpus's samples): with amd-32x512 (seed 0),
    # four draws of one recipe on one machine, the spread between rows that the windows' paired errors leave out
    **{f"seed{k}-32x512": (f"amd-32x512 with --seed {k}: the same recipe on the same machine, another draw of the "
                           "calibration samples (each corpus's windows chosen by torch.randperm(seed)): with amd-32x512 "
                           "and the other seed rows, how far rows move between draws (DIAGNOSIS.md section 8)",
                           ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--seed",
                            str(k)]) for k in (1, 2, 3)},
    # amd-32x512's recipe and its four draws with --shrink auto (each layer's Hessian shrunk toward its diagonal by
    # its own Ledoit-Wolf intensity): paired seed by seed with the rows above, does shrinking help out of domain on
    # average over draws, and does it make a row move less with its draw?
    **{f"shrink-seed{k}-32x512": (f"{'amd-32x512' if k == 0 else f'seed{k}-32x512'} with --shrink auto: with the other "
                                  "shrink-seed rows, --shrink auto's effect averaged over four calibration draws and "
                                  "its own draw spread (DIAGNOSIS.md section 9)",
                                  ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--seed",
                                   str(k), "--shrink", "auto"]) for k in (0, 1, 2, 3)},
    # AWQ's activation-aware channel scales (--awq-scales), folded into the norms and up_proj before GPTQ: one
    # exponent per layer from the calibration instead of a K x K correction; on amd-32x512's draws (paired by seed)
    **{f"awq-seed{k}-32x512": (f"{'amd-32x512' if k == 0 else f'seed{k}-32x512'} with --awq-scales: each layer's input "
                               "channels scaled by mean|x|^alpha / w^(1-alpha) before GPTQ, alpha searched for the "
                               "lowest round-to-nearest output error (DIAGNOSIS.md section 10)",
                               ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin", "--seed",
                                str(k), "--awq-scales"]) for k in (0, 1, 2, 3)},
    # the same with the search's objective free of each sample's massive tokens (--awq-drop-massive 3: those whose
    # norm is over 3 x their sample's median, the attention sinks of the massive down_proj layers, which the search
    # fitted on the calibration and not held out: DIAGNOSIS.md section 10's layer-by-layer table)
    **{f"awqsink-seed{k}-32x512": (f"awq-seed{k}-32x512 with --awq-drop-massive 3: the scale search leaves out the "
                                   "tokens over 3 x their sample's median input norm (DIAGNOSIS.md section 11)",
                                   ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                    "--seed", str(k), "--awq-scales", "--awq-drop-massive", "3"]) for k in (0, 1, 2, 3)},
    # act-order by whole groups (--act-group-aware, GPTQModel's act_group_aware): each group's scales set as GPTQ
    # reaches it, as --no-static-groups does (Chinese -0.021 nats over two draws), with g_idx kept in order
    **{f"gar-seed{k}-32x512": (f"{'amd-32x512' if k == 0 else f'seed{k}-32x512'} with --act-group-aware: groups "
                               "quantized in order of their largest Hessian diagonal, inputs within a group by "
                               "decreasing diagonal, each group's scales set when GPTQ reaches it; g_idx in order "
                               "(DIAGNOSIS.md section 13)",
                               ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                "--seed", str(k), "--act-group-aware"]) for k in (0, 1, 2, 3)},
    # GPTQ's codes kept, each group's scale refit by least squares to the layer's own objective (--refit-scales,
    # gptq.refit_scales): 12 numbers per row of 1,536 inputs, so a low-capacity fit that should carry out of domain
    **{f"refit-seed{k}-32x512": (f"{'amd-32x512' if k == 0 else f'seed{k}-32x512'} with --refit-scales: once GPTQ has "
                                 "fixed the codes, every group's scale refit by least squares to the layer's output "
                                 "error on the calibration (DIAGNOSIS.md section 13)",
                                 ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                  "--seed", str(k), "--refit-scales"]) for k in (0, 1, 2, 3)},
    # a broader English mix: CoQA's passages (children's stories, reading-exam passages, CNN news, Wikipedia, Gutenberg
    # literature) as a fifth source beside the default four, the same 32 x 512 tokens (so the same damping), paired
    # by seed with the seed rows; French stays held out, fiction's genre (not its text) is now in the calibration
    **{f"prose-seed{k}-32x512": (f"{'amd-32x512' if k == 0 else f'seed{k}-32x512'} with CoQA's English passages as a "
                                 "fifth calibration source (--calib wiki+peoples-daily+code+chat+prose: 7, 7, 6, 6, 6 "
                                 "samples): English prose in the genres the Wikipedia summaries leave out "
                                 "(DIAGNOSIS.md section 14)",
                                 ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                  "--seed", str(k)] + PROSE) for k in (0, 1, 2, 3)},
    # prose without taking code's share: Wikipedia and prose split English's quarter, the other three keep theirs
    # (4, 8, 8, 8, 4 samples); seed k draws the same first windows as seed{k}-32x512 and prose-seed{k}-32x512
    **{f"prose-shared-seed{k}-32x512": (f"{'amd-32x512' if k == 0 else f'seed{k}-32x512'} with CoQA's passages in "
                                        "half of English's quarter (--calib wiki+peoples-daily*2+code*2+chat*2+prose: "
                                        "4, 8, 8, 8, 4 samples): prose for fiction without cutting code's share "
                                        "(DIAGNOSIS.md section 16)",
                                        ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                         "--seed", str(k)] + PROSE_SHARED) for k in (0, 1, 2, 3)},
    # the default mix now and Spanish Wikipedia: Spanish took French from 0.90 to 0.72x RTN's loss on the four-source
    # mix (16 x 512) and cost code; does it still pay beside prose, and what does it cost code now?
    **{f"prose-spanish-seed{k}-32x512": (f"prose-seed{k}-32x512 with Spanish Wikipedia as a sixth calibration source "
                                         "(--calib wiki+peoples-daily+code+chat+prose+wiki-es: 6, 6, 5, 5, 5, 5 "
                                         "samples): the nearest language to French that the packages have, French "
                                         "itself still held out (proposed in DIAGNOSIS.md section 15, measured in "
                                         "section 17)",
                                         ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                          "--seed", str(k)] + PROSE_SPANISH) for k in range(4)},
    # the seed-0 pair of section 17 made again from the same commands on the Xeon (the rows above were made on the AMD
    # EPYC): their ARC-Challenge pair, and how far one recipe moves between the two machines (as amd-32x512 did)
    "prose-xeon-seed0-32x512": ("prose-seed0-32x512's command, quantized again on the Intel Xeon: the same recipe and "
                                "draw on a second machine (DIAGNOSIS.md section 20)",
                                ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                 "--seed", "0"] + PROSE),
    "prose-spanish-xeon-seed0-32x512": ("prose-spanish-seed0-32x512's command, quantized again on the Intel Xeon "
                                        "(DIAGNOSIS.md section 20)",
                                        ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                         "--seed", "0"] + PROSE_SPANISH),
    # English given more of its own text, on the five sources the defaults kept (section 18): each corpus's samples are
    # the first n of one seeded permutation, so seed k's 11 Wikipedia samples are prose-seed{k}'s 7 and 4 more, and the
    # other four sources keep all but their last one
    **{f"prose-wiki2-seed{k}-32x512": (f"prose-seed{k}-32x512 with English Wikipedia on two shares (--calib "
                                       "wiki*2+peoples-daily+code+chat+prose: 11, 6, 5, 5, 5 samples): English, the "
                                       "calibrated domain the 0.7x goal still misses, given more of its own text, on "
                                       "the five sources of the defaults (DIAGNOSIS.md section 19)",
                                       ["--nsamples", "32", "--seqlen", "512", "--no-mse", "--no-rtn-massive-thin",
                                        "--seed", str(k)] + PROSE_WIKI_TWICE) for k in range(4)},
    "awq-rtn-32x512": ("round-to-nearest after --awq-scales (32 x 512 calibration tokens for the scales; AWQ without "
                       "its clipping search): what the scales alone buy over rtn, and what GPTQ adds on top "
                       "(awq-seed0-32x512; DIAGNOSIS.md section 10)",
                       ["--method", "rtn", "--no-mse", "--nsamples", "32", "--seqlen", "512", "--awq-scales"]),
    "awqsink-rtn-32x512": ("awq-rtn-32x512 with --awq-drop-massive 3: round-to-nearest after scales searched without "
                           "the massive tokens; did fitting the sink tokens make awq-rtn worse than RTN? (DIAGNOSIS.md "
                           "section 11)",
                           ["--method", "rtn", "--no-mse", "--nsamples", "32", "--seqlen", "512", "--awq-scales",
                            "--awq-drop-massive", "3"]),
    "shrink-128x2048": ("rule-128x2048 (the defaults, calibration included) with --shrink auto: does section 9's gain "
                        "on held-out text survive at the default calibration, where each layer's intensity is smaller? "
                        "(seed 0; started 2026-12-07, resumable)",
                        ["--no-mse", "--no-rtn-massive-thin", "--shrink", "auto"]),
    "prose-128x2048": ("qwen-quantize's defaults of 2026-12-07 at 128 x 2048 tokens, calibration included: "
                       "rule-128x2048 with CoQA's passages as the mix's fifth source (seed 0), the row that says "
                       "whether the prose gain at 32 x 512 (fiction 0.82-1.09 -> 0.53-0.64) holds at the default "
                       "calibration, where the four-source mix left fiction at 1.04",
                       ["--no-mse", "--no-rtn-massive-thin"] + PROSE),
    "self-16x512": ("the defaults now at 16 x 512 (nomse-16x512's settings) calibrated on text the model writes "
                    "itself (--calib self: 16 samples sampled from <|endoftext|> at temperature 1, top-p 0.95, bf16; "
                    "self-calibration, Williams et al. 2025): does the model's own distribution hold up out of "
                    "domain better than a mix we picked? (no: level with RTN on every domain, 1.6-5.0 SE worse than "
                    "nomse-16x512)", SMALL + ["--no-mse", "--calib", "self"]),
    "spanish-codefirst-16x512": ("spanish-16x512 with code first in the mix (code 4 samples, the others 3): the "
                                 "Spanish mix took code's fourth sample and code got worse in every pair; this moves "
                                 "one sample from wiki back to code, the rest identical (each corpus's samples are the "
                                 "first n of one seeded permutation; code stayed where it was, English lost 2.3 SE)",
                                 SMALL + ["--no-mse", "--calib", "code+wiki+peoples-daily+chat+wiki-es"]),
    "gptqmodel-16x512": ("GPTQModel 7.6.0 at broad-16x512's settings on the same calibration tokens (act-order, "
                         "static groups, its mse=2.4 range search, damp 0.01: it has no per-layer damping), made by "
                         "experiments/qwen_coder_accuracy.py quantize while our defaults had the range search (that "
                         "checkpoint is gone: the script now makes GPTQModel's at the defaults now, without it, for "
                         "the accuracy table)", None),
}
# The default calibration mix gained `prose` on 2026-12-07 (DIAGNOSIS.md section 14): a row without a --calib of its
# own ran on the four-source mix of its day, pinned here so that its command still makes what it made
ROWS = {name: (what, args if args is None or "--calib" in args else args + BROAD) for name, (what, args) in ROWS.items()}
# rows whose checkpoint is not made by `quantize` here: where they live
MADE_ELSEWHERE = {"gptqmodel-16x512": lambda: study_dir() / "accuracy-ckpt" / "gptqmodel"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _one_thread() -> dict:
    return os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def quantize(names: list[str]) -> None:
    fp = fp_folder()
    for name in names:
        out = study_dir() / "ckpt" / name
        if name in MADE_ELSEWHERE:
            print(f"{name}: made elsewhere ({ROWS[name][0]})")
            continue
        if (out / "quant_report.json").is_file():
            print(f"{name}: done already")
            continue
        state = out.parent / f".{name}.qwen-quant-state"
        cmd = [_bin("qwen-quantize"), str(fp), "--out", str(out), "--quiet", *ROWS[name][1]]
        cmd += ["--resume"] if state.is_dir() else []
        _run(name, "quantize", cmd)


def evaluate(names: list[str], windows: int = WINDOWS, long: bool = False) -> None:
    """qwen-eval of each row on the study's windows of 512 (or with long, the held-out domains in windows of
    LONG tokens, into their own folders)."""
    for name in names:
        model = str(model_path(name))
        domains, args = (LONG_DOMAINS, LONG_EVAL_ARGS) if long else (DOMAINS, EVAL_ARGS)
        _run(name, f"eval {LONG}" if long else "eval",
             [_bin("qwen-eval"), model, "--tasks", ",".join(domains), *args, "--ppl-windows", str(windows),
              "--out", str(eval_dir(long) / name)])


def model_path(name: str) -> Path:
    """A row's model folder: fp's fp32 folder, a checkpoint made here or where MADE_ELSEWHERE says; RTN's may be the
    accuracy table's (experiments/qwen_coder_accuracy.py: the same weights, RTN takes no calibration)."""
    if name == "fp":
        return fp_folder()
    if name in MADE_ELSEWHERE:
        return MADE_ELSEWHERE[name]()
    own = study_dir() / "ckpt" / name
    shared = study_dir() / "accuracy-ckpt" / "rtn"
    return shared if name == "rtn" and not own.is_dir() and shared.is_dir() else own


def eval_dir(long: bool) -> Path:
    return study_dir() / (f"eval-{LONG}" if long else "eval")


def _run(name: str, step: str, cmd: list[str]) -> None:
    """Run one step in its own process; its seconds and the machine's load go to the study's log (STEPS, in
    reports/: the work folder does not outlive a session, the log of what each step cost should)."""
    from qwen_quant.provenance import cpu_name

    load, t0 = os.getloadavg()[0], time.time()
    rc = subprocess.run(cmd, env=_one_thread()).returncode
    with open(STEPS, "a") as f:
        f.write(json.dumps({"row": name, "step": step, "rc": rc, "seconds": round(time.time() - t0, 1),
                            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                            "threads": _one_thread()["OMP_NUM_THREADS"], "cpu": cpu_name(), "cores": os.cpu_count(),
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                            "command": [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd]})
                + "\n")
    if rc != 0:
        raise SystemExit(f"{name}: {step} failed (exit {rc})")


# ---------------------------------------------------------------- the table

def label(name: str) -> str:
    """The row's label in the table: qwen-eval names a model by its folder (fp_folder() is .../fp32)."""
    return "fp32" if name == "fp" else MADE_ELSEWHERE[name]().name if name in MADE_ELSEWHERE else name


def _compare(long: bool, report: Path, title: str) -> None:
    """qwen-report --compare over every row evaluated here, on top of the committed table (--keep: rows of earlier
    sessions stay, their per-window losses with them, after their work folders are gone), RTN the baseline. With
    nothing evaluated here (a fresh machine) the committed table stands."""
    present = [n for n in ROWS if (eval_dir(long) / n / "results.json").is_file()]
    earlier = report / "comparison.json"
    if not present:
        if not earlier.is_file():
            raise SystemExit(f"no rows evaluated under {eval_dir(long)} and no table at {report}: run `eval` first")
        return
    subprocess.run([_bin("qwen-report"), "--compare", *[str(eval_dir(long) / n) for n in present],
                    *(["--keep", str(earlier)] if earlier.is_file() else []), "--baseline", "rtn",
                    "--out", str(report), "--title", title], check=True)


def render_long() -> Path:
    """The windows-of-LONG table."""
    _compare(True, LONG_REPORT, f"Qwen2.5-Coder-1.5B-Instruct Int4 g128, held-out text in {LONG}-token windows: does "
             "calibration's sample length matter?")
    return LONG_REPORT / "README.md"


def render() -> Path:
    """The study's table (_compare: fp first, RTN the baseline) and the rows' legend."""
    from qwen_quant.files import write_text_atomic

    _compare(False, REPORT, "Qwen2.5-Coder-1.5B-Instruct Int4 g128: which GPTQ settings hold up out of domain")
    earlier = REPORT / "comparison.json"
    shown = [m["label"] for m in json.loads(earlier.read_text())["models"]]
    legend = ["# The rows of the domain study", "", "Each row is a `qwen-quantize` run of the offline Qwen's fp32 folder "
              "(experiments/qwen_coder_domains.py); its checkpoint's quant_report.json (under the study's work folder) "
              "records everything it did. fp is labelled by its folder name, `fp32`.", ""]
    legend += [f"- `{n}`: {what}" + (f" — `{' '.join(['qwen-quantize', 'MODEL', *args])}`" if args is not None else "")
               for n, (what, args) in ROWS.items() if label(n) in shown]
    if STEPS.is_file():
        legend += ["", "Seconds of each step on a 2-core machine, one torch thread per step unless the line says "
                   "otherwise (load: the 1-minute load average before and after; other steps ran beside it; each "
                   "line's machine in steps.jsonl; a stopped step was continued with --resume by the row's next "
                   "line):", ""]
        for line in STEPS.read_text().splitlines():
            r = json.loads(line)
            legend.append(f"- {r['row']} {r['step']}: {r['seconds']} s"
                          + (f" at {r['threads']} threads" if str(r.get("threads", "1")) != "1" else "")
                          + (f", stopped (exit {r['rc']})" if r.get("rc", 0) != 0 else "")
                          + f", load {r['load_before']} -> {r['load_after']}, {r['date']}")
    write_text_atomic(REPORT / "ROWS.md", "\n".join(legend) + "\n")
    return REPORT / "README.md"


# ---------------------------------------------------------------- calibration size against sample length

# the 2x2 design at the defaults now, 32 or 128 samples of 512 or 2048 tokens, one recipe on two machines, and rows
# with the damping --damp-auto gives other token counts; what each contrast estimates, and its weights on the rows'
# mean per-window NLL
R32_512, R128_512, R32_2048, R128_2048 = "rule-32x512", "rule-128x512", "rule-32x2048", "rule-128x2048"
AMD = "amd-32x512"  # rule-32x512's recipe, quantized and evaluated on the other machine
CONTRASTS = [
    ("sample length 512 -> 2048, at 32 samples", {R32_2048: 1, R32_512: -1}),
    ("sample length 512 -> 2048, at 128 samples", {R128_2048: 1, R128_512: -1}),
    ("samples 32 -> 128, at 512 tokens", {R128_512: 1, R32_512: -1}),
    ("samples 32 -> 128, at 2048 tokens", {R128_2048: 1, R32_2048: -1}),
    # equal tokens (65,536), so equal --damp-auto: the one contrast of the four rows where only the samples' shape differs
    ("128 x 512 -> 32 x 2048 (the same tokens, longer samples)", {R32_2048: 1, R128_512: -1}),
    ("32 x 512 -> 128 x 2048 (the default calibration: 16x the tokens)", {R128_2048: 1, R32_512: -1}),
    ("sample length, main effect (mean of the two)", {R32_2048: .5, R128_2048: .5, R32_512: -.5, R128_512: -.5}),
    ("samples, main effect (mean of the two)", {R128_512: .5, R128_2048: .5, R32_512: -.5, R32_2048: -.5}),
    ("interaction (length's effect at 128 minus at 32)", {R128_2048: 1, R128_512: -1, R32_2048: -1, R32_512: 1}),
    # one recipe quantized and evaluated on two machines: the spread the rows' paired errors leave out
    ("the same recipe on another machine (rule-32x512, Xeon -> AMD)", {AMD: 1, R32_512: -1}),
    ("the same recipe on another machine (prose-seed0-32x512, AMD -> Xeon)", {"prose-xeon-seed0-32x512": 1,
                                                                              "prose-seed0-32x512": -1}),
    ("the same recipe on another machine (prose-spanish-seed0-32x512, AMD -> Xeon)",
     {"prose-spanish-xeon-seed0-32x512": 1, "prose-spanish-seed0-32x512": -1}),
    # the damping that fades with the tokens, apart from the tokens: rows made on the AMD machine, against its own 32 x 512
    ("32 x 512, damping of 128 x 512 (down_proj 0.27 -> 0.068; AMD)", {"lowdamp-32x512": 1, AMD: -1}),
    ("32 x 512, damping of 128 x 2048 (down_proj 0.27 -> 0.017; AMD)", {"mindamp-32x512": 1, AMD: -1}),
    ("4x the samples at 32 x 512's damping (AMD)", {"damp32-128x512": 1, AMD: -1}),
    ("32 x 512, 4x the damping (--damp-auto 2.0; AMD)", {"highdamp-32x512": 1, AMD: -1}),
    ("32 x 512, 16x the damping (--damp-auto 8.0; AMD)", {"maxdamp-32x512": 1, AMD: -1}),
    ("32 x 512, act-order off (AMD)", {"noact-32x512": 1, AMD: -1}),
    ("32 x 512, act-order's group scales set as GPTQ reaches them, not up front (AMD)", {"dyngroups-32x512": 1, AMD: -1}),
    # another draw of the calibration samples, the recipe and the machine the same
    ("another draw of the calibration (seed 0 -> 1; AMD)", {"seed1-32x512": 1, AMD: -1}),
    ("another draw of the calibration (seed 0 -> 2; AMD)", {"seed2-32x512": 1, AMD: -1}),
    ("another draw of the calibration (seed 0 -> 3; AMD)", {"seed3-32x512": 1, AMD: -1}),
    # AWQ's channel scales before GPTQ, and before round-to-nearest (the rtn row: no calibration, so any machine's)
    ("--awq-scales at 32 x 512 (seed 0; AMD)", {"awq-seed0-32x512": 1, AMD: -1}),
    ("--refit-scales at 32 x 512 (seed 0; AMD)", {"refit-seed0-32x512": 1, AMD: -1}),
    ("--act-group-aware at 32 x 512 (seed 0; AMD)", {"gar-seed0-32x512": 1, AMD: -1}),
    ("32 x 512 -> 128 x 128 (the same tokens in shorter samples; AMD)", {"short-128x128": 1, AMD: -1}),
    ("+ prose (CoQA's passages) in the calibration mix at 32 x 512 (seed 0; AMD)", {"prose-seed0-32x512": 1, AMD: -1}),
    ("+ prose (CoQA's passages) in the calibration mix at 32 x 512 (seed 1; AMD)", {"prose-seed1-32x512": 1,
                                                                                   "seed1-32x512": -1}),
    ("prose in half of English's share, code's kept, at 32 x 512 (seed 0; AMD)", {"prose-shared-seed0-32x512": 1,
                                                                                 AMD: -1}),
    ("prose as a fifth source -> in half of English's share (seed 0; AMD)", {"prose-shared-seed0-32x512": 1,
                                                                           "prose-seed0-32x512": -1}),
    ("+ Spanish Wikipedia as a sixth source, beside prose (seed 0; AMD)", {"prose-spanish-seed0-32x512": 1,
                                                                          "prose-seed0-32x512": -1}),
    ("+ Spanish Wikipedia as a sixth source, beside prose (seed 1; AMD)", {"prose-spanish-seed1-32x512": 1,
                                                                          "prose-seed1-32x512": -1}),
    ("+ Spanish Wikipedia as a sixth source, beside prose (seed 0; Xeon)", {"prose-spanish-xeon-seed0-32x512": 1,
                                                                           "prose-xeon-seed0-32x512": -1}),
    ("five sources -> English Wikipedia on two shares (seed 0; Xeon)", {"prose-wiki2-seed0-32x512": 1,
                                                                        "prose-xeon-seed0-32x512": -1}),
    *[(f"five sources -> English Wikipedia on two shares (seed {k}; AMD -> Xeon)",
       {f"prose-wiki2-seed{k}-32x512": 1, f"prose-seed{k}-32x512": -1}) for k in range(4)],
    # the default calibration size with prose: rule-128x2048 was quantized on the Xeon, prose-128x2048 on the AMD, so
    # this contrast carries the machine too (the same recipe moved by up to 0.011 nats between them at 32 x 512, French)
    ("+ prose in the calibration mix at 128 x 2048 (seed 0; Xeon -> AMD)", {"prose-128x2048": 1, R128_2048: -1}),
    ("32 x 512 -> 128 x 2048 with prose in the mix (seed 0; AMD)", {"prose-128x2048": 1, "prose-seed0-32x512": -1}),
    ("--no-static-groups -> --act-group-aware at 32 x 512 (seed 0; AMD)", {"gar-seed0-32x512": 1,
                                                                            "dyngroups-32x512": -1}),
    ("round-to-nearest -> --awq-scales then round-to-nearest (AMD)", {"awq-rtn-32x512": 1, "rtn": -1}),
    ("--awq-scales without the massive tokens at 32 x 512 (seed 0; AMD)", {"awqsink-seed0-32x512": 1, AMD: -1}),
    ("--awq-scales -> the same without the massive tokens (seed 0; AMD)",
     {"awqsink-seed0-32x512": 1, "awq-seed0-32x512": -1}),
    ("round-to-nearest -> --awq-scales --awq-drop-massive 3 then round-to-nearest (AMD)",
     {"awqsink-rtn-32x512": 1, "rtn": -1}),
    ("--awq-scales then round-to-nearest -> the same without the massive tokens (AMD)",
     {"awqsink-rtn-32x512": 1, "awq-rtn-32x512": -1}),
]
# runs of one recipe: how far its rows move between runs beyond the windows' noise (accuracy.paired.draw_spread). The
# seeds' spread widens every contrast above (with_draws): each row in them is a single run of its recipe.
SEEDS = [AMD, "seed1-32x512", "seed2-32x512", "seed3-32x512"]
SHRINK_SEEDS = [f"shrink-seed{k}-32x512" for k in range(4)]   # the same four draws with --shrink auto
AWQ_SEEDS = [f"awq-seed{k}-32x512" for k in range(4)]   # ... and with --awq-scales (the draws measured so far)
AWQSINK_SEEDS = [f"awqsink-seed{k}-32x512" for k in range(4)]   # ... and with it, without the massive tokens
DYNGROUPS_SEEDS = ["dyngroups-32x512"] + [f"dyngroups-seed{k}-32x512" for k in (1, 2, 3)]   # ... and --no-static-groups
REFIT_SEEDS = [f"refit-seed{k}-32x512" for k in range(4)]   # ... and --refit-scales
GAR_SEEDS = [f"gar-seed{k}-32x512" for k in range(4)]   # ... and --act-group-aware
SHORT_SEEDS = ["short-128x128", "short-seed1-128x128"]   # the same tokens as 128 samples of 128 (seeds 0 and 1)
PROSE_SEEDS = [f"prose-seed{k}-32x512" for k in range(4)]   # ... and CoQA's passages as a fifth calibration source
PROSE_SHARED_SEEDS = [f"prose-shared-seed{k}-32x512" for k in range(4)]   # ... with prose in half of English's share
PROSE_SPANISH_SEEDS = [f"prose-spanish-seed{k}-32x512" for k in range(4)]   # ... and Spanish Wikipedia as a sixth
PROSE_WIKI2_SEEDS = [f"prose-wiki2-seed{k}-32x512" for k in range(4)]   # the five sources, Wikipedia on two shares
REPLICATES = [("rule-32x512's recipe, calibration seeds 0-3 (AMD)", SEEDS),
              ("rule-32x512's recipe on two machines (Xeon, AMD; seed 0)", [R32_512, AMD]),
              ("prose-seed0-32x512's recipe on two machines (AMD, Xeon)", ["prose-seed0-32x512",
                                                                           "prose-xeon-seed0-32x512"]),
              ("prose-spanish-seed0-32x512's recipe on two machines (AMD, Xeon)",
               ["prose-spanish-seed0-32x512", "prose-spanish-xeon-seed0-32x512"]),
              ("rule-32x512's recipe with --shrink auto, seeds 0-3 (AMD)", SHRINK_SEEDS),
              ("rule-32x512's recipe with --awq-scales, the seeds measured (AMD)", AWQ_SEEDS),
              ("the same with --awq-drop-massive 3, the seeds measured (AMD)", AWQSINK_SEEDS),
              ("rule-32x512's recipe with --no-static-groups, the seeds measured (AMD)", DYNGROUPS_SEEDS),
              ("rule-32x512's recipe with --refit-scales, the seeds measured (AMD)", REFIT_SEEDS),
              ("rule-32x512's recipe with --act-group-aware, the seeds measured (AMD)", GAR_SEEDS),
              ("the defaults at 128 x 128, the seeds measured (AMD)", SHORT_SEEDS),
              ("rule-32x512's recipe with the prose source in the mix, the seeds measured (AMD)", PROSE_SEEDS),
              ("rule-32x512's recipe with the prose source in the mix, seed 0 made again on the Xeon, seeds 1-3 on "
               "the AMD", ["prose-xeon-seed0-32x512", *PROSE_SEEDS[1:]]),
              ("rule-32x512's recipe with prose in half of English's share, the seeds measured (AMD)",
               PROSE_SHARED_SEEDS),
              ("the same with Spanish Wikipedia as a sixth source, the seeds measured (AMD)", PROSE_SPANISH_SEEDS),
              ("the five-source mix with English Wikipedia on two shares, the seeds measured (Xeon)",
               PROSE_WIKI2_SEEDS)]
# a change made on several draws, each draw with and without it (rows paired by seed): its effect averaged over the
# draws, with the draws and the windows both counted as samples (accuracy.paired.replicated_contrast)
REPLICATED_CHANGES = [("--shrink auto at 32 x 512, over seeds 0-3 (AMD)", SHRINK_SEEDS, SEEDS),
                      ("--awq-scales at 32 x 512, over the seeds measured (AMD)", AWQ_SEEDS, SEEDS),
                      ("--awq-scales --awq-drop-massive 3 at 32 x 512, over the seeds measured (AMD)", AWQSINK_SEEDS,
                       SEEDS),
                      ("--awq-scales -> without the massive tokens, over the seeds measured (AMD)", AWQSINK_SEEDS,
                       AWQ_SEEDS),
                      ("--no-static-groups at 32 x 512, over the seeds measured (AMD)", DYNGROUPS_SEEDS, SEEDS),
                      ("--refit-scales at 32 x 512, over the seeds measured (AMD)", REFIT_SEEDS, SEEDS),
                      ("--act-group-aware at 32 x 512, over the seeds measured (AMD)", GAR_SEEDS, SEEDS),
                      ("--no-static-groups -> --act-group-aware, over the seeds measured (AMD)", GAR_SEEDS,
                       DYNGROUPS_SEEDS),
                      ("32 x 512 -> 128 x 128 (the same tokens), over the seeds measured (AMD)", SHORT_SEEDS,
                       SEEDS[:2]),
                      ("the four-source mix -> + prose (CoQA's passages) at 32 x 512, over the seeds measured (AMD)",
                       PROSE_SEEDS, SEEDS),
                      ("the four-source mix -> prose in half of English's share, over the seeds measured (AMD)",
                       PROSE_SHARED_SEEDS, SEEDS),
                      ("prose as a fifth source -> in half of English's share, over the seeds measured (AMD)",
                       PROSE_SHARED_SEEDS, PROSE_SEEDS),
                      ("the five-source mix -> + Spanish Wikipedia at 32 x 512, over the seeds measured (AMD)",
                       PROSE_SPANISH_SEEDS, PROSE_SEEDS),
                      ("the four-source mix -> + prose and Spanish Wikipedia (six sources), over the seeds measured "
                       "(AMD)", PROSE_SPANISH_SEEDS, SEEDS),
                      # seed 0's pair made again on the Xeon in place of the AMD's (the ARC-Challenge pairs: seed 0
                      # was scored on the Xeon's checkpoints, seed 1 on the AMD's)
                      ("the five-source mix -> + Spanish Wikipedia, seed 0 on the Xeon, seeds 1-3 on the AMD",
                       ["prose-spanish-xeon-seed0-32x512", *PROSE_SPANISH_SEEDS[1:]],
                       ["prose-xeon-seed0-32x512", *PROSE_SEEDS[1:]]),
                      # the rows with the change were quantized on the Xeon, those without it on the AMD EPYC: one
                      # recipe moved by up to 0.08x RTN's loss between the two (rule-32x512, amd-32x512), a change
                      # of each draw's rounding rather than a shift of every draw alike, so the draws' spread counts it
                      ("the five sources -> English Wikipedia on two shares, over the seeds measured (AMD -> Xeon)",
                       PROSE_WIKI2_SEEDS, PROSE_SEEDS)]


def _p_value(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def _domain_table(title: str, intro: str, domains: list[str], entries: list[tuple[str, dict]], cell,
                  label: str) -> list[str]:
    """A factorial section: one row per (name, {domain: cell}) entry, one column per domain ("—" where the entry
    has no cell), each cell written by `cell`."""
    lines = ["", f"## {title}", "", intro, "", f"| {label} | " + " | ".join(domains) + " |",
             "|---|" + "---:|" * len(domains)]
    for name, cells in entries:
        lines.append(f"| {name} | " + " | ".join("—" if cells.get(d) is None else cell(cells[d]) for d in domains)
                     + " |")
    return lines


def factorial(long: bool = False) -> Path:
    """The paired contrasts of the calibration rows (CONTRASTS) on each domain, from the committed table's per-window
    losses: what longer calibration samples and what more of them do to held-out text, in nats per token (the
    per-window contrast's mean and stderr; positive: worse), and how far one recipe moves between runs (REPLICATES):
    each contrast's stderr is given again widened by the seeds' run-to-run spread. Writes
    calibration-factorial.{md,json} beside the table; a contrast or replicate set whose rows are not all evaluated
    is left out."""
    from qwen_quant.accuracy.paired import contrast, draw_spread, replicated_contrast, spread_ratio, with_draws
    from qwen_quant.files import write_text_atomic

    report = LONG_REPORT if long else REPORT
    if not (report / "comparison.json").is_file():
        raise SystemExit(f"no table at {report}: run `render{' --long' if long else ''}` first")
    table = json.loads((report / "comparison.json").read_text())
    nlls = {(r["model"], r["task"]): r["details"]["per_window_nll"] for r in table["results"]
            if r.get("details", {}).get("per_window_nll")}
    domains = LONG_DOMAINS if long else DOMAINS
    spreads = []
    for what, runs in REPLICATES:
        per_domain = {}
        for d in domains:
            present = [r for r in runs if (r, d) in nlls]
            if len(present) >= 2:
                out = draw_spread([nlls[r, d] for r in present])
                per_domain[d] = {"rows": present, **{k: (round(v, 6) if isinstance(v, float) else v)
                                                     for k, v in out.items()}}
        if per_domain:
            spreads.append({"replicates": what, "domains": per_domain})
    seeds = next((sp["domains"] for sp in spreads if sp["replicates"] == REPLICATES[0][0]), {})  # what widens
    rows = []
    for what, weights in CONTRASTS:
        per_domain = {}
        for d in domains:
            if all((row, d) in nlls for row in weights):
                mean, se = contrast([nlls[row, d] for row in weights], list(weights.values()))
                cell = {"nats": round(mean, 5), "stderr": round(se, 5), "n": len(nlls[next(iter(weights)), d])}
                if d in seeds and not set(weights) <= set(SEEDS):   # the seed pairs are the draws themselves
                    cell["stderr_with_draws"] = round(with_draws(se, list(weights.values()), seeds[d]["sigma_draw"]), 5)
                per_domain[d] = cell
        if per_domain:
            rows.append({"contrast": what, "weights": weights, "domains": per_domain})
    changes = []
    for what, with_rows, without_rows in REPLICATED_CHANGES:
        per_domain = {}
        for d in domains:
            pairs = [(a, b) for a, b in zip(with_rows, without_rows) if (a, d) in nlls and (b, d) in nlls]
            if len(pairs) >= 2:
                out = replicated_contrast([[x - y for x, y in zip(nlls[a, d], nlls[b, d])] for a, b in pairs])
                ratio = spread_ratio([nlls[a, d] for a, _ in pairs], [nlls[b, d] for _, b in pairs])
                per_domain[d] = {"pairs": pairs, **{k: (round(v, 6) if isinstance(v, float) else v)
                                                    for k, v in out.items() if k != "per_draw"},
                                 "per_draw": [round(v, 5) for v in out["per_draw"]],
                                 "spread_ratio": {k: (round(v, 6) if isinstance(v, float) else v)
                                                  for k, v in ratio.items()}}
        if per_domain:
            changes.append({"change": what, "domains": per_domain})
    window = LONG if long else 512
    head = [f"# Calibration: more samples, longer ones, less damping, or a shrunk Hessian? (held-out text in {window}-"
            "token windows)",
            "", "Paired contrasts of the four `rule-*` rows (the defaults now at 32 or 128 samples of 512 or 2048 "
            "tokens), of one recipe on two machines and on other draws of its calibration samples (`--seed`), and of "
            "rows with the damping `--damp-auto` gives other token counts (ROWS.md), in nats per token of mean "
            "per-window NLL: positive means the change costs that domain. Each stderr is the per-window contrast's "
            "(the evaluation windows' noise); where the seed rows are evaluated, \"with draws\" widens it by their "
            "run-to-run shift (the table below, measured at 32 x 512, where a draw weighs most: at 128 samples it "
            "should move less), which every row here has once; 32 x 512's samples at seed 0 are the first 32 of 128 x "
            "512's, so those rows share part of a draw. Written by "
            f"`experiments/qwen_coder_domains.py factorial{' --long' if long else ''}` from comparison.json.", "",
            "| contrast | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]

    def cell_text(c):
        if c is None:
            return "—"
        text = f"{c['nats']:+.4f} ± {c['stderr']:.4f}"
        if c["stderr"] > 0:
            text += f" ({c['nats'] / c['stderr']:+.1f} SE"
            text += f"; {c['nats'] / c['stderr_with_draws']:+.1f} with draws)" if "stderr_with_draws" in c else ")"
        return text
    for r in rows:
        head.append(f"| {r['contrast']} | " + " | ".join(cell_text(r["domains"].get(d)) for d in domains) + " |")
    n = {c["n"] for r in rows for c in r["domains"].values()}
    head += ["", f"Windows per domain: {', '.join(map(str, sorted(n)))}."]
    if spreads:
        head += _domain_table(
            "How far one recipe moves between runs",
            "Runs of one recipe on the same windows, a two-way analysis of variance (runs x windows; "
            "`accuracy.paired.draw_spread`): sigma_draw is the shift a run shares across every window, which a "
            "paired stderr cannot see (0 where the runs differ no more than the windows' noise predicts); F tests "
            "it against the run x window noise (sigma_window, per window), p its upper tail.",
            domains, [(sp["replicates"], sp["domains"]) for sp in spreads],
            lambda c: f"sigma_draw {c['sigma_draw']:.4f} (F {c['f']:.2f}, p {_p_value(c['p'])}; "
                      f"sigma_window {c['sigma_window']:.4f}; {c['runs']} runs)", label="runs")
    if changes:
        head += _domain_table(
            "A change averaged over calibration draws",
            "Each draw (seed) made with and without the change, the rows paired by seed; the per-window contrast "
            "(with minus without, nats per token) averaged over draws and windows, its stderr counting both as "
            "samples (two-way random effects, Satterthwaite's df; `accuracy.paired.replicated_contrast`). "
            "Per draw: each seed's own contrast, in seed order. Spread: whether the draw moves the rows less "
            "with the change, F = ms_draw without / ms_draw with (`accuracy.paired.spread_ratio`; above 1: less), "
            "two-sided p.",
            domains, [(ch["change"], ch["domains"]) for ch in changes],
            lambda c: f"{c['mean']:+.4f} ± {c['stderr']:.4f} (t {c['t']:+.1f} on {c['df']:.1f} df, "
                      f"p {_p_value(c['p'])}; per draw " + ", ".join(f"{v:+.4f}" for v in c["per_draw"])
                      + f"; spread F {c['spread_ratio']['f']:.2f}, p {_p_value(c['spread_ratio']['p'])})",
            label="change")
    write_text_atomic(report / "calibration-factorial.json", json.dumps(
        {"window": window, "contrasts": rows, "replicates": spreads, "replicated_changes": changes},
        indent=1) + "\n")
    write_text_atomic(report / "calibration-factorial.md", "\n".join(head) + "\n")
    return report / "calibration-factorial.md"


# ---------------------------------------------------------------- benchmarks: HumanEval, ARC-Challenge

class Benchmark(NamedTuple):
    """A benchmark the study scores its rows on, beside perplexity: which qwen-eval task, how many items, where its
    per-row results and table live, and the words its table uses."""
    task: str
    folder: Path     # per-row qwen-eval results (every item's right/wrong) and the table made from them
    work: str        # the per-row qwen-eval output folder under study_dir()
    limit: int | None
    metric: str      # the table's name for the score (also table.json's key for each draw's scores)
    items: str       # what an item is called
    intro: str


BENCHMARKS = {
    "humaneval": Benchmark("humaneval", HUMANEVAL, "he", None, "pass@1", "problems",
                           "# HumanEval pass@1 of the domain study's rows\n\nGreedy decoding, every one of the 164 "
                           "problems, each checkpoint in bfloat16 (`qwen-eval --tasks humaneval`). The mixes are judged "
                           "on code generation as well as on held-out code's perplexity (the ppl-code column of the "
                           "study), which need not agree; a single draw of a recipe says little here (DIAGNOSIS.md "
                           "sections 15-17). Written by `experiments/qwen_coder_domains.py humaneval` from the JSON "
                           "beside it."),
    # the accuracy table's six-source row lost ARC-Challenge points that its perplexity did not foretell (DIAGNOSIS.md
    # section 18): the mixes are judged on a reasoning benchmark too, paired by calibration draw
    "arc-challenge": Benchmark("arc-challenge", REPORT / "arc-challenge", "arc", 600, "accuracy", "questions",
                               "# ARC-Challenge accuracy of the domain study's rows\n\nZero-shot, the first 600 of the "
                               "1,172 test questions (qwen-eval's order), chosen by log-likelihood, each checkpoint in "
                               "bfloat16 (`qwen-eval --tasks arc-challenge --limit 600`). Written by "
                               "`experiments/qwen_coder_domains.py arc` from the JSON beside it (DIAGNOSIS.md section "
                               "18)."),
}


def benchmark(task: str, names: list[str]) -> Path:
    """The benchmark's score for each row's checkpoint, then the table of every row measured so far: perplexity on
    held-out code did not predict code generation (DIAGNOSIS.md section 15), nor perplexity ARC-Challenge (section
    18), so the mixes are judged on both. Each row's qwen-eval results.json (its per-item right/wrong and
    provenance) is copied to the benchmark's folder as ROW.json: the work folder does not outlive the session, the
    table is rebuilt from these."""
    from qwen_quant.files import write_text_atomic

    bench = BENCHMARKS[task]
    bench.folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        out = study_dir() / bench.work / name
        if not (out / "results.json").is_file():
            _run(name, task, [_bin("qwen-eval"), str(model_path(name)), "--tasks", task, "--dtype", "bf16",
                              "--batch", "8", "--quiet", "--out", str(out),
                              *(["--limit", str(bench.limit)] if bench.limit else [])])
        write_text_atomic(bench.folder / f"{name}.json", (out / "results.json").read_text())
    return benchmark_table(task)


def _benchmark_rows(bench: Benchmark) -> dict[str, dict]:
    rows = {}
    for name in ROWS:
        path = bench.folder / f"{name}.json"
        if path.is_file():
            d = json.loads(path.read_text())
            rows[name] = next(r for r in d["results"] if (r["task"], r["metric"]) == (bench.task, bench.metric)
                              ) | {"env": d["env"]}
    return rows


def benchmark_table(task: str) -> Path:
    """README.md and table.json in the benchmark's folder: each row's score, the contrasts (CONTRASTS) whose rows are
    measured, paired over the items (gained / lost: items one row gets right and the other not, with the exact sign
    test), and the changes made on several calibration draws (REPLICATED_CHANGES), averaged over the draws with an
    error that counts the draws and the items as samples (accuracy.paired.replicated_contrast, on per-item
    differences)."""
    from qwen_quant.accuracy.multiple_choice import paired_delta
    from qwen_quant.accuracy.paired import draw_spread, replicated_contrast, sign_test
    from qwen_quant.accuracy.tables import item_changes
    from qwen_quant.files import write_text_atomic

    bench = BENCHMARKS[task]
    metric, items = bench.metric, bench.items
    rows = _benchmark_rows(bench)
    passes = {name: [int(c) for c in r["details"]["per_item"]] for name, r in rows.items()}
    lines = [*bench.intro.split("\n"), "", f"| row | {metric} (%) | machine | date |", "|---|---:|---|---|"]
    lines += [f"| {n} | {r['value']:.1f} ± {r['stderr']:.1f} | {r['env']['cpu']} | {r['env']['date'][:10]} |"
              for n, r in rows.items()]
    contrasts = []
    for what, weights in CONTRASTS:
        if len(weights) != 2 or not all(n in passes for n in weights):
            continue
        (a, wa), (b, _) = sorted(weights.items(), key=lambda kv: -kv[1])   # a: the +1 row
        delta, err = paired_delta("".join(map(str, passes[b])), "".join(map(str, passes[a])))
        gained, lost, _ = item_changes(rows[a], rows[b])
        contrasts.append({"contrast": what, "rows": [a, b], "points": round(delta, 2), "stderr": round(err, 2),
                          "gained": gained, "lost": lost, "sign_p": round(sign_test(gained, lost), 4)})
    if contrasts:
        lines += ["", f"## Contrasts (single runs, paired over the {items})", "",
                  f"| contrast | Δ {metric} (points) | gained / lost | sign test p |", "|---|---:|---:|---:|"]
        lines += [f"| {c['contrast']} | {c['points']:+.1f} ± {c['stderr']:.1f} | {c['gained']} / {c['lost']} | "
                  f"{_p_value(c['sign_p'])} |" for c in contrasts]
    spreads = []
    for what, runs in REPLICATES:
        present = [n for n in runs if n in passes]
        if len(present) >= 2:
            out = draw_spread([passes[n] for n in present])
            spreads.append({"replicates": what, "rows": present, metric: [round(rows[n]["value"], 1) for n in present],
                            "sigma_draw": round(100 * out["sigma_draw"], 2), "f": round(out["f"], 3),
                            "p": round(out["p"], 4)})
    if spreads:
        lines += ["", "## How far one recipe moves between calibration draws", "",
                  f"{metric} of each draw, and the shift a draw gives every item beyond the {items}' own noise "
                  f"(`accuracy.paired.draw_spread` on the per-item scores: sigma_draw in points; F and p test it).",
                  "", f"| recipe | {metric} per draw | sigma_draw (points) | F | p |", "|---|---|---:|---:|---:|"]
        lines += [f"| {sp['replicates']} | {', '.join(f'{v:.1f}' for v in sp[metric])} | {sp['sigma_draw']:.1f} | "
                  f"{sp['f']:.2f} | {_p_value(sp['p'])} |" for sp in spreads]
    changes = []
    for what, with_rows, without_rows in REPLICATED_CHANGES:
        pairs = [(a, b) for a, b in zip(with_rows, without_rows) if a in passes and b in passes]
        if len(pairs) >= 2:
            out = replicated_contrast([[x - y for x, y in zip(passes[a], passes[b])] for a, b in pairs])
            changes.append({"change": what, "pairs": pairs, "points": round(100 * out["mean"], 2),
                            "stderr": round(100 * out["stderr"], 2), "t": round(out["t"], 2), "df": round(out["df"], 1),
                            "p": round(out["p"], 4), "per_draw": [round(100 * v, 1) for v in out["per_draw"]]})
    if changes:
        lines += ["", "## A change averaged over calibration draws", "",
                  f"Each draw (seed) quantized with and without the change; the per-item difference (with minus "
                  f"without) averaged over the draws and the {items}, its error counting both as samples (two-way "
                  "random effects, Satterthwaite's df). Per draw: each seed's own Δ, in seed order.", "",
                  f"| change | Δ {metric} (points) | t (df) | p | per draw |", "|---|---:|---:|---:|---|"]
        lines += [f"| {c['change']} | {c['points']:+.1f} ± {c['stderr']:.1f} | {c['t']:+.1f} ({c['df']:.1f}) | "
                  f"{_p_value(c['p'])} | {', '.join(f'{v:+.1f}' for v in c['per_draw'])} |" for c in changes]
    lines += ["", "## Runs", ""] + [f"- {n}: commit {r['env']['commit'][:10]}, {r['env']['date']}, {r['env']['cpu']} "
                                    f"({r['env']['cpu_count']} cores), `{r['env']['command']}`" for n, r in rows.items()]
    write_text_atomic(bench.folder / "table.json", json.dumps(
        {"rows": {n: {metric: r["value"], "stderr": r["stderr"], "n": r["n"]} for n, r in rows.items()},
         "contrasts": contrasts, "replicates": spreads, "replicated_changes": changes}, indent=1) + "\n")
    write_text_atomic(bench.folder / "README.md", "\n".join(lines) + "\n")
    return bench.folder / "README.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["quantize", "eval", "render", "factorial", "humaneval", "arc"])
    p.add_argument("rows", nargs="*", help=f"rows ({', '.join(ROWS)})")
    p.add_argument("--windows", type=int, default=WINDOWS, help=f"eval: windows per domain (default {WINDOWS})")
    p.add_argument("--long", action="store_true", help=f"eval / render / factorial: the held-out domains in {LONG}-token windows "
                   f"({', '.join(LONG_DOMAINS)})")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.step == "quantize":
        quantize([r for r in args.rows if r != "fp"])
    elif args.step == "eval":
        evaluate(args.rows, args.windows, args.long)
    elif args.step == "factorial":
        print(f"wrote {factorial(args.long)}")
    elif args.step in ("humaneval", "arc"):
        print(f"wrote {benchmark('arc-challenge' if args.step == 'arc' else 'humaneval', args.rows)}")
    else:
        print(f"wrote {render_long() if args.long else render()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
