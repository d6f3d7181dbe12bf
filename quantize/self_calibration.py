"""Self-calibration: the model writes its own calibration text (`--calib self`).

Williams, Chrysostomou and Aletras, "Self-calibration for language model quantization and pruning" (NAACL 2025):
text the model samples from nothing follows the distribution it was trained on, where a calibration mix follows
the domains someone picked; out of domain is where GPTQ's fit to its calibration costs (reports/qwen2.5-coder-1.5b-
domains/). No corpus is needed, so it works for any model and any language the model knows.

Each sample starts at a document boundary (the model's BOS token, else its EOS; on Qwen2.5 <|endoftext|>, which
separates documents in pretraining) and continues for seqlen - 1 tokens sampled at temperature 1 (the model's own
distribution) within nucleus 0.95 (the tail of a 150k vocabulary is where sampled text degenerates), in batches on
the fast engine, seeded. The paper varies the temperature over the first tokens to diversify the openings; here
every sample draws its opening at temperature 1 from the model's unconditional distribution.

The ids are cached under cache_dir() by the model's identity and every argument, so `--resume` sees the same
calibration without generating it again (the resume state checks the calibration's fingerprint either way).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

import torch

from qwen_quant.errors import UserError
from qwen_quant.files import cache_dir, write_bytes_atomic

TEMPERATURE = 1.0
TOP_P = 0.95
BATCH = 16  # sequences generated together: the KV cache of 16 x 2048 positions stays small even for a 14B model


def start_token(model, tokenizer=None) -> int:
    """The document-boundary token a sample starts from: BOS if the model has one, else EOS."""
    vocab = model.get_input_embeddings().weight.shape[0]
    owners = [o for o in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer)
              if o is not None]
    for key in ("bos_token_id", "eos_token_id"):
        for owner in owners:
            value = getattr(owner, key, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value  # several EOS: the first
            if isinstance(value, int) and 0 <= value < vocab:
                return value
    raise UserError("--calib self needs a BOS or EOS token to start from, and this model's config and tokenizer "
                    "name none: calibrate on a corpus or a file instead (--calib default, --calib my_text.jsonl)")


def generate_samples(model, nsamples: int, seqlen: int, seed: int, start_id: int, temperature: float = TEMPERATURE,
                     top_p: float = TOP_P, batch: int = BATCH, progress=None) -> torch.Tensor:
    """[nsamples, seqlen] token ids: start_id followed by seqlen - 1 sampled tokens, row by row the same for a seed
    on the same machine (sampling draws from torch's generator, seeded here)."""
    from qwen_quant.engine.generate import Generator, Sampling

    if seqlen < 2:
        raise UserError(f"--calib self needs --seqlen of at least 2 (a start token and one sampled), not {seqlen}")
    sampling = Sampling(temperature=temperature, top_p=top_p)
    device = next(model.parameters()).device
    rows = []
    torch.manual_seed(seed)
    for first in range(0, nsamples, batch):
        b = min(batch, nsamples - first)
        generator = Generator(model, max_seq_len=seqlen, batch_size=b)
        prompt = torch.full((b, 1), start_id, dtype=torch.long, device=device)
        out = generator.generate_ids(prompt, seqlen - 1, sampling, progress=progress)
        rows.append(torch.cat([prompt, out.tokens], dim=1).cpu())
        del generator  # its KV cache
    return torch.cat(rows)


def self_calibration(model, tokenizer, model_identity: str, nsamples: int, seqlen: int, seed: int, say=print,
                     bar: bool = True):
    """The Calibration of `--calib self`, generated once per (model, nsamples, seqlen, seed) and then cached."""
    from qwen_quant.quantize.calibration import Calibration, tokenizer_name

    start_id = start_token(model, tokenizer)
    dtype = next(model.parameters()).dtype
    recipe = {"model": model_identity, "dtype": str(dtype).removeprefix("torch."), "nsamples": nsamples,
              "seqlen": seqlen, "seed": seed, "start_token": start_id, "temperature": TEMPERATURE, "top_p": TOP_P,
              "batch": BATCH}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "self-calibration" / f"{key}.pt"
    if path.is_file():
        ids = torch.load(path, weights_only=True)
        say(f"self-calibration: {nsamples} x {seqlen} tokens the model wrote before ({path})")
    else:
        say(f"self-calibration: the model writes {nsamples} x {seqlen} tokens (temperature {TEMPERATURE}, "
            f"top-p {TOP_P}, from token {start_id})")
        from tqdm import tqdm

        with tqdm(total=-(-nsamples // BATCH) * (seqlen - 1), unit="step", desc="self-calibration", leave=False,
                  disable=not bar, file=sys.stderr) as steps:
            ids = generate_samples(model, nsamples, seqlen, seed, start_id, progress=steps)
        buffer = io.BytesIO()
        torch.save(ids, buffer)
        write_bytes_atomic(path, buffer.getvalue())
    description = {"source": "self", "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                   "tokenizer": tokenizer_name(tokenizer) if tokenizer is not None else None,
                   "tokens": int(ids.numel()), "padding_tokens": 0,
                   "generation": recipe | {"method": "self-calibration (Williams et al., NAACL 2025): sampled by the "
                                                     "model from a document-boundary token, on the fast engine",
                                           "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]}}
    return Calibration(ids, torch.ones_like(ids), description)
