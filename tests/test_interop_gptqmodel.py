"""The interop proof: a checkpoint written by qwen-quantize loads through GPTQModel 7.6.0's own loader
and plain torch kernel on the CPU and gives the same logits as our `load_quantized`.

GPTQModel's torch kernel reads v1 zero points (stored zero-1) itself, so a v1/v2 mix-up or a packing
error would show here as garbage logits, not as a crash. The peer runs in its own environment
(.venv-peer, made by `make peer`; `make test` makes it): a user's environment never holds it or what
it pulls in (torchao and friends print on import), and the proof is what a GPTQModel user would see.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from qwen_quant.quantize import cli

PROMPT = "The capital of France is Paris. The capital of Germany is"


def _quantize_demo(tmp_path_factory, *extra: str) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread beats two on a busy box
    out = tmp_path_factory.mktemp("interop") / "demo-gptq-int4"
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["demo", "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--quiet", "--device", "cpu",
                      *extra])
    finally:
        torch.set_num_threads(before)
    assert e.value.code == 0
    return out


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    return _quantize_demo(tmp_path_factory)


PEER_PYTHON = Path(__file__).resolve().parents[1] / ".venv-peer" / "bin" / "python"
PEER_LOGITS = """
import json, sys, torch
from gptqmodel import BACKEND, GPTQModel
path, ids, out = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
with torch.no_grad():
    torch.save(model.model(input_ids=ids).logits.float(), out)
"""


def _gptqmodel_logits(path, ids, tmp_path):
    if not PEER_PYTHON.is_file():
        pytest.fail(f"the peer's environment {PEER_PYTHON.parents[1]} is missing: run `make peer` (make test does)")
    out = tmp_path / "logits.pt"
    # cwd outside the repository: its top-level kernels/ folder would shadow the `kernels` package GPTQModel imports
    proc = subprocess.run([str(PEER_PYTHON), "-c", PEER_LOGITS, str(path), json.dumps(ids.tolist()), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={"GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_gptqmodel_loads_our_checkpoint_with_the_same_logits(demo_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from qwen_quant.kernels.loader import load_quantized

    tok = AutoTokenizer.from_pretrained(str(demo_checkpoint))
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    ours_model = load_quantized(demo_checkpoint, backend="torch", device="cpu", dtype=torch.float16)
    with torch.no_grad():
        ours = ours_model(input_ids=ids).logits.float()
    theirs = _gptqmodel_logits(demo_checkpoint, ids, tmp_path)
    assert ours.shape == theirs.shape
    # fp16 activations through 30 blocks: compare at fp16 tolerance, relative to the logits' scale
    scale = ours.abs().max()
    assert (ours - theirs).abs().max() <= 0.02 * scale, float((ours - theirs).abs().max() / scale)
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree >= 0.9, float(agree)
    # and the checkpoint is a working model, not noise: the next token after the prompt is plausible
    top = tok.decode(ours[0, -1].argmax())
    assert theirs[0, -1].argmax() == ours[0, -1].argmax(), top


@pytest.mark.slow
def test_gptqmodel_loads_our_quantized_lm_head_with_the_same_logits(tmp_path_factory, tmp_path):
    """--lm-head (the demo ties its head to the embeddings: the head is quantized on its own, the embeddings
    stay 16-bit): GPTQModel reads `lm_head: true` and gives our logits."""
    from qwen_quant.kernels.loader import load_quantized
    from qwen_quant.kernels.quant_linear import QuantLinear

    path = _quantize_demo(tmp_path_factory, "--lm-head", "--no-mse")
    ours_model = load_quantized(path, backend="torch", device="cpu", dtype=torch.float16)
    assert isinstance(ours_model.lm_head, QuantLinear)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 5611, 314]])
    with torch.no_grad():
        ours = ours_model(input_ids=ids).logits.float()
        hidden = ours_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with_16_bit_head = (hidden @ ours_model.model.embed_tokens.weight.T).float()
    theirs = _gptqmodel_logits(path, ids, tmp_path)
    gap, head_effect = (ours - theirs).abs().max(), (ours - with_16_bit_head).abs().max()
    print(f"ours vs GPTQModel {float(gap):.4f}, quantized vs 16-bit head {float(head_effect):.4f}")
    # GPTQModel really ran the quantized head (a peer that kept the tied 16-bit head would sit head_effect away)
    assert gap <= 0.1 * head_effect, (float(gap), float(head_effect))
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
