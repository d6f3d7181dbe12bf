"""qwen-quantize: every bad input is one line on stderr, exit 2, nothing written; a good run lands where it says."""

import errno
import json

import pytest
import torch

from qwen_quant.quantize import cli, writer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: far faster on a busy 2-core box
    yield
    torch.set_num_threads(before)


def fails(argv, capsys, tmp_path, *, match: str):
    """Run the CLI expecting exit 2 with one line on stderr containing `match`, and nothing written."""
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match.lower() in err[0].lower(), err[0]
    assert "Traceback" not in err[0]
    assert set(tmp_path.iterdir()) == before, "something was written"


def tiny_llama_folder(path, weights: bytes | None = None, config: dict | None = None):
    path.mkdir()
    cfg = config or {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                     "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}
    (path / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


@pytest.mark.parametrize("args, match", [
    (["--bits", "5"], "unsupported --bits 5"),
    (["--group-size", "0"], "--group-size 0"),
    (["--group-size", "-2"], "--group-size -2"),
    (["--group-size", "abc"], "invalid int value"),
    (["--nsamples", "0"], "--nsamples"),
    (["--damp", "0"], "outside (0, 1)"),
    (["--damp", "1.5"], "outside (0, 1)"),
    (["--damp-auto", "-1"], "--damp-auto -1.0 is invalid"),
    (["--forward-dtype", "fp8"], "invalid choice"),
    (["--method", "awq"], "unknown --method"),
    (["--awq-drop-massive", "3"], "add --awq-scales"),
    (["--awq-scales", "--awq-drop-massive", "-1"], "--awq-drop-massive -1.0 is invalid"),
    (["--seqlen", "0"], "--seqlen"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--unknown-flag"], "unrecognized arguments"),
])
def test_bad_settings(args, match, capsys, tmp_path):
    fails(["synthetic:tiny", "--out", str(tmp_path / "out"), *args], capsys, tmp_path, match=match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, tmp_path):
    fails(["synthetic:tiny", "--device", "cuda", "--out", str(tmp_path / "out")], capsys, tmp_path, match="no CUDA GPU")


def test_target_exists(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    fails(["synthetic:tiny", "--out", str(tmp_path / "out")], capsys, tmp_path, match="--overwrite")


def test_unknown_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(["Qwen/No-Such-Model-qq", "--out", str(tmp_path / "out")], capsys, tmp_path,
          match="not in the local hugging face cache")


def test_no_network_is_said_at_once(capsys, tmp_path, monkeypatch):
    """No name resolution: one line within seconds, not half a minute of huggingface_hub's retries."""
    import socket
    import time

    from qwen_quant import hub

    def no_dns(*_a, **_k):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    hub.hub_unreachable.cache_clear()
    try:
        t0 = time.perf_counter()
        fails(["Qwen/Qwen-14B-Chat", "--out", str(tmp_path / "out")], capsys, tmp_path, match="no network")
        assert time.perf_counter() - t0 < 10
    finally:
        hub.hub_unreachable.cache_clear()


def test_missing_local_model(capsys, tmp_path):
    fails([str(tmp_path / "nowhere" / "model"), "--out", str(tmp_path / "out")], capsys, tmp_path, match="not found")


def test_qwen_v1_needs_trust_remote_code(capsys, tmp_path):
    src = tiny_llama_folder(tmp_path / "qwen", config={"model_type": "qwen", "auto_map": {"AutoModelForCausalLM": "x.Y"}})
    fails([str(src), "--out", str(tmp_path / "out")], capsys, tmp_path, match="--trust-remote-code")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty"), "--out", str(tmp_path / "out")], capsys, tmp_path, match="no config.json")


def test_corrupt_safetensors(capsys, tmp_path):
    src = tiny_llama_folder(tmp_path / "bad", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    fails([str(src), "--out", str(tmp_path / "out")], capsys, tmp_path, match="not a valid safetensors file")


def test_truncated_safetensors(capsys, tmp_path):
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    src = tiny_llama_folder(tmp_path / "short", weights=len(header).to_bytes(8, "little") + header + b"\0" * 10)
    fails([str(src), "--out", str(tmp_path / "out")], capsys, tmp_path, match="not a valid safetensors file")


def test_missing_weights(capsys, tmp_path):
    src = tiny_llama_folder(tmp_path / "noweights")
    fails([str(src), "--out", str(tmp_path / "out")], capsys, tmp_path, match="cannot load model")


def test_seqlen_beyond_context(capsys, tmp_path):
    fails(["synthetic:tiny", "--seqlen", "5000", "--out", str(tmp_path / "out")], capsys, tmp_path, match="context (4096")


def test_empty_calibration_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    fails(["synthetic:tiny", "--calib", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")], capsys, tmp_path,
          match="empty.txt")


def test_too_short_calibration_file(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("Only a few words here.\n")
    fails(["synthetic:tiny", "--calib", str(tmp_path / "short.txt"), "--nsamples", "4", "--seqlen", "64",
           "--out", str(tmp_path / "out")], capsys, tmp_path, match="too")


def test_disk_full_while_writing(capsys, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_safetensors", full)
    fails(["synthetic:tiny", "--nsamples", "2", "--seqlen", "32", "--quiet", "--out", str(tmp_path / "out")],
          capsys, tmp_path, match="disk full")


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "qwen-quantize --bits 4 Qwen/Qwen-14B-Chat --trust-remote-code" in out
    assert "qwen-quantize demo" in out and "--resume" in out


def test_a_good_run_uses_the_default_out_and_says_where(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["synthetic:tiny", "--nsamples", "2", "--seqlen", "32", "--group-size", "64"])
    assert e.value.code == 0
    out = tmp_path / "out" / "synthetic-tiny-gptq-int4-g64"
    err = capsys.readouterr().err
    assert f"checkpoint: {out}" in err and "block   1: mean rel. error" in err
    report = json.loads((out / "quant_report.json").read_text())
    assert report["model"]["synthetic"] is True
    assert report["command"].startswith("qwen-quantize synthetic:tiny")
    assert "SYNTHETIC" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["meta"]["synthetic"] is True and cfg["dtype"] == "bfloat16"
    # FFN 320 with groups of 64 divides; the report lists no partial groups
    assert report["downstream"]["partial_group_layers"] == []


def test_a_synthetic_model_is_streamed_from_tensors_made_when_read():
    """qwen-quantize synthetic:<shape> holds one block at a time: its tensors are made per name, the same on
    every read, for exactly the names (and shapes) of the real model at that shape."""
    import torch

    from qwen_quant.models.synthetic import SyntheticTensors, build_synthetic
    from qwen_quant.quantize.pipeline import StreamingModel

    tensors = SyntheticTensors("tiny")
    model = build_synthetic("tiny")
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == \
        {n: tensors.shape_dtype(n)[0] for n in tensors.names()}
    w = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(tensors.read(w), tensors.read(w)) and 0.015 < tensors.read(w).float().std() < 0.025
    assert not torch.equal(tensors.read(w), SyntheticTensors("tiny", seed=1).read(w))
    assert torch.equal(tensors.read("model.norm.weight"), torch.ones(128, dtype=torch.bfloat16))
    source = StreamingModel.synthetic("tiny")
    block = source.load_block(0, "cpu")
    assert torch.equal(block.mlp.down_proj.weight, tensors.read("model.layers.0.mlp.down_proj.weight"))
    source.release_block(0, block)
    assert block.mlp.down_proj.weight.device.type == "meta" and source.config_dict()["synthetic"] is True
