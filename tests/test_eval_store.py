"""qwen-eval's item store (a stopped run resumes, more items add to the stored ones) and the paired
comparisons that judge a quantized model against fp and RTN on the same windows."""

import json
import math
import random

import pytest
import torch

from qwen_quant.accuracy import evaluate as ev
from qwen_quant.accuracy import multiple_choice as mc
from qwen_quant.accuracy.paired import loss_ratio, perplexity_difference
from qwen_quant.accuracy.perplexity import summarize
from qwen_quant.accuracy.scoring import CachedEncoder
from qwen_quant.accuracy.store import ItemStore
from qwen_quant.accuracy.tasks import TASKS, TaskRequest
from qwen_quant.corpora import Corpus
from tiny_models import tiny_causal_lm


class CharTokenizer:
    """One token per character (ids below the tiny model's vocabulary)."""
    eos_token_id = bos_token_id = pad_token_id = 0
    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 199 for c in text]}

    def __len__(self):
        return 200

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class Counting(torch.nn.Module):
    """The tiny model, counting the rows it scores."""

    def __init__(self):
        super().__init__()
        self.inner, self.rows = tiny_causal_lm(), 0
        self.config = self.inner.config

    def forward(self, input_ids, **kw):
        self.rows += input_ids.shape[0]
        return self.inner(input_ids=input_ids, **kw)


def eval_model():
    return ev.EvalModel("tiny", Counting(), CharTokenizer(), {})


TEXT = Corpus(["The quick brown fox jumps over the lazy dog, again and again. " * 3] * 12, {"corpus": "t"})


def test_perplexity_windows_are_stored_and_only_new_ones_scored(tmp_path):
    model, store = eval_model(), ItemStore(tmp_path, "tiny", {"model": "m"})
    first = ev.run_perplexity(model, "ppl-wiki", TEXT, 32, 4, [], 2, {}, store)[0]
    assert model.model.rows == 4 and first["n"] == 4
    again = ev.run_perplexity(model, "ppl-wiki", TEXT, 32, 4, [], 2, {}, store)[0]
    assert model.model.rows == 4 and again["value"] == first["value"]  # read back: nothing scored
    more = ev.run_perplexity(model, "ppl-wiki", TEXT, 32, 6, [], 2, {}, store)[0]
    assert model.model.rows == 6 and more["n"] == 6  # only windows 4 and 5 were new
    assert more["details"]["per_window_nll"][:4] == first["details"]["per_window_nll"]
    fresh = ev.run_perplexity(eval_model(), "ppl-wiki", TEXT, 32, 6, [], 2, {}, ItemStore(None, "tiny", {}))[0]
    assert more["value"] == pytest.approx(fresh["value"], rel=1e-6)
    assert more["value"] == pytest.approx(summarize(more["details"]["per_window_nll"], 32)["value"])


def test_a_line_cut_short_by_a_kill_is_scored_again_and_other_models_never_share(tmp_path):
    model, store = eval_model(), ItemStore(tmp_path, "tiny", {"model": "m"})
    ev.run_perplexity(model, "ppl-wiki", TEXT, 32, 3, [], 2, {}, store)
    (path,) = (tmp_path / "items").iterdir()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["model"] == {"model": "m"} and len(lines) == 4  # header + 3 windows
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # the last window half written
    ev.run_perplexity(model, "ppl-wiki", TEXT, 32, 3, [], 2, {}, store)
    assert model.model.rows == 4
    other = eval_model()
    ev.run_perplexity(other, "ppl-wiki", TEXT, 32, 3, [], 2, {}, ItemStore(tmp_path, "tiny", {"model": "other"}))
    assert other.model.rows == 3 and len(list((tmp_path / "items").iterdir())) == 2


def test_questions_are_stored_and_resume(tmp_path):
    items = [{"id": f"q{i}", "question": f"Question {i}: which?", "choices": ["alpha", "beta", "gamma"], "gold": i % 3}
             for i in range(7)]
    questions = [mc.qa_question(it) for it in items]
    request = TaskRequest(TASKS["arc-easy"])
    model, store = eval_model(), ItemStore(tmp_path, "tiny", {"model": "m"})
    encoder = CachedEncoder(model.encode)
    part = ev._graded_resumable(model, request, questions[:4], 4, encoder, store)
    rows_after_four = model.model.rows
    whole = ev._graded_resumable(model, request, questions, 4, encoder, store)
    assert 0 < rows_after_four < model.model.rows  # the three new questions were scored, the four old ones read
    direct = mc.score_questions(eval_model().model, questions, encoder, 0, 4, 256, 0)
    assert [s.logprob for g in whole for s in g.scores] == pytest.approx(
        [s.logprob for g in direct for s in g.scores], rel=1e-5)
    assert [g.correct for g in whole[:4]] == [g.correct for g in part]
    before = model.model.rows
    ev._graded_resumable(model, request, questions, 4, encoder, store)
    assert model.model.rows == before


