"""Scoring math on a fake model whose log-likelihoods can be checked by hand."""

import math

import pytest
import torch

from qwen_quant.accuracy import multiple_choice as mc
from qwen_quant.accuracy.generation import extract_last_number, numbers_equal
from qwen_quant.accuracy.perplexity import perplexity, windows_of
from qwen_quant.accuracy.scoring import encode_pair, loglikelihoods

VOCAB = 5


def bigram_logits(prev: int) -> torch.Tensor:
    """Logits of the next token given the previous one: token (prev+1) % V gets 2.0, the rest 0."""
    row = torch.zeros(VOCAB)
    row[(prev + 1) % VOCAB] = 2.0
    return row


def logp(prev: int, nxt: int) -> float:
    """The same by hand: log(e^2 / (e^2 + 4)) for the favoured token, log(1 / (e^2 + 4)) otherwise."""
    z = math.exp(2.0) + (VOCAB - 1)
    return math.log((math.exp(2.0) if nxt == (prev + 1) % VOCAB else 1.0) / z)


class BigramModel(torch.nn.Module):
    """Logits at position t depend on input token t only; padding (any id) cannot leak into real rows."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **_):
        self.calls += 1
        return torch.stack([torch.stack([bigram_logits(int(t)) for t in row]) for row in input_ids])


def test_loglikelihood_matches_hand_computation_in_any_batch():
    reqs = [([0, 1], [2, 3]), ([0, 1], [4]), ([3], [4, 0, 0]), ([2, 2, 2, 2], [1])]
    expected = [logp(1, 2) + logp(2, 3), logp(1, 4), logp(3, 4) + logp(4, 0) + logp(0, 0), logp(2, 1)]
    for batch in (1, 2, 8):
        scores = loglikelihoods(BigramModel(), reqs, batch_size=batch, pad_id=3)
        assert [s.logprob for s in scores] == pytest.approx(expected, abs=1e-5)
        assert [s.greedy for s in scores] == [True, False, False, False]
        assert [s.tokens for s in scores] == [2, 1, 3, 1]


def test_single_token_choices_share_one_row_and_one_forward():
    model = BigramModel()
    reqs = [([4, 0], [c]) for c in range(VOCAB)]
    scores = loglikelihoods(model, reqs, batch_size=1)
    assert model.calls == 1
    assert [s.logprob for s in scores] == pytest.approx([logp(0, c) for c in range(VOCAB)], abs=1e-5)


def test_left_truncation_keeps_the_continuation_whole():
    scores = loglikelihoods(BigramModel(), [([0, 1, 2, 3, 4, 0], [1, 2])], max_length=3)
    assert scores[0].logprob == pytest.approx(logp(0, 1) + logp(1, 2), abs=1e-5)


def test_encode_pair_moves_trailing_space_to_the_continuation():
    seen = []

    def encode(text):
        seen.append(text)
        return [ord(ch) for ch in text]

    ctx, cont = encode_pair(encode, "Answer: ", "B")
    assert ctx == [ord(c) for c in "Answer:"]
    assert cont == [ord(" "), ord("B")]
    ctx, cont = encode_pair(encode, "", "x", prefix_token=7)
    assert ctx == [7] and cont == [ord("x")]


def test_multiple_choice_accuracy_and_norm_choose_differently():
    # choice 0: short and likely per token; choice 1: longer, higher total log-likelihood per char
    q = mc.Question("q", ["c", "c"], [" a", " bb"], gold=1, norm_lengths=[1, 10])
    from qwen_quant.accuracy.scoring import Score

    graded = mc.Graded(q, [Score(-1.0, True, 1), Score(-2.0, False, 2)])
    assert not graded.correct  # -1 > -2 picks choice 0
    assert graded.correct_norm  # -0.2 per char > -1 per char picks choice 1
    metrics = mc.accuracy_metrics([graded, mc.Graded(q, [Score(-3.0, 0, 1), Score(-2.0, 0, 1)])], with_norm=True)
    assert metrics["accuracy"][0] == pytest.approx(50.0)
    assert metrics["accuracy"][1] == pytest.approx(50.0)  # sqrt(0.5 / 2) = 0.5 -> 50 points
    assert metrics["accuracy_norm"][0] == pytest.approx(100.0)


def test_prompts_follow_the_harness_formats():
    item = {"id": "1", "question": "What is 2+2?", "choices": ["3", "4"], "answer_index": 1, "subject": "math"}
    shot = {"question": "1+1?", "choices": ["2", "5"], "answer_index": 0}
    q = mc.lettered_question(item, mc.mmlu_header("high_school_math"), [shot])
    assert q.contexts[0] == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                             "1+1?\nA. 2\nB. 5\nAnswer: A\n\nWhat is 2+2?\nA. 3\nB. 4\nAnswer:")
    assert q.continuations == [" A", " B"] and q.gold == 1
    arc = mc.qa_question({"question": "Why?", "choices": ["yes", "no"], "answer_index": 0})
    assert arc.contexts[0] == "Question: Why?\nAnswer:" and arc.continuations == [" yes", " no"]
    wg = mc.winogrande_question({"question": "Tom hit Bob because _ was angry.", "choices": ["Tom", "Bob"],
                                 "answer_index": 0})
    assert wg.contexts == ["Tom hit Bob because Tom", "Tom hit Bob because Bob"]
    assert wg.continuations == [" was angry."] * 2


def test_perplexity_windows_and_value():
    tokens = [0, 1, 2, 3, 4, 0, 1, 2, 9]  # two windows of 4; the tail is dropped
    assert windows_of(tokens, 4).tolist() == [[0, 1, 2, 3], [4, 0, 1, 2]]
    res = perplexity(BigramModel(), [t % VOCAB for t in tokens], seqlen=4)
    every_pred_favoured = -logp(0, 1)  # each next token is prev+1: all 6 predictions are the favoured one
    assert res["value"] == pytest.approx(math.exp(every_pred_favoured), rel=1e-5)
    assert res["windows"] == 2 and res["tokens_scored"] == 6
    assert res["stderr"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("text,number", [
    ("so 3 + 4 = 7. So the answer is 7.", "7"), ("The answer is $1,234.", "1234"), ("It is -5.50", "-5.5"),
    ("no digits here", None), ("18 eggs, then 2.0", "2"),
])
def test_gsm8k_last_number(text, number):
    assert extract_last_number(text) == number


def test_gsm8k_number_comparison():
    assert numbers_equal("1234", "1,234") and numbers_equal("2", "2.0")
    assert not numbers_equal(None, "3") and not numbers_equal("3", "4")


class CachedBigram(torch.nn.Module):
    """Answers like a causal LM with a cache: logits for the given tokens, a dummy cache object."""

    def forward(self, input_ids, past_key_values=None, use_cache=False, **_):
        from types import SimpleNamespace

        return SimpleNamespace(logits=BigramModel()(input_ids), past_key_values=object())


def test_greedy_generation_stops_at_stop_string_and_eos():
    from qwen_quant.accuracy.generation import greedy_generate

    decode = lambda ids: "".join("abcde"[i] for i in ids)  # noqa: E731
    # from token 0 the bigram model walks 1, 2, 3, 4, 0, 1 ...
    assert greedy_generate(CachedBigram(), [0], 7, decode) == "bcdeabc"
    assert greedy_generate(CachedBigram(), [0], 20, decode, stop_strings=("ea",)) == "bcd"
    assert greedy_generate(CachedBigram(), [0], 20, decode, eos_id=4) == "bcd"


def test_paired_delta_by_hand():
    """fp right on items 0-3, Int4 right on 0-1 and 4: differences 0,0,-1,-1,+1 -> mean -20 %,
    sd = sqrt(((0.2)^2*2 + (0.8)^2*2 + (1.2)^2) / 4) = sqrt(0.7), stderr = sqrt(0.7 / 5)."""
    fp, int4 = mc.per_item([True, True, True, True, False]), mc.per_item([True, True, False, False, True])
    assert (fp, int4) == ("11110", "11001")
    delta, err = mc.paired_delta(fp, int4)
    assert delta == pytest.approx(-20.0)
    assert err == pytest.approx(100 * math.sqrt(0.7 / 5))
    # the same accuracies with every change on one shared item cancel exactly: no difference, no noise
    assert mc.paired_delta("10", "10") == (0.0, 0.0)
    assert mc.paired_delta("101", "10") is None and mc.paired_delta(None, "10") is None
