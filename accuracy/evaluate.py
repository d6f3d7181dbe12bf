"""qwen-eval's API: evaluate one or more models on the same items, side by side.

    evaluate(["demo", "out/demo/gptq-int4"], tasks="ppl-wiki,mmlu", limit=100, out="reports/eval")

returns the results dict ({"env", "models", "tasks", "results"}) and, with `out`, writes
results.json, results.md and results.csv there. Rows are one per (model, task, metric):
model, task, metric, value, stderr, n, details. A metric that could not be measured has value None
and a reason in details (never a zero).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from qwen_quant.errors import UserError
from qwen_quant.accuracy import generation, multiple_choice as mc, perplexity as ppl
from qwen_quant.accuracy.scoring import CachedEncoder
from qwen_quant.accuracy.store import ItemStore, model_fingerprint
from qwen_quant.accuracy.tasks import TaskRequest, load_items, parse_tasks
from qwen_quant.accuracy.tasks import questions as task_questions

DEFAULT_SEQLEN = 2048
# Perplexity windows scored by default: enough for a standard error of a few percent of the value,
# few enough for a CPU (--ppl-windows all: the whole held-out split).
DEFAULT_PPL_WINDOWS = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GSM8K_MAX_NEW = 256
HUMANEVAL_MAX_NEW = 384


@dataclasses.dataclass
class EvalModel:
    """A loaded model with what scoring needs: token ids in and out, special ids, a label."""

    label: str
    model: torch.nn.Module
    tokenizer: object
    description: dict
    device: str = "cpu"

    def encode(self, text: str) -> list[int]:
        from qwen_quant.models.tokenizers import encode_text

        return encode_text(self.tokenizer, text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    @property
    def prefix_token(self) -> int | None:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eos_id

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else (self.eos_id or 0)

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 4096)

    def fingerprint(self) -> str:
        """Same tokenizer <=> same fingerprint (tokenizations are shared between fp and Int4 copies)."""
        probe = "The quick brown fox, 1998年1月 人民日报 -- def f(x): return x**2\n"
        size = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else getattr(self.tokenizer, "name_or_path", "")
        return hashlib.sha256(repr((size, self.encode(probe))).encode()).hexdigest()[:16]


def refuse_synthetic(spec: str, allow: bool = False):
    """The resolved model (models.specs.ModelRef); a synthetic model, or a checkpoint quantized from one, is a
    one-line error (accuracy of random weights means nothing) unless `allow` (a path check)."""
    from qwen_quant.models.specs import resolve

    ref = resolve(spec)
    if ref.synthetic and not allow:
        raise UserError(f"{spec} is a synthetic model (random weights): accuracy means nothing; "
                        f"evaluate a real model (an HF id, a folder, a checkpoint or 'demo')")
    return ref


def _dtype_run(model, requested: str) -> str:
    """The dtype for the item store's key: as asked, or what `auto` resolved to (its meaning has changed
    before: Int4 on the CPU ran fp32 until the CPU backend; results from each must not mix)."""
    if requested != "auto":
        return requested
    return "auto:" + str(next(p.dtype for p in model.parameters() if p.is_floating_point())).replace("torch.", "")


def _backend_run(model, requested: str) -> str:
    """The kernel backend(s) an Int4 model's layers run (e.g. 'cpu'); the request as given for an fp model."""
    plans = sorted({m.backend for m in model.modules() if type(m).__name__ == "QuantLinear"})
    return "+".join(plans) if plans else requested


def load_for_eval(spec, device: str = "cpu", backend: str = "auto", dtype=None,
                  trust_remote_code: bool = False) -> EvalModel:
    """Any real model (a MODEL argument or its ModelRef: fp or a quantized checkpoint, models.load) -> EvalModel."""
    from qwen_quant.models.load import load

    ref = refuse_synthetic(spec) if isinstance(spec, str) else spec
    # inference only: an Int4 model keeps its repacked weights, not the checkpoint's copy beside them
    loaded = load(ref, dtype=dtype, device=device, backend=backend, trust_remote_code=trust_remote_code,
                  keep_checkpoint=False)
    loaded.model.eval()
    return EvalModel(ref.label, loaded.model, loaded.tokenizer, dict(loaded.description), device)