def test_a_text_file_is_scored_verbatim(tmp_path):
    text = "Licence\n\n    1. Indented clause,\n       continued.\n\n\n  2. Another.   \n"
    path = tmp_path / "licence.txt"
    path.write_text(text)
    corpus = ev._corpus_for(TaskRequest(TASKS["ppl"]), str(path))
    assert corpus.texts == [text] and corpus.description["verbatim"]
    model = eval_model()
    row = ev.run_perplexity(model, "ppl", corpus, 8, None, [], 1, {}, ItemStore(None, "tiny", {}))[0]
    assert row["details"]["tokens"] == len(text) // 8 * 8 and "verbatim" in row["details"]["convention"]


@pytest.mark.parametrize("value,expected", [("all", None), ("12", 12)])
def test_ppl_windows_option(value, expected):
    from qwen_quant.accuracy.cli import build_parser

    assert build_parser().parse_args(["demo", "--tasks", "ppl-wiki", "--ppl-windows", value]).ppl_windows == expected
    assert build_parser().parse_args(["demo", "--tasks", "ppl-wiki", "--limit", "5"]).ppl_windows == ev.DEFAULT_PPL_WINDOWS


# ---------------------------------------------------------------- paired comparisons

def _windows(n=40, seed=0):
    rng = random.Random(seed)
    difficulty = [rng.gauss(2.0, 0.5) for _ in range(n)]  # shared by every model: what pairing cancels
    fp = [d + rng.gauss(0, 0.01) for d in difficulty]
    rtn = [d + 0.20 + rng.gauss(0, 0.03) for d in difficulty]
    q = [d + 0.08 + rng.gauss(0, 0.03) for d in difficulty]
    return fp, rtn, q


def _ppl(nlls):
    return math.exp(sum(nlls) / len(nlls))


def test_loss_ratio_value_and_error_against_resampling():
    fp, rtn, q = _windows()
    ratio, se = loss_ratio(fp, rtn, q)
    assert ratio == pytest.approx((_ppl(q) - _ppl(fp)) / (_ppl(rtn) - _ppl(fp)))
    rng = random.Random(1)
    boots = []
    for _ in range(2000):  # the bootstrap over windows agrees with the delta method
        pick = [rng.randrange(len(fp)) for _ in fp]
        f, r, x = ([v[i] for i in pick] for v in (fp, rtn, q))
        boots.append((_ppl(x) - _ppl(f)) / (_ppl(r) - _ppl(f)))
    mean = sum(boots) / len(boots)
    boot_se = math.sqrt(sum((b - mean) ** 2 for b in boots) / (len(boots) - 1))
    assert se == pytest.approx(boot_se, rel=0.15)
    # pairing: the windows' shared difficulty (spread 0.5) barely enters the error
    assert se < 0.1


def test_perplexity_difference_is_paired():
    fp, _, q = _windows()
    diff, se = perplexity_difference(fp, q)
    assert diff == pytest.approx(_ppl(q) - _ppl(fp))
    unpaired = math.sqrt(summarize(fp, 2)["stderr"] ** 2 + summarize(q, 2)["stderr"] ** 2)
    assert 0 < se < unpaired / 5
    assert perplexity_difference(fp, fp) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same windows"):
        perplexity_difference(fp, q[:-1])
    assert loss_ratio(fp, fp, q) is None  # a baseline that loses nothing: no ratio


def test_a_model_is_known_by_its_files_not_its_path(tmp_path):
    from qwen_quant.accuracy.store import model_fingerprint

    a = tmp_path / "a" / "ckpt"
    a.mkdir(parents=True)
    (a / "config.json").write_text('{"x": 1}')
    (a / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "link").symlink_to(a)
    before = model_fingerprint(str(a), str(a))
    assert before == model_fingerprint("link", str(tmp_path / "link"))
    (a / "model.safetensors").write_bytes(b"\1" * 64)  # other weights: another model
    assert model_fingerprint(str(a), str(a)) != before
    assert model_fingerprint("Org/model", None) != model_fingerprint("Org/other", None)
