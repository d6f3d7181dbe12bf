"""Corpora (split rule, parsers) and calibration sets (windows, padding, determinism, errors)."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant import corpora
from qwen_quant.quantize.calibration import (build_calibration, corpus_token_stream, encode_many,
                                             render_chat, share_out, tokenizer_fingerprint)
from qwen_quant.models.tokenizers import TiktokenQwen

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def qwen_tok():
    return TiktokenQwen()


# ---------------------------------------------------------------- splits

@pytest.mark.parametrize("reader,total", [(corpora.wiki_texts, 10033), (corpora.peoples_daily_texts, None)])
def test_splits_are_disjoint_and_cover_the_corpus(reader, total):
    parts = {s: reader(s) for s in corpora.SPLITS}
    calib, dev, evals = (set(parts[s].texts) for s in ("calib", "dev", "eval"))
    assert not calib & evals and not calib & dev and not dev & evals
    sizes = {s: len(parts[s].texts) for s in parts}
    n = sum(sizes.values())
    if total is not None:
        assert n == total
    # the hash rule puts about half in calib, a tenth in dev, the rest in eval
    assert 0.45 < sizes["calib"] / n < 0.55 and 0.07 < sizes["dev"] / n < 0.13
    d = parts["eval"].description
    assert d["split"] == "eval" and d["version"] != "unknown" and d["documents"] == sizes["eval"]
    assert "sha256" in d["split_rule"]


def test_split_rule_is_fixed():
    assert [corpora.split_of(k) for k in ("Albert Einstein", "Tomato", "量化")] == \
        [corpora.split_of(k) for k in ("Albert Einstein", "Tomato", "量化")]
    assert {corpora.split_of(f"title {i}") for i in range(200)} == set(corpora.SPLITS)
    with pytest.raises(UserError, match="unknown corpus split"):
        corpora.wiki_texts("train")


def test_strip_word_tags():
    line = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  [中央/n  人民/n  广播/vn  电台/n]nt  Windows/nx  95/m"
    assert corpora.strip_word_tags(line) == "迈向充满希望的新世纪——中央人民广播电台Windows 95"
    pd = corpora.peoples_daily_texts("eval")
    assert pd.texts and not any(re.search(r"/[a-zA-Z]{1,3}\b", t) for t in pd.texts)  # no tag left


@pytest.mark.parametrize("name", ["wiki-fr", "wiki-es", "code", "chat"])
def test_more_calibration_corpora_are_split_and_described(name):
    parts = {s: corpora.corpus_by_name(name, s) for s in ("calib", "eval")}
    calib, evals = set(parts["calib"].texts), set(parts["eval"].texts)
    assert len(calib) > 500 and len(evals) > 300 and not calib & evals
    d = parts["calib"].description
    assert d["split"] == "calib" and d["version"] != "unknown" and d["documents"] == len(parts["calib"].texts)


def test_code_and_chat_corpora_look_like_what_they_name():
    code = corpora.code_texts("calib").texts
    languages = {t.split("```", 1)[1].split("\n", 1)[0] for t in code}
    assert languages == set(corpora.MBPP_LANGUAGES) and all(t.endswith("```") and "\r" not in t for t in code)
    chat = corpora.chat_texts("calib").texts
    assert all(t.startswith("<|im_start|>system\n") and t.count("<|im_start|>") == 3 and t.endswith("<|im_end|>")
               for t in chat)
    assert any("\\frac" in t for t in chat)  # MATH solutions keep their LaTeX
    fr = corpora.corpus_by_name("wiki-fr", "eval").texts
    assert sum(" le " in t or " la " in t for t in fr) > 0.5 * len(fr)
    es = corpora.corpus_by_name("wiki-es", "eval").texts
    assert sum(" el " in t or " los " in t for t in es) > 0.5 * len(es) and not set(es) & set(fr)


def test_prose_corpus_has_each_passage_once_in_one_split_and_all_five_genres():
    parts = {s: corpora.corpus_by_name("prose", s) for s in corpora.SPLITS}
    texts = [t for s in corpora.SPLITS for t in parts[s].texts]
    assert len(texts) == len(set(texts)) == 499  # CoQA repeats each passage once per question turn
    assert len(parts["calib"].texts) > 150 and len(parts["eval"].texts) > 150
    for part in parts.values():
        assert part.description["genres"] == ["cnn", "gutenberg", "mctest", "race", "wikipedia"]
    assert any("CHAPTER" in t for t in parts["calib"].texts)  # Gutenberg's literature keeps its chapters
    assert not set(parts["calib"].texts) & set(corpora.fiction_texts().texts)


@pytest.mark.parametrize("name,documents", [("humaneval-code", 164), ("fiction", 5153)])
def test_evaluation_only_corpora(name, documents):
    corpus = corpora.corpus_by_name(name, "eval")
    assert len(corpus.texts) == documents and all(t.strip() for t in corpus.texts)
    for split in ("calib", "dev"):
        with pytest.raises(UserError, match="evaluation only"):
            corpora.corpus_by_name(name, split)
    with pytest.raises(UserError, match="evaluation only"):
        build_calibration(TiktokenQwen(), source=name, nsamples=1, seqlen=16)
    if name == "humaneval-code":
        assert corpus.texts[0].startswith("from typing import List") and "return False" in corpus.texts[0]


# ---------------------------------------------------------------- user files

def test_read_txt_paragraphs():
    c = corpora.read_text_file(DATA / "calib_paragraphs.txt")
    assert len(c.texts) == 3 and not c.documents
    assert c.texts[0].startswith("The quick brown fox") and "spans two lines" in c.texts[0]
    assert c.description["documents"] == 3 and len(c.description["sha256"]) == 64


def test_read_jsonl_text_and_chat():
    text = corpora.read_text_file(DATA / "calib_text.jsonl")
    assert text.documents and len(text.texts) == 4 and text.chats is None
    chat = corpora.read_text_file(DATA / "calib_chat.jsonl")
    assert chat.documents and len(chat.chats) == 3 and chat.chats[1][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("name,message", [
    ("empty.txt", "is empty"),
    ("bad_json.jsonl", "line 2 is not valid JSON"),
    ("bad_record.jsonl", "line 2: expected an object"),
    ("mixed.jsonl", "mixes"),
    ("bad_messages.jsonl", "line 1: \"messages\" must be"),
    ("missing.txt", "not found"),
    ("../test_calibration.py", "unsupported text file type"),
])
def test_bad_text_files_give_one_line_errors(name, message):
    with pytest.raises(UserError, match=message) as e:
        corpora.read_text_file(DATA / name)
    assert "\n" not in str(e.value)


def test_hub_error_paths(monkeypatch):
    assert corpora.parse_hub_spec("hf:wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert corpora.parse_hub_spec("hf:allenai/c4") == ("allenai/c4", None, "train")
    with pytest.raises(UserError, match="bad hub dataset"):
        corpora.parse_hub_spec("hf:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="check the id") as e:
        corpora.hub_texts("hf:no-such-org/no-such-dataset")
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install datasets"):
        corpora.hub_texts("hf:wikitext")


# ---------------------------------------------------------------- calibration sets

def test_default_mix_shapes_determinism_and_languages(qwen_tok):
    a = build_calibration(qwen_tok, nsamples=5, seqlen=128, seed=0)
    b = build_calibration(qwen_tok, nsamples=5, seqlen=128, seed=0)
    c = build_calibration(qwen_tok, nsamples=5, seqlen=128, seed=1)
    assert a.input_ids.shape == (5, 128) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.attention_mask.all() and a.num_tokens == 5 * 128
    # interleaved: English, Chinese, code, chat, English prose
    cjk = [sum("\u4e00" <= ch <= "\u9fff" for ch in qwen_tok.decode(row.tolist())) for row in a.input_ids]
    assert all(cjk[i] < 5 for i in (0, 2, 3, 4)) and cjk[1] > 30
    d = a.description
    assert [x["corpus"] for x in d["corpora"]] == ["wikipedia-summaries-en", "peoples-daily-199801",
                                                   "mbpp-17-languages", "math-chatml", "coqa-passages"]
    assert [x["samples"] for x in d["corpora"]] == [1] * 5 and all(x["split"] == "calib" for x in d["corpora"])


def test_a_mix_shares_samples_out_and_interleaves_in_order(qwen_tok):
    cal = build_calibration(qwen_tok, source="wiki+peoples-daily+code+chat+prose", nsamples=7, seqlen=128, seed=0)
    assert cal.input_ids.shape == (7, 128) and cal.attention_mask.all()
    d = cal.description
    assert [(x["corpus"], x["samples"]) for x in d["corpora"]] == [
        ("wikipedia-summaries-en", 2), ("peoples-daily-199801", 2), ("mbpp-17-languages", 1), ("math-chatml", 1),
        ("coqa-passages", 1)]
    assert all(x["split"] == "calib" for x in d["corpora"]) and "interleaved" in d["mix"]
    cjk = [sum("\u4e00" <= ch <= "\u9fff" for ch in qwen_tok.decode(row.tolist())) for row in cal.input_ids]
    # rows: wiki, zh, code, chat, prose, wiki, zh
    assert cjk[1] > 30 and cjk[6] > 30 and all(cjk[i] < 5 for i in (0, 2, 3, 4, 5))
    # "default" is exactly this mix
    assert torch.equal(build_calibration(qwen_tok, nsamples=7, seqlen=128).input_ids, cal.input_ids)


@pytest.mark.parametrize("available,counts", [
    ([100, 100, 100], [34, 33, 33]),           # plenty everywhere: the even share, first ones one more
    ([100, 10, 100], [46, 10, 44]),            # a short corpus gives all it has, the rest one by one in order
    ([5, 10, 100], [5, 10, 85]),
    ([34, 33, 33], [34, 33, 33]),              # exactly enough
])
def test_share_out_caps_a_short_corpus_and_hands_on_the_rest(available, counts):
    assert share_out(100, available) == counts
    assert share_out(100, [40, 40, 19]) is None  # 99 windows in all: too few


@pytest.mark.parametrize("nsamples,weights,available,counts", [
    (32, [1, 2, 2, 2, 1], [99] * 5, [4, 8, 8, 8, 4]),      # exact shares
    (16, [1, 2, 2, 2, 1], [99] * 5, [2, 4, 4, 4, 2]),
    (7, [1, 2, 2, 2, 1], [99] * 5, [1, 2, 2, 1, 1]),       # floors 0, 1, 1, 1, 0; the 4 left by remainder (.875 first)
    (10, [1, 3], [99, 99], [3, 7]),                        # 2.5 and 7.5: the tie goes to the first
    (10, [1, 3], [99, 5], [5, 5]),                         # a capped heavy corpus hands its share on
    (6, [1, 1, 1], [99] * 3, [2, 2, 2]),                   # all 1: the even share
])
def test_share_out_follows_the_weights(nsamples, weights, available, counts):
    assert share_out(nsamples, available, weights) == counts
    assert share_out(nsamples, available, [1] * len(available)) == share_out(nsamples, available)


def test_a_weighted_mix_gives_each_corpus_its_shares(qwen_tok):
    cal = build_calibration(qwen_tok, source="wiki+peoples-daily*2+code*2+chat*2+prose", nsamples=8, seqlen=128)
    d = cal.description
    assert [(x["corpus"], x["samples"]) for x in d["corpora"]] == [
        ("wikipedia-summaries-en", 1), ("peoples-daily-199801", 2), ("mbpp-17-languages", 2), ("math-chatml", 2),
        ("coqa-passages", 1)]
    assert "1, 2, 2, 2, 1 samples" in d["mix"] and "would be" not in d["mix"]
    # interleaved by rounds: wiki zh code chat prose, then zh code chat
    cjk = [sum("\u4e00" <= ch <= "\u9fff" for ch in qwen_tok.decode(row.tolist())) for row in cal.input_ids]
    assert cjk[1] > 30 and cjk[5] > 30 and all(cjk[i] < 5 for i in (0, 2, 3, 4, 6, 7))
    # a seed draws the same windows whatever the weights: the first k of each corpus's permutation
    even = build_calibration(qwen_tok, source="wiki+peoples-daily+code+chat+prose", nsamples=10, seqlen=128)
    assert torch.equal(cal.input_ids[2], even.input_ids[2])  # code's first window
    assert torch.equal(cal.input_ids[6], even.input_ids[7])  # code's second window


def test_a_mix_with_a_short_corpus_still_fills_nsamples(qwen_tok):
    prose_windows = len(corpus_token_stream(qwen_tok, corpora.prose_texts("calib"))) // 2048
    n = 2 * prose_windows + 4  # more than twice what prose holds in 2048-token windows
    cal = build_calibration(qwen_tok, source="wiki+prose", nsamples=n, seqlen=2048, seed=0)
    assert cal.input_ids.shape == (n, 2048) and cal.attention_mask.all()
    assert [x["samples"] for x in cal.description["corpora"]] == [n - prose_windows, prose_windows]
    assert "gives all it has" in cal.description["mix"]
    with pytest.raises(UserError, match="too little calibration text in the mix"):
        build_calibration(qwen_tok, source="code+prose", nsamples=10_000, seqlen=2048)


@pytest.mark.parametrize("source", ["wiki+nonsense", "wiki+wiki", "wiki+", "wiki*0+code", "wiki*x+code",
                                    "wiki*-1+code", "wiki*+code"])
def test_bad_mixes_are_one_line_errors(qwen_tok, source):
    with pytest.raises(UserError, match="calibration mix"):
        build_calibration(qwen_tok, source=source, nsamples=2, seqlen=16)


def test_calibration_text_comes_from_the_calib_split_only(qwen_tok):
    cal = build_calibration(qwen_tok, source="wiki", nsamples=4, seqlen=256, seed=3)
    calib_text = "\n\n".join(corpora.wiki_texts("calib").texts)
    eval_text = "\n\n".join(corpora.wiki_texts("eval").texts)
    for row in cal.input_ids:
        middle = qwen_tok.decode(row.tolist())[200:320]  # away from the window's cut edges
        assert middle in calib_text and middle not in eval_text


def test_loaded_model_and_tokenizer_give_the_same_set(qwen_tok):
    loaded = types.SimpleNamespace(tokenizer=qwen_tok, encode=qwen_tok.encode)
    a = build_calibration(loaded, source="peoples-daily", nsamples=3, seqlen=64, seed=7)
    b = build_calibration(qwen_tok, source="peoples-daily", nsamples=3, seqlen=64, seed=7)
    assert torch.equal(a.input_ids, b.input_ids)


def test_token_cache_matches_fresh_tokenization(qwen_tok):
    corpus = corpora.peoples_daily_texts("dev")
    cached = corpus_token_stream(qwen_tok, corpus)
    again = corpus_token_stream(qwen_tok, corpus)
    fresh = [i for doc in encode_many(qwen_tok, [t + "\n\n" for t in corpus.texts]) for i in doc]
    assert cached.tolist() == fresh and again.tolist() == fresh
    assert tokenizer_fingerprint(qwen_tok) is not None


def test_records_are_padded_and_masked(qwen_tok):
    cal = build_calibration(qwen_tok, source=str(DATA / "calib_text.jsonl"), nsamples=4, seqlen=32, seed=0)
    lengths = sorted(len(qwen_tok.encode(t)) for t in corpora.read_text_file(DATA / "calib_text.jsonl").texts)
    assert sorted(cal.attention_mask.sum(1).tolist()) == lengths  # every record once, all shorter than 32
    for ids, mask in zip(cal.input_ids, cal.attention_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding, mask 0 exactly on padding
        assert (ids[n:] == qwen_tok.eos_token_id).all()
    assert cal.description["padding_tokens"] == 4 * 32 - sum(lengths)


def test_long_records_are_cut_into_pieces(qwen_tok):
    cal = build_calibration(qwen_tok, source=str(DATA / "calib_text.jsonl"), nsamples=6, seqlen=8, seed=0)
    assert cal.input_ids.shape == (6, 8) and cal.attention_mask.sum(1).max() == 8


def test_chat_records_use_the_chat_template(qwen_tok, demo_dir):
    from transformers import AutoTokenizer

    cal = build_calibration(qwen_tok, source=str(DATA / "calib_chat.jsonl"), nsamples=3, seqlen=64, seed=0)
    assert (cal.input_ids == 151644).any(1).all()  # <|im_start|> in every sample (Qwen ChatML)
    hf_tok = AutoTokenizer.from_pretrained(str(demo_dir))
    chat = corpora.read_text_file(DATA / "calib_chat.jsonl").chats[0]
    rendered = render_chat(hf_tok, chat)
    assert rendered == hf_tok.apply_chat_template(chat, tokenize=False) and "What is Int4?" in rendered
    cal2 = build_calibration(hf_tok, source=str(DATA / "calib_chat.jsonl"), nsamples=3, seqlen=128, seed=0)
    assert sorted(cal2.attention_mask.sum(1).tolist()) == sorted(
        len(hf_tok(render_chat(hf_tok, c), add_special_tokens=False)["input_ids"])
        for c in corpora.read_text_file(DATA / "calib_chat.jsonl").chats)


def test_too_little_text_says_how_much(qwen_tok):
    path = DATA / "calib_paragraphs.txt"
    have = len(corpus_token_stream(qwen_tok, corpora.read_text_file(path)))
    with pytest.raises(UserError) as e:
        build_calibration(qwen_tok, source=str(path), nsamples=4, seqlen=256)
    msg = str(e.value)
    assert f"{have:,} tokens" in msg and f"{4 * 256:,}" in msg and "\n" not in msg
    with pytest.raises(UserError, match="3 samples"):
        build_calibration(qwen_tok, source=str(DATA / "calib_chat.jsonl"), nsamples=10, seqlen=512)
    with pytest.raises(UserError, match="4,000"):
        build_calibration(qwen_tok, source=str(path), nsamples=2, seqlen=2000)


@pytest.mark.parametrize("kwargs,message", [
    (dict(nsamples=0), "--nsamples"), (dict(seqlen=-1), "--seqlen"), (dict(source="nonsense"), "unknown corpus")])
def test_bad_arguments(qwen_tok, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_calibration(qwen_tok, **kwargs)
