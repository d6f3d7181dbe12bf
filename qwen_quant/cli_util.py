"""Shared CLI plumbing: bad input -> one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from qwen_quant.errors import UserError


def run_cli(main_fn):
    """Wrap a CLI `main(argv) -> int | None`: UserError -> one line + exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(main_fn)
    def wrapper(argv=None):
        try:
            code = main_fn(argv)
        except UserError as e:
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)
        raise SystemExit(code or 0)

    return wrapper


def is_quiet() -> bool:
    return os.environ.get("QWEN_QUANT_QUIET", "") not in ("", "0")


class Parser(argparse.ArgumentParser):
    """Every CLI's argument parser: a bad option is one line (through run_cli: 'error: ...', exit 2), not
    argparse's usage block; --help shows the description, the options and the epilog as written."""

    def __init__(self, prog: str, description: str, epilog: str | None = None):
        super().__init__(prog=prog, description=description, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


def quiet_hf_libraries(quiet: bool = False) -> None:
    """What transformers prints on its own (deprecation chatter, its model-loading progress bars) is not for our
    CLIs' users: errors still show, and a Hugging Face download keeps its progress bar unless --quiet."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' bars, and the hub's with them ...
    (disable_progress_bars if quiet or is_quiet() else enable_progress_bars)()  # ... download bars come back