# ---------------------------------------------------------------- task runners

def _row(model: EvalModel, task: str, metric: str, value, stderr, n, details: dict) -> dict:
    return {"model": model.label, "task": task, "metric": metric, "value": value,
            "stderr": stderr, "n": n, "details": details}


def _ppl_tokens(model: EvalModel, texts: list[str], needed: int | None, cache: dict,
                verbatim: bool = False) -> tuple[list[int], int]:
    """Tokens of the concatenated corpus (GPTQ convention: join, tokenize once), only as many
    documents as `needed` tokens take; returns (tokens, documents used). Cached per tokenizer.
    A verbatim text (a user's file) is tokenized whole, exactly as given."""
    key = (model.fingerprint(), hashlib.sha256("\x00".join(texts).encode()).hexdigest(), needed, verbatim)
    if key in cache:
        return cache[key]
    docs = len(texts)
    if verbatim:
        tokens = model.encode("".join(texts))
    elif needed is not None:  # grow the slice until it holds enough tokens (deterministic order)
        docs = 0
        chars_per_token = 2.0
        while True:
            chars, docs = 0, 0
            target = needed * chars_per_token * 1.2
            while docs < len(texts) and chars < target:
                chars += len(texts[docs]) + 2
                docs += 1
            tokens = model.encode("\n\n".join(texts[:docs]))
            if len(tokens) >= needed or docs == len(texts):
                break
            chars_per_token *= 1.5
    else:
        tokens = model.encode("\n\n".join(texts))
    cache[key] = (tokens, docs)
    return tokens, docs


