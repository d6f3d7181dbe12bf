"""Shared test setup. TRITON_INTERPRET must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir():
    """The demo model as a cached HF folder (fp32). Load your own copy: `load_model("demo")` (~0.3 s)."""
    from qwen_quant.models.demo import demo_model_dir

    return demo_model_dir()
