"""Generated code runs only in the sandbox: limits hold, failures are reported, nothing hangs."""

import time

from qwen_quant.accuracy.generation import humaneval_passes
from qwen_quant.accuracy.sandbox import run_program


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3").passed
    res = run_program("assert 1 == 2")
    assert not res.passed and res.status == "failed" and "AssertionError" in res.output


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    res = run_program("while True:\n    pass", timeout_s=2)
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - start < 8


def test_fork_bomb_is_contained_and_killed():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    res = run_program(bomb, timeout_s=2, max_procs=16)
    assert not res.passed and res.status in ("timeout", "failed")
    assert time.monotonic() - start < 10
    assert run_program("print('alive')").passed  # the machine still runs programs afterwards


def test_memory_limit_and_no_network():
    res = run_program("x = bytearray(3 << 30)", memory_mb=256)
    assert not res.passed and "MemoryError" in res.output
    res = run_program("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)")
    assert not res.passed


def test_scratch_directory_is_private_and_removed():
    res = run_program("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())")
    assert res.passed
    import os
    assert not os.path.exists(res.output.strip().splitlines()[-1])


def test_humaneval_program_assembly():
    prompt = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    assert humaneval_passes(prompt, "    return a + b\n", test, "add").passed
    assert not humaneval_passes(prompt, "    return a - b\n", test, "add").passed