def run_perplexity(model: EvalModel, name: str, corpus, seqlen: int, limit: int | None,
                   lengths: list[int], batch: int, cache: dict, store: ItemStore) -> list[dict]:
    # Every length reads the same tokens: the first `limit` windows of `seqlen` (or the whole text).
    needed = (limit * seqlen) if limit else None
    tokens, docs = _ppl_tokens(model, corpus.texts, needed, cache, corpus.description.get("verbatim", False))
    if not tokens:
        raise UserError(f"the text for {name} is empty: give a file with some text")
    span = tokens[:needed] if needed else tokens
    verbatim = corpus.description.get("verbatim", False)
    base = {"corpus": corpus.description.get("corpus"), "split": corpus.description.get("split"),
            "source": corpus.description, "slice": f"first {docs} of {len(corpus.texts)} documents, "
            f"first {len(span)} tokens", "tokenizer": getattr(model.tokenizer, "name_or_path", None),
            "convention": ("the file verbatim, tokenized once, non-overlapping windows, exp(mean NLL)" if verbatim else
                           "GPTQ: concatenate with blank lines, tokenize once, non-overlapping windows, exp(mean NLL)")}
    rows = []
    for length, metric in [(seqlen, "perplexity")] + [(L, f"perplexity@{L}") for L in lengths]:
        details = dict(base, seqlen=length)
        if length > model.max_length:
            rows.append(_row(model, name, metric, None, None, 0,
                             dict(details, missing=f"beyond the model's context ({model.max_length})")))
            continue
        if len(span) < length:
            rows.append(_row(model, name, metric, None, None, 0,
                             dict(details, missing=f"{len(span)} tokens evaluated, fewer than {length}: "
                                                   f"raise --ppl-windows")))
            continue
        nlls = _window_nlls_resumable(model, f"{name}@{length}", ppl.windows_of(span, length),
                                      max(1, batch * 256 // length), store)
        res = ppl.summarize(nlls, length)
        details.update(windows=res["windows"], tokens=res["tokens"], tokens_scored=res["tokens_scored"],
                       mean_nll=res["mean_nll"], per_window_nll=[round(x, 6) for x in nlls])
        rows.append(_row(model, name, metric, res["value"], res["stderr"], res["n"], details))
    return rows


def _window_nlls_resumable(model: EvalModel, name: str, windows: torch.Tensor, batch: int,
                           store: ItemStore) -> list[float]:
    """Each window's mean NLL; windows an earlier run stored are read back, the rest scored and stored."""
    # a window is known by its position and its tokens: more windows later reuse the ones scored now
    keys = [f"{i}:{hashlib.sha256(w.numpy().tobytes()).hexdigest()[:12]}" for i, w in enumerate(windows)]

    def score(picked):
        return [{"nll": v} for v in ppl.window_nlls(model.model, windows[picked], len(picked), model.device, desc=None)]

    return [r["nll"] for r in store.results({"task": name}, keys, score, batch, f"{model.label} {name}")]


# Questions scored between two writes to the item store: small enough to lose little to a kill.
STORE_CHUNK = 32


def _graded_resumable(model: EvalModel, request: TaskRequest, questions: list[mc.Question], batch: int,
                      encoder: CachedEncoder, store: ItemStore) -> list[mc.Graded]:
    """Every question's choice scores; questions an earlier run stored are read back, the rest scored and stored."""
    from qwen_quant.accuracy.scoring import Score

    keys = [f"{i}:{q.id}" for i, q in enumerate(questions)]  # the order is fixed: --limit takes a prefix

    def score(picked):
        graded = mc.score_questions(model.model, [questions[i] for i in picked], encoder, model.prefix_token, batch,
                                    min(model.max_length, 4096), model.pad_id, model.device, desc=None)
        return [{"scores": [[sc.logprob, sc.greedy, sc.tokens] for sc in g.scores]} for g in graded]

    task_key = {"task": request.task.name, "shots": request.task.shots, "source": request.source}
    stored = store.results(task_key, keys, score, STORE_CHUNK, f"{model.label} {request.task.name}")
    return [mc.Graded(q, [Score(*sc) for sc in r["scores"]]) for q, r in zip(questions, stored)]


def run_choice(model: EvalModel, request: TaskRequest, questions: list[mc.Question], description: dict,
               batch: int, encoder: CachedEncoder, store: ItemStore) -> list[dict]:
    name = request.task.name
    graded = _graded_resumable(model, request, questions, batch, encoder, store)
    details = {"dataset": description, "shots": request.task.shots, "chance": request.task.chance,
               "scoring": "log-likelihood of each choice (lm-eval 0.4 prompts)"}
    rows = []
    for metric, (value, err, n) in mc.accuracy_metrics(graded, request.task.with_norm).items():
        d = dict(details)
        if metric == "accuracy" and any(q.subject for q in questions):
            subjects = mc.per_subject(graded)
            d["subjects"] = subjects
            d["macro_accuracy"] = sum(s["accuracy"] for s in subjects.values()) / len(subjects)
            d["micro_accuracy"] = value
        if metric == "accuracy_norm":
            d["normalization"] = "log-likelihood per character of the choice (acc_norm)"
        d["per_item"] = mc.per_item(g.correct_norm if metric == "accuracy_norm" else g.correct for g in graded)
        rows.append(_row(model, name, metric, value, err, n, d))
    if any(q.subject for q in questions):
        subjects = rows[0]["details"]["subjects"]
        macro = rows[0]["details"]["macro_accuracy"]
        # stderr of a mean of subject means: sqrt(sum var_s) / S, var_s = p(1-p)/n_s
        var = sum((s["accuracy"] / 100) * (1 - s["accuracy"] / 100) / max(1, s["n"] - 1) for s in subjects.values())
        rows.append(_row(model, name, "accuracy_macro", macro, 100 * var ** 0.5 / len(subjects),
                         len(questions), dict(details, subjects_count=len(subjects))))
    return rows


def _gsm8k_prompt(item) -> str:
    prompt = mc.field(item, "prompt", "context")
    if prompt:
        return str(prompt)
    shots = mc.field(item, "fewshot", "shots", default=[]) or []
    parts = [f"Question: {mc.field(s, 'question')}\nAnswer: {mc.field(s, 'solution', 'answer_text', 'answer')}"
             for s in shots]
    parts.append(f"Question: {mc.field(item, 'question')}\nAnswer:")
    return "\n\n".join(parts)


def _generated_resumable(model: EvalModel, name: str, items: list, store: ItemStore, solve) -> list[float]:
    """1.0/0.0 per generation item; items an earlier run stored are read back, the rest solved and stored."""
    keys = [f"{i}:{mc.field(it, 'id', 'task_id', default='')}" for i, it in enumerate(items)]

    def score(picked):
        out = []
        for i in picked:
            correct, completion = solve(items[i])
            out.append({"correct": float(correct), "completion": completion})
        return out

    return [r["correct"] for r in store.results({"task": name}, keys, score, 1, f"{model.label} {name}")]


def run_gsm8k(model: EvalModel, items: list, description: dict, store: ItemStore) -> list[dict]:
    def solve(it):
        text = generation.greedy_generate(model.model, model.encode(_gsm8k_prompt(it)), GSM8K_MAX_NEW, model.decode,
                                          generation.GSM8K_STOPS, model.eos_id, model.device)
        gold = mc.field(it, "answer_number", "short_answer", "target", "answer")
        return generation.numbers_equal(generation.extract_last_number(text), gold), text

    correct = _generated_resumable(model, "gsm8k", items, store, solve)
    value, err = mc.mean_and_stderr(correct)
    return [_row(model, "gsm8k", "accuracy", 100 * value, 100 * err, len(items),
                 {"dataset": description, "decoding": f"greedy, at most {GSM8K_MAX_NEW} new tokens",
                  "extraction": "last number in the completion", "chance": 0.0, "per_item": mc.per_item(correct)})]


def run_humaneval(model: EvalModel, items: list, description: dict, store: ItemStore) -> list[dict]:
    from qwen_quant.accuracy.sandbox import network_isolated

    def solve(it):
        prompt = str(mc.field(it, "prompt"))
        completion = generation.greedy_generate(model.model, model.encode(prompt), HUMANEVAL_MAX_NEW, model.decode,
                                                generation.HUMANEVAL_STOPS, model.eos_id, model.device)
        res = generation.humaneval_passes(prompt, completion, str(mc.field(it, "test")),
                                          str(mc.field(it, "entry_point")))
        return res.passed, completion

    passed = _generated_resumable(model, "humaneval", items, store, solve)
    value, err = mc.mean_and_stderr(passed)
    return [_row(model, "humaneval", "pass@1", 100 * value, 100 * err, len(items),
                 {"dataset": description, "decoding": f"greedy, at most {HUMANEVAL_MAX_NEW} new tokens",
                  "sandbox": {"network_isolated": network_isolated(), "timeout_s": 10, "memory_mb": 1024},
                  "chance": 0.0, "per_item": mc.per_item(passed)})]


# ---------------------------------------------------------------- the API

def _corpus_for(request: TaskRequest, ppl_text: str | None):
    from qwen_quant import corpora

    if request.task.corpus:
        return corpora.corpus_by_name(request.task.corpus, "eval")
    if not ppl_text:
        raise UserError("task ppl needs --ppl-text FILE")
    corpus = corpora.read_text_verbatim(ppl_text)
    if corpus.chats is not None:
        raise UserError(f"{ppl_text} holds chat messages; give plain text (.txt or .jsonl with \"text\") for ppl")
    if not any(t.strip() for t in corpus.texts):
        raise UserError(f"{ppl_text} is empty: give a file with some text")
    return corpus


def _prepare(requests: list[TaskRequest], limit: int | None, ppl_text: str | None) -> dict:
    """Load every task's data once, before any model: all models see exactly the same items."""
    data = {}
    for r in requests:
        if r.task.kind == "perplexity":
            data[r.task.name] = _corpus_for(r, ppl_text)
        else:
            data[r.task.name] = load_items(r, limit)
    return data


def evaluate(models: list[str], tasks: str | list[str], limit: int | None = None, seqlen: int | None = None,
             batch: int = 8, out: str | Path | None = None, ppl_text: str | None = None,
             ppl_lengths: list[int] | None = None, device: str = "cpu", backend: str = "auto",
             trust_remote_code: bool = False, ppl_windows: int | None = DEFAULT_PPL_WINDOWS,
             dtype: str = "auto", allow_synthetic: bool = False, argv: list[str] | None = None) -> dict:
    """Evaluate `models` on `tasks`; the first model is the reference for deltas.

    `limit`: the first N items of each benchmark; `ppl_windows`: the first N perplexity windows (None:
    the whole held-out split); `dtype`: "auto" (each model's own: an fp model's config dtype, Int4
    checkpoints bf16 on the CPU and fp16 on a GPU) or one of DTYPES for every model alike.
    With `out`, every scored item is stored under out/items as it is scored: the same call again
    resumes where a stopped one ended, and a larger --limit / --ppl-windows scores only the new items.
    `allow_synthetic` scores synthetic models too, to check the evaluation path and time it on a machine: their
    rows say "synthetic" (models[].description), and no number of theirs is an accuracy."""
    if not models:
        raise UserError("no model given: pass one or more models (the first is the reference)")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    if ppl_windows is not None and ppl_windows < 1:
        raise UserError("--ppl-windows must be at least 1")
    if dtype not in DTYPES and dtype != "auto":
        raise UserError(f"unknown --dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    windows = ppl_windows
    requests = parse_tasks(tasks)
    refs = [refuse_synthetic(spec, allow_synthetic) for spec in models]  # before minutes on data or models
    seqlen = seqlen or DEFAULT_SEQLEN
    lengths = sorted(set(ppl_lengths or []))
    if ppl_text and not any(r.task.name == "ppl" for r in requests):
        requests.append(parse_tasks("ppl")[0])
    data = _prepare(requests, limit, ppl_text)
    from qwen_quant.provenance import collect_env

    env = collect_env(argv)  # at the start: the commit and date of the code that produced these numbers
    results, model_info, ppl_cache, questions_cache = [], [], {}, {}
    for spec, ref in zip(models, refs):
        started = time.perf_counter()
        em = load_for_eval(ref, device=device, backend=backend, trust_remote_code=trust_remote_code,
                           dtype=DTYPES.get(dtype))
        if any(m["label"] == em.label for m in model_info):
            em.label = f"{em.label}#{len(model_info) + 1}"
        encoder = CachedEncoder(em.encode)
        identity = {"model": model_fingerprint(spec, ref.local_path), "dtype": _dtype_run(em.model, dtype),
                    "backend": _backend_run(em.model, backend), "device": torch.device(device).type}
        store = ItemStore(Path(out) if out is not None else None, em.label, identity)
        for r in requests:
            name = r.task.name
            if r.task.kind == "perplexity":
                results += run_perplexity(em, name, data[name], seqlen, windows, lengths, batch, ppl_cache, store)
                continue
            items, desc = data[name]
            if r.task.kind == "choice":
                if name not in questions_cache:  # the prompts are built once, for every model
                    questions_cache[name] = task_questions(r, items)
                questions = questions_cache[name]
                results += run_choice(em, r, questions, desc, batch, encoder, store)
            elif r.task.kind == "gsm8k":
                results += run_gsm8k(em, items, desc, store)
            else:
                results += run_humaneval(em, items, desc, store)
        model_info.append({"label": em.label, "spec": spec, "description": em.description,
                           "seconds": round(time.perf_counter() - started, 2)})
        del em
    report = {"kind": "eval", "env": env, "models": model_info,
              "tasks": [r.task.name for r in requests],
              "settings": {"limit": limit, "ppl_windows": windows, "seqlen": seqlen, "batch": batch, "ppl_lengths": lengths,
                           "device": device, "backend": backend, "dtype": dtype,
                           **({"path_check": "synthetic models allowed: not an accuracy"} if allow_synthetic else {})},
              "results": results}
    if out is not None:
        write_results(report, Path(out))
    return report


def write_results(report: dict, out: Path) -> list[Path]:
    """results.json (atomic), results.md and results.csv in `out`."""
    from qwen_quant.files import write_text_atomic
    from qwen_quant.accuracy.tables import accuracy_csv, accuracy_markdown

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "results.csv"]
    write_text_atomic(paths[0], json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    write_text_atomic(paths[1], accuracy_markdown(report))
    write_text_atomic(paths[2], accuracy_csv(report))
    return paths


def default_out_dir(first_model: str) -> str:
    import datetime as _dt
    from qwen_quant.models.specs import parse_model_spec

    try:
        label = parse_model_spec(first_model).label
    except UserError:
        label = Path(first_model).name or "model"
    return str(Path("reports") / "eval" / f"{label}-{_dt.date.today().isoformat()}")
