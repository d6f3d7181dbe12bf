"""Run untrusted generated code (HumanEval completions) in a separate, limited process.

The only place generated code is ever executed. Each program runs in:
- a fresh Python interpreter in isolated mode (-I), in a scratch temp directory removed afterwards;
- its own session / process group, killed as a whole (SIGKILL) when the wall-clock limit passes;
- resource limits set before exec: address space (memory), CPU seconds, file size, open files and
  the number of processes (a fork bomb hits the limit instead of the machine); as root the child
  runs as `nobody` (setpriv), since root ignores the process limit;
- no network: a new network namespace via `unshare -n` (a user namespace too when not root) when
  the kernel allows it, else best effort (bare environment, `socket` disabled in-process).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NOBODY_UID = 65534

# Executed before the program: closes the obvious doors from inside the process too.
_PRELUDE = """\
import socket as _s
def _no_net(*a, **k):
    raise OSError("network disabled in the sandbox")
_s.socket = _no_net; _s.create_connection = _no_net
del _s, _no_net
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    output: str  # tail of stdout+stderr, for the details of a failure


@functools.lru_cache(maxsize=None)
def _isolation_prefix() -> tuple[tuple[str, ...], bool]:
    """(command prefix, network isolated): an empty network namespace, and as root a drop to nobody.

    As root: `unshare -n setpriv --reuid nobody ...` (root ignores RLIMIT_NPROC, nobody does not).
    Otherwise: `unshare -r -n` (a user namespace makes the network namespace unprivileged).
    """
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    is_root = os.geteuid() == 0
    drop = (setpriv, f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups") if setpriv else ()
    candidates = []
    if unshare:
        candidates.append(((unshare, "-n", *drop) if is_root else (unshare, "-r", "-n"), True))
    if is_root and drop:
        candidates.append((drop, False))
    for prefix, isolated in candidates:
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix, isolated
        except (OSError, subprocess.TimeoutExpired):
            continue
    return (), False


def network_isolated() -> bool:
    return _isolation_prefix()[1]


def _drops_root(prefix: tuple[str, ...]) -> bool:
    return any(a.startswith("--reuid=") for a in prefix)


def _limit_child(memory_mb: int, cpu_s: int, max_procs: int):
    def apply():
        os.setsid()  # own process group: one killpg ends every descendant
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
    return apply


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group; repeat while a fork bomb still has members in it."""
    for attempt in range(200):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if attempt == 0:
            try:  # reap the leader, or its zombie keeps the group alive
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.01)


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_procs: int = 32,
                output_chars: int = 2000) -> SandboxResult:
    """Run `source` as a Python program under the limits; passed = exit code 0 within the time."""
    scratch = tempfile.mkdtemp(prefix="qwen-quant-sandbox-")
    prefix, _ = _isolation_prefix()
    drop_root = _drops_root(prefix)
    try:
        program = os.path.join(scratch, "program.py")
        with open(program, "w") as f:
            f.write(_PRELUDE + "\n" + source)
        if drop_root:
            os.chown(scratch, NOBODY_UID, NOBODY_UID)
            os.chown(program, NOBODY_UID, NOBODY_UID)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = [*prefix, sys.executable, "-I", program]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_limit_child(memory_mb, int(timeout_s) + 1, max_procs))
        try:
            out, _ = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # pipes held open by an unkillable straggler
                out = b""
            status = "timeout"
        finally:
            _kill_group(proc)  # leftovers a finished parent left behind
        seconds = time.monotonic() - start
        text = (out or b"").decode("utf-8", "replace")[-output_chars:]
        return SandboxResult(status == "passed", status, proc.returncode, seconds, text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
