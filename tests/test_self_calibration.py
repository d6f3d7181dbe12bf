"""`--calib self`: the model samples its own calibration (quantize/self_calibration.py), on tiny models."""

import json

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.quantize import api, self_calibration
from qwen_quant.quantize.self_calibration import generate_samples, start_token
from tiny_models import tiny_causal_lm
from test_pipeline import loaded


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_QUANT_CACHE", str(tmp_path / "cache"))


def model_with_boundary(bos=None, eos=7):
    model = tiny_causal_lm("qwen2")
    model.config.bos_token_id, model.config.eos_token_id = bos, eos
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = bos, eos
    return model


def test_start_token_is_bos_else_eos_and_must_be_a_token_of_the_model():
    assert start_token(model_with_boundary(bos=3, eos=7)) == 3
    assert start_token(model_with_boundary(bos=None, eos=7)) == 7  # no BOS (Qwen-7B): its EOS, <|endoftext|>
    assert start_token(model_with_boundary(bos=None, eos=[9, 7])) == 9
    with pytest.raises(UserError, match="--calib self needs a BOS or EOS"):
        start_token(model_with_boundary(bos=None, eos=None))
    with pytest.raises(UserError, match="--calib self needs a BOS or EOS"):
        start_token(model_with_boundary(bos=None, eos=151643))  # outside the tiny vocabulary


def test_samples_start_at_the_boundary_follow_the_model_and_repeat_for_a_seed():
    model = model_with_boundary()
    ids = generate_samples(model, nsamples=5, seqlen=12, seed=0, start_id=7, batch=2)
    assert ids.shape == (5, 12) and ids.dtype == torch.long
    assert torch.equal(ids[:, 0], torch.full((5,), 7))
    assert torch.equal(ids, generate_samples(model, nsamples=5, seqlen=12, seed=0, start_id=7, batch=2))
    assert not torch.equal(ids, generate_samples(model, nsamples=5, seqlen=12, seed=1, start_id=7, batch=2))
    assert len({tuple(r.tolist()) for r in ids}) == 5  # sampled, not greedy: five different texts
    # the model's own text: far more likely under the model than random ids of the same vocabulary
    random_ids = torch.randint(0, model.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    assert nll(model, ids) < nll(model, random_ids) - 1.0


def nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def test_quantize_with_self_calibration_records_it_and_reuses_the_generated_text(tmp_path, monkeypatch):
    model = model_with_boundary()
    out = api.quantize(loaded(model), tmp_path / "a", quiet=True, calib="self", nsamples=3, seqlen=16, group_size=32)
    calib = json.loads((out / "quant_report.json").read_text())["calibration"]
    assert calib["source"] == "self" and calib["tokens"] == 3 * 16 and calib["padding_tokens"] == 0
    assert calib["generation"]["start_token"] == 7 and calib["generation"]["temperature"] == 1.0
    assert '"method": "self-calibration' in (out / "README.md").read_text()  # the model card says how it was made
    cached = list((tmp_path / "cache" / "self-calibration").glob("*.pt"))
    assert len(cached) == 1

    def no_second_generation(*a, **k):
        raise AssertionError("the cached self-calibration should have been used")

    monkeypatch.setattr(self_calibration, "generate_samples", no_second_generation)
    again = api.quantize(loaded(model_with_boundary()), tmp_path / "b", quiet=True, calib="self", nsamples=3,
                         seqlen=16, group_size=32)
    assert json.loads((again / "quant_report.json").read_text())["calibration"] == calib
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_self_calibration_refuses_a_synthetic_model(tmp_path):
    with pytest.raises(UserError, match="--calib self needs a real model"):
        api.quantize("synthetic:tiny", tmp_path / "s", quiet=True, calib="self", nsamples=2, seqlen=8)
