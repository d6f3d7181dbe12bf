"""The block-by-block pipeline, the checkpoint writer and resume, on tiny models built here."""

import errno
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from qwen_quant.errors import UserError
from qwen_quant.kernels.format import dequantize
from qwen_quant.quantize import api, pipeline, writer
from qwen_quant.quantize.calibration import Calibration
from qwen_quant.models.load import LoadedModel
from qwen_quant.models.specs import ModelSpec

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is ~10x faster than two when the box is busy (OpenMP contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_hf_model(model_type: str) -> nn.Module:
    """2 layers, hidden 64, FFN 96 (a partial last group at group size 64), fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
    if model_type == "qwen3":
        kw["head_dim"] = 16
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def loaded(model, name="tiny") -> LoadedModel:
    return LoadedModel(model, ModelSpec("dir", name, path=name), None, {"source": name, "synthetic": False})


def calibration(n=4, seqlen=16, pad_last=0, pad_id=0, seed=0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seqlen), generator=g)
    mask = torch.ones(n, seqlen, dtype=torch.long)
    if pad_last:
        ids[-1, -pad_last:] = pad_id
        mask[-1, -pad_last:] = 0
    return Calibration(ids, mask, {"source": "random token ids (test)", "nsamples": n, "seqlen": seqlen})


def run(model, out, **kw):
    kw.setdefault("calib", calibration())
    kw.setdefault("group_size", 32)
    return api.quantize(loaded(model), out, quiet=True, **kw)


def tensors_of(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_layouts_quantize_end_to_end_and_checkpoint_matches_the_quantized_weights(tmp_path, model_type):
    model = tiny_hf_model(model_type)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(model, tmp_path / "ckpt")
    t = tensors_of(out)
    layout = pipeline.InMemoryModel(model, __import__("qwen_quant.models.layouts", fromlist=["x"]).layout_for(model)).layout
    assert layout.name == model_type
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
    for i in range(2):
        for lin in layout.linear_names:
            p = f"model.layers.{i}.{lin}"
            assert f"{p}.weight" not in t
            k = model.get_submodule(p).in_features
            w = dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"], 4, k)
            # the model now holds the quantized weights the pipeline fed forward: the checkpoint must equal them
            torch.testing.assert_close(w, model.get_submodule(p).weight.detach(), rtol=0, atol=1e-6)
            assert not torch.equal(w, original[f"{p}.weight"])
            assert t[f"{p}.scales"].dtype == torch.float16 and t[f"{p}.g_idx"].dtype == torch.int32
            # act-order with static groups (the default) keeps g_idx in order: no kernel needs a permutation
            assert torch.equal(t[f"{p}.g_idx"], torch.arange(k, dtype=torch.int32) // 32)
            if model_type == "qwen2" and lin.endswith(("q_proj", "k_proj", "v_proj")):
                assert t[f"{p}.bias"].dtype == torch.float16
    # embeddings, norms, lm_head stay 16-bit (fp32 model -> fp16), unchanged apart from rounding
    torch.testing.assert_close(t["model.embed_tokens.weight"], original["model.embed_tokens.weight"].half())
    torch.testing.assert_close(t["lm_head.weight"], original["lm_head.weight"].half())
    assert t["model.norm.weight"].dtype == torch.float16
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["layers"]) == 2 * len(layout.linear_names)
    assert all(0 < layer["rel_error"] < 0.3 for layer in report["layers"])
    # FFN width 96 with groups of 32 divides; hidden 64 too: no partial groups reported
    assert report["downstream"]["partial_group_layers"] == []
    assert "SYNTHETIC" not in (out / "README.md").read_text()


def test_padding_never_enters_a_hessian(tmp_path):
    """Right padding with two different pad ids: the masked tokens must not change a single byte."""
    a = run(tiny_hf_model("llama"), tmp_path / "a", calib=calibration(pad_last=6, pad_id=3))
    b = run(tiny_hf_model("llama"), tmp_path / "b", calib=calibration(pad_last=6, pad_id=200))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = run(tiny_hf_model("llama"), tmp_path / "c", calib=calibration(pad_last=0))
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_gptq_beats_rtn_on_calibration_output_error(tmp_path):
    g = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "g") / "quant_report.json").read_text())
    r = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "r", method="rtn") / "quant_report.json").read_text())
    assert g["totals"]["mean_rel_error"] < r["totals"]["mean_rel_error"]
    # GPTQ's default is act-order with static groups; an RTN checkpoint claims neither
    assert (g["quantization_config"]["desc_act"], g["quantization_config"]["static_groups"]) == (True, True)
    assert (r["quantization_config"]["desc_act"], r["quantization_config"]["static_groups"]) == (False, False)


def test_act_group_aware_keeps_g_idx_in_order_and_says_so(tmp_path):
    """--act-group-aware: act-order by whole groups; the checkpoint's g_idx stays i // group_size, its config says
    act-order without scales fixed up front, and the run's record names the setting."""
    out = run(tiny_hf_model("qwen2"), tmp_path / "gar", act_group_aware=True)
    report = json.loads((out / "quant_report.json").read_text())
    assert (report["quantization_config"]["desc_act"], report["quantization_config"]["static_groups"]) == (True, False)
    assert report["settings"]["act_group_aware"] is True
    tensors = tensors_of(out)
    g_idx = [t for k, t in tensors.items() if k.endswith(".g_idx")]
    assert g_idx and all(torch.equal(g.long(), torch.arange(g.numel()) // 32) for g in g_idx)
    static = tensors_of(run(tiny_hf_model("qwen2"), tmp_path / "static"))
    assert any(not torch.equal(tensors[k], static[k]) for k in tensors if k.endswith(".qweight"))
    with pytest.raises(UserError, match="--act-group-aware"):
        run(tiny_hf_model("qwen2"), tmp_path / "bad", act_group_aware=True, desc_act=False)


def test_fp32_forwards_under_bf16_autocast_by_default_and_model_dtype_on_request(tmp_path, monkeypatch):
    """--forward-dtype: auto runs an fp32 model's calibration forwards in bf16 where the hardware has it
    natively (faster on CPUs with AMX and on GPUs), which changes the Hessians a little but not the
    quality; model keeps fp32."""
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: False)
    assert pipeline.forward_autocast(pipeline.QuantSettings(), torch.float32) is None
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: True)
    assert pipeline.forward_autocast(pipeline.QuantSettings(), torch.float32) == torch.bfloat16
    assert pipeline.forward_autocast(pipeline.QuantSettings(), torch.bfloat16) is None
    assert pipeline.forward_autocast(pipeline.QuantSettings(forward_dtype="model"), torch.float32) is None
    assert pipeline.forward_autocast(pipeline.QuantSettings(forward_dtype="bf16"), torch.float16) == torch.bfloat16
    auto = run(tiny_hf_model("llama"), tmp_path / "auto")
    fp32 = run(tiny_hf_model("llama"), tmp_path / "fp32", forward_dtype="model")
    assert (auto / "model.safetensors").read_bytes() != (fp32 / "model.safetensors").read_bytes()
    reports = [json.loads((d / "quant_report.json").read_text()) for d in (auto, fp32)]
    assert [r["settings"]["forward_dtype"] for r in reports] == ["auto", "model"]
    errors = [r["totals"]["mean_rel_error"] for r in reports]
    assert errors[0] == pytest.approx(errors[1], rel=0.1)


def test_thin_calibration_raises_each_layers_damping_by_inputs_over_tokens(tmp_path):
    """--damp-auto: damp = max(--damp, ALPHA x in_features / calibration tokens), per layer, in the report."""
    tokens = 4 * 16 - 6  # calibration(): 4 samples of 16, 6 padding tokens that never count
    auto = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "a", calib=calibration(pad_last=6), damp_auto=0.5)
                       / "quant_report.json").read_text())
    for layer in auto["layers"]:
        assert layer["damp_used"] == pytest.approx(min(max(0.01, 0.5 * layer["in_features"] / tokens), 0.95))
    assert auto["settings"]["damp_auto"] == 0.5
    assert "damping raised where calibration is thin" in (tmp_path / "a" / "README.md").read_text()  # the model card
    off = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "o", calib=calibration(pad_last=6), damp_auto=0.0)
                      / "quant_report.json").read_text())
    assert {layer["damp_used"] for layer in off["layers"]} == {0.01}
    assert off["totals"]["mean_rel_error"] != auto["totals"]["mean_rel_error"]


def test_relative_output_error_matches_a_direct_computation():
    torch.manual_seed(1)
    x = torch.randn(200, 32)
    w, q = torch.randn(8, 32), torch.randn(8, 32)
    h = 2 * x.T @ x / x.shape[0]
    direct = float((x @ (w - q).T).norm() / (x @ w.T).norm())
    assert pipeline.relative_output_error(w, q, h) == pytest.approx(direct, rel=1e-6)


# ---------------------------------------------------------------- Qwen v1 (remote code) layout

class _V1Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.c_attn = nn.Linear(h, 3 * h)
        self.c_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, rotary_pos_emb_list, attention_mask):
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q = q * rotary_pos_emb_list[0]
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + attention_mask
        return self.c_proj(s.softmax(-1) @ v)


class _V1MLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.w1, self.w2 = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.c_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * nn.functional.silu(self.w2(x)))


class _V1Block(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(h), _V1Attn(h), nn.LayerNorm(h), _V1MLP(h, f)

    def forward(self, hidden_states, layer_past=None, rotary_pos_emb_list=None, attention_mask=None, use_cache=False):
        h = hidden_states + self.attn(self.ln_1(hidden_states), rotary_pos_emb_list, attention_mask)
        return (h + self.mlp(self.ln_2(h)),)  # remote code returns a tuple


class TinyQwenV1(nn.Module):
    """QWenLMHeadModel's module names and call convention (positional hidden, kwargs, tuple outputs)."""

    def __init__(self, h=64, f=96, layers=2):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(vocab_size=VOCAB, hidden_size=h, seq_length=128)
        self.config.model_type = "qwen"
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(VOCAB, h)
        self.transformer.h = nn.ModuleList(_V1Block(h, f) for _ in range(layers))
        self.transformer.ln_f = nn.LayerNorm(h)
        self.lm_head = nn.Linear(h, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.transformer.wte(input_ids)
        L = x.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)
        rot = [torch.linspace(0.5, 1.5, x.shape[-1])]
        for block in self.transformer.h:
            x = block(x, layer_past=None, rotary_pos_emb_list=rot, attention_mask=causal, use_cache=use_cache)[0]
        return self.lm_head(self.transformer.ln_f(x))


def test_qwen_v1_layout_steps_resolve_and_quantize(tmp_path):
    from qwen_quant.models.layouts import layout_for

    torch.manual_seed(0)
    model = TinyQwenV1().eval()
    layout = layout_for(model)
    assert layout.name == "qwen"
    assert layout.steps[0] == ("attn.c_attn",)
    out = run(model, tmp_path / "v1")
    t = tensors_of(out)
    for i in range(2):
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            assert f"transformer.h.{i}.{lin}.qweight" in t
        assert t[f"transformer.h.{i}.attn.c_attn.bias"].shape == (192,)
    assert "transformer.wte.weight" in t and "lm_head.weight" in t


# ---------------------------------------------------------------- writer

def test_streaming_safetensors_writer_round_trips_every_dtype(tmp_path):
    ts = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).bfloat16(), "c": torch.arange(12, dtype=torch.int32).reshape(3, 4),
          "d": torch.randn(2, 2), "e": torch.zeros(0, 4, dtype=torch.float16)}
    entries = [writer.TensorEntry(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in ts.items()]
    writer.write_safetensors(tmp_path / "x.safetensors", entries, {"format": "pt"})
    back = tensors_of(tmp_path)
    for k, v in ts.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype
    ours = writer.SafetensorsFolder(tmp_path)
    assert all(torch.equal(ours.read(k), v) for k, v in ts.items())


def test_parse_size():
    assert writer.parse_size("2GB") == 2_000_000_000
    assert writer.parse_size("500MB") == 500_000_000
    assert writer.parse_size("1GiB") == 1 << 30
    assert writer.parse_size("64kb") == 64_000
    for bad in ("", "two GB", "-1GB", "0MB"):
        with pytest.raises(UserError):
            writer.parse_size(bad)


def test_sharding_writes_an_index_that_covers_every_tensor(tmp_path):
    one = run(tiny_hf_model("qwen2"), tmp_path / "one")
    many = run(tiny_hf_model("qwen2"), tmp_path / "many", max_shard_size="40KB")
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (many / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    a, b = tensors_of(one), tensors_of(many)
    assert set(index["weight_map"]) == set(a) == set(b)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    for f in shards:  # every shard under the limit unless one tensor alone is bigger
        with safe_open(str(f), "pt") as st:
            sizes = [st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1


def _leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_failure_mid_write_leaves_target_untouched_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    real = writer.write_safetensors

    def half_then_fail(path, entries, metadata=None):
        real(path, entries[: len(entries) // 2], metadata)
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(writer, "write_safetensors", half_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run(tiny_hf_model("llama"), target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    # the finished blocks stay for --resume; no half checkpoint folder is left
    assert [n for n in _leftovers(tmp_path, "ckpt") if "writing" in n] == []


def test_disk_full_removes_temp_and_leaves_target_untouched(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_safetensors", full)
    with pytest.raises(UserError, match="disk full"):
        run(tiny_hf_model("llama"), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert _leftovers(tmp_path, "ckpt") == []  # temp folder and block state both removed


def test_non_empty_target_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "x").write_text("x")
    monkeypatch.setattr(api, "open_model", lambda *a, **k: pytest.fail("loaded a model before checking the target"))
    with pytest.raises(UserError, match="--overwrite"):
        api.quantize("synthetic:tiny", tmp_path / "ckpt", quiet=True)


# ---------------------------------------------------------------- asymmetric calibration (GPTAQ)

def test_gptaq_checkpoint_holds_its_weights_and_tracks_the_fp_model_closer(tmp_path):
    """--gptaq: the same checkpoint format (it equals the weights fed forward), other weights than plain GPTQ,
    and the quantized model's last hidden states closer to the fp model's, on the calibration tokens and on
    fresh ones. (With 8 samples instead of 32, alpha 1 fits the calibration tokens better still but fresh
    ones worse than plain GPTQ: the full correction overfits few tokens, which is what alpha < 1 is for.)"""
    fp = tiny_hf_model("qwen2")
    plain_model, asym_model = tiny_hf_model("qwen2"), tiny_hf_model("qwen2")
    calib = calibration(n=32, seqlen=32)
    plain = run(plain_model, tmp_path / "plain", calib=calib, group_size=-1)
    asym = run(asym_model, tmp_path / "asym", calib=calib, group_size=-1, gptaq_alpha=1.0)
    t, t_plain = tensors_of(asym), tensors_of(plain)
    for i in range(2):
        p = f"model.layers.{i}.mlp.down_proj"
        k = asym_model.get_submodule(p).in_features
        w = dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"], 4, k)
        torch.testing.assert_close(w, asym_model.get_submodule(p).weight.detach(), rtol=0, atol=1e-6)
    assert not torch.equal(t["model.layers.1.mlp.down_proj.qweight"], t_plain["model.layers.1.mlp.down_proj.qweight"])
    report = json.loads((asym / "quant_report.json").read_text())
    assert report["settings"]["gptaq_alpha"] == 1.0
    assert "GPTAQ" in (asym / "README.md").read_text() and "GPTAQ" not in (plain / "README.md").read_text()
    assert "gptaq_alpha" not in json.loads((plain / "quant_report.json").read_text())["settings"]
    assert "gptaq_alpha" not in json.loads((asym / "config.json").read_text())["quantization_config"]  # format unchanged

    for ids in (calib.input_ids, calibration(n=8, seqlen=32, seed=5).input_ids):
        with torch.no_grad():
            ref = fp.model(input_ids=ids).last_hidden_state.double()
            errors = [float((m.model(input_ids=ids).last_hidden_state.double() - ref).norm() / ref.norm())
                      for m in (plain_model, asym_model)]
        assert errors[1] < 0.9 * errors[0]


def test_gptaq_resume_writes_the_same_bytes_and_rtn_refuses_it(tmp_path, monkeypatch):
    """The fp stream is part of the saved state: a resumed asymmetric run is byte-identical."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    full = run(tiny_hf_model("qwen2"), tmp_path / "full", gptaq_alpha=0.25)
    monkeypatch.setenv(pipeline.STOP_AFTER_BLOCK_ENV, "0")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_hf_model("qwen2"), tmp_path / "part", gptaq_alpha=0.25)
    monkeypatch.delenv(pipeline.STOP_AFTER_BLOCK_ENV)
    with pytest.raises(UserError, match="cannot resume.*settings"):
        run(tiny_hf_model("qwen2"), tmp_path / "part", resume=True)  # the interrupted run had --gptaq
    resumed = run(tiny_hf_model("qwen2"), tmp_path / "part", gptaq_alpha=0.25, resume=True)
    assert (full / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="round-to-nearest"):
        run(tiny_hf_model("qwen2"), tmp_path / "rtn", method="rtn", gptaq_alpha=0.25)
    with pytest.raises(UserError, match="outside"):
        run(tiny_hf_model("qwen2"), tmp_path / "big", gptaq_alpha=2)


def test_rtn_massive_rounds_to_nearest_exactly_the_layers_whose_input_peak_exceeds_the_ratio(tmp_path):
    """--rtn-massive RATIO --no-rtn-massive-thin: a GPTQ run rounds to nearest the linears whose recorded input peak
    is above RATIO (the very bytes an RTN run gives them: RTN reads no inputs), GPTQ elsewhere; recorded per layer,
    in the totals and in the model card; 0 turns it off."""
    calib = calibration(n=8, seqlen=32)
    plain = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "g", calib=calib, rtn_massive=0)
                        / "quant_report.json").read_text())
    peaks = {layer["name"]: layer["input_peak"] for layer in plain["layers"]}
    assert {layer["method"] for layer in plain["layers"]} == {"gptq"}
    ratio = 2.0  # q/k/v see RMS-normed inputs (peak 1.0); o_proj and down_proj spread more on random tokens
    assert min(peaks.values()) <= ratio < max(peaks.values())
    out = run(tiny_hf_model("qwen2"), tmp_path / "m", calib=calib, rtn_massive=ratio, rtn_massive_thin=False)
    report = json.loads((out / "quant_report.json").read_text())
    methods = {layer["name"]: layer["method"] for layer in report["layers"]}
    for layer in report["layers"]:  # the rule as stated, on the peaks this run measured
        assert (layer["method"] == "rtn-massive") == (layer["input_peak"] > ratio)
    massive = [n for n, m in methods.items() if m == "rtn-massive"]
    assert massive == report["totals"]["rtn_massive_layers"] and massive and "gptq" in methods.values()
    run(tiny_hf_model("qwen2"), tmp_path / "r", calib=calib, method="rtn")
    rtn, gptq_, mixed = (tensors_of(tmp_path / d) for d in ("r", "g", "m"))
    for name in massive:
        for part in ("qweight", "qzeros", "scales"):
            assert torch.equal(mixed[f"{name}.{part}"], rtn[f"{name}.{part}"]), name
    qkv = "model.layers.0.self_attn.q_proj"  # block 0's first step: the same inputs as the plain run, GPTQ there
    assert methods[qkv] == "gptq" and torch.equal(mixed[f"{qkv}.qweight"], gptq_[f"{qkv}.qweight"])
    assert report["settings"]["rtn_massive"] == ratio and report["settings"]["rtn_massive_thin"] is False
    assert "rtn_massive" not in plain["settings"] and "rtn_massive_thin" not in plain["settings"]
    assert "massive activations" in (out / "README.md").read_text()
    with pytest.raises(UserError, match="rtn-massive"):
        run(tiny_hf_model("qwen2"), tmp_path / "bad", rtn_massive=-1)


def test_rtn_massive_thin_waits_for_thin_calibration_and_the_default_does_not(tmp_path):
    """--rtn-massive-thin: the rule fires only where a layer has fewer calibration tokens than inputs. With 256
    tokens against 64-96 inputs nothing changes; with 48 tokens the layers above the ratio are rounded. The default
    (the thin condition off) rounds them at any calibration size, as the test above runs it."""
    ample = run(tiny_hf_model("qwen2"), tmp_path / "a", calib=calibration(n=8, seqlen=32), rtn_massive=2.0,
                rtn_massive_thin=True)
    plain = run(tiny_hf_model("qwen2"), tmp_path / "g", calib=calibration(n=8, seqlen=32), rtn_massive=0)
    assert (ample / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    thin = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "t", calib=calibration(n=2, seqlen=24), rtn_massive=2.0,
                           rtn_massive_thin=True) / "quant_report.json").read_text())
    for layer in thin["layers"]:
        assert (layer["method"] == "rtn-massive") == (layer["input_peak"] > 2.0 and 48 < layer["in_features"])
    assert thin["totals"]["rtn_massive_layers"]
    assert "calibration is thin" in (tmp_path / "t" / "README.md").read_text()
    defaults = api.QuantSettings()  # qwen-quantize's defaults: the rule on at 3.0, at any calibration size
    assert (defaults.rtn_massive, defaults.rtn_massive_thin) == (3.0, False)
    assert defaults.run_settings()["rtn_massive"] == 3.0 and defaults.run_settings()["rtn_massive_thin"] is False
    from qwen_quant.quantize.cli import build_parser

    parse = build_parser().parse_args
    assert api.QuantSettings.from_args(parse(["m", "--rtn-massive-thin"])).rtn_massive_thin is True
    assert api.QuantSettings.from_args(parse(["m", "--no-rtn-massive-thin"])).rtn_massive_thin is False


def test_shrink_is_recorded_changes_the_weights_and_rtn_refuses_it(tmp_path):
    """--shrink reaches GPTQ (other bytes than a plain run), is named in run_settings and the model card only when
    on, and is refused where there is no Hessian to shrink."""
    shrunk = run(tiny_hf_model("qwen2"), tmp_path / "s", shrink=0.5)
    plain = run(tiny_hf_model("qwen2"), tmp_path / "p")
    assert (shrunk / "model.safetensors").read_bytes() != (plain / "model.safetensors").read_bytes()
    assert json.loads((shrunk / "quant_report.json").read_text())["settings"]["shrink"] == 0.5
    assert "shrink" not in json.loads((plain / "quant_report.json").read_text())["settings"]
    assert "shrunk toward their diagonal" in (shrunk / "README.md").read_text()
    assert "shrunk toward" not in (plain / "README.md").read_text()
    with pytest.raises(UserError, match="--shrink"):
        api.QuantSettings(method="rtn", shrink=0.5)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(UserError, match="--shrink .* invalid"):
            api.QuantSettings(shrink=bad)
    assert api.QuantSettings(shrink="0.25").shrink == 0.25 and api.QuantSettings(shrink=" AUTO").shrink == "auto"


def test_shrink_auto_gives_each_layer_its_calibrations_ledoit_wolf_intensity(tmp_path):
    """--shrink auto: each GPTQ layer's recorded shrink is the intensity of its own calibration samples (in (0, 1),
    differing between layers), the run equals one at that fixed value where the layer's value is the same, and the
    model card gives the range."""
    auto = run(tiny_hf_model("qwen2"), tmp_path / "a", shrink="auto")
    report = json.loads((auto / "quant_report.json").read_text())
    used = [layer["shrink"] for layer in report["layers"]]
    assert report["settings"]["shrink"] == "auto"
    assert all(0 < u < 1 for u in used) and len(set(used)) > 3
    assert "Ledoit-Wolf intensity" in (auto / "README.md").read_text()
    plain = json.loads((run(tiny_hf_model("qwen2"), tmp_path / "p") / "quant_report.json").read_text())
    assert {layer["shrink"] for layer in plain["layers"]} == {0.0}
    # block 0's first step sees the same inputs in both runs: a fixed shrink at its intensity gives its weights
    first = report["layers"][0]
    fixed = run(tiny_hf_model("qwen2"), tmp_path / "f", shrink=first["shrink"])
    key = f"{first['name']}.qweight"
    assert torch.equal(tensors_of(auto)[key], tensors_of(fixed)[key])


def test_refit_scales_lowers_every_layers_error_where_the_inputs_are_the_same_and_rtn_refuses_it(tmp_path):
    """--refit-scales: the checkpoint still holds exactly the weights fed forward; on block 0's first step (inputs
    identical with and without the refit) every linear's output error is lower; recorded, and in the model card."""
    plain = run(tiny_hf_model("qwen2"), tmp_path / "plain", calib=calibration(n=8, seqlen=32))
    model = tiny_hf_model("qwen2")
    refit = run(model, tmp_path / "refit", calib=calibration(n=8, seqlen=32), refit_scales=True)
    t = tensors_of(refit)
    p = "model.layers.1.mlp.down_proj"
    w = dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"], 4,
                   model.get_submodule(p).in_features)
    torch.testing.assert_close(w, model.get_submodule(p).weight.detach(), rtol=0, atol=1e-6)
    errors = [{s["name"]: s["rel_error"] for s in json.loads((f / "quant_report.json").read_text())["layers"]}
              for f in (plain, refit)]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert errors[1][f"model.layers.0.self_attn.{name}"] < errors[0][f"model.layers.0.self_attn.{name}"]
    assert sum(errors[1].values()) < sum(errors[0].values())
    assert json.loads((refit / "quant_report.json").read_text())["settings"]["refit_scales"] is True
    assert "refit_scales" not in json.loads((plain / "quant_report.json").read_text())["settings"]
    assert "scales refitted" in (refit / "README.md").read_text()
    with pytest.raises(UserError, match="round-to-nearest"):
        run(tiny_hf_model("qwen2"), tmp_path / "rtn", method="rtn", refit_scales=True)


# ---------------------------------------------------------------- resume

def test_resume_after_interruption_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    full = run(tiny_hf_model("qwen2"), tmp_path / "full", desc_act=True)

    monkeypatch.setenv(pipeline.STOP_AFTER_BLOCK_ENV, "0")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_hf_model("qwen2"), tmp_path / "part", desc_act=True)
    assert not (tmp_path / "part").exists()
    state = tmp_path / ".part.qwen-quant-state"
    assert (state / "block-00000.safetensors").is_file() and not (state / "block-00001.safetensors").exists()

    monkeypatch.delenv(pipeline.STOP_AFTER_BLOCK_ENV)
    quantized_blocks = []
    real = pipeline.quantize_block
    monkeypatch.setattr(pipeline, "quantize_block", lambda block, *a, **k: quantized_blocks.append(1) or real(block, *a, **k))
    resumed = run(tiny_hf_model("qwen2"), tmp_path / "part", desc_act=True, resume=True)
    assert len(quantized_blocks) == 1  # only block 1 was redone
    assert not state.exists()
    for name in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (full / name).read_bytes() == (resumed / name).read_bytes(), name


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.STOP_AFTER_BLOCK_ENV, "0")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_hf_model("llama"), tmp_path / "x")
    monkeypatch.delenv(pipeline.STOP_AFTER_BLOCK_ENV)
    with pytest.raises(UserError, match="cannot resume"):
        run(tiny_hf_model("llama"), tmp_path / "x", resume=True, bits=8)


# ---------------------------------------------------------------- streaming from a safetensors folder

@pytest.mark.parametrize("gptaq_alpha", [0.0, 0.25])
def test_streaming_a_safetensors_folder_gives_the_same_checkpoint_as_in_memory(tmp_path, monkeypatch, gptaq_alpha):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model = tiny_hf_model("qwen2")
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")  # sharded source
    from transformers import AutoModelForCausalLM

    in_memory = run(AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32), tmp_path / "mem",
                    gptaq_alpha=gptaq_alpha)
    loaded_calls = []
    monkeypatch.setattr(pipeline.StreamingModel, "load_block",
                        lambda self, i, d, real=pipeline.StreamingModel.load_block: loaded_calls.append(i) or real(self, i, d))
    # the folder has no tokenizer: pass the same prepared calibration
    streamed = api.quantize(str(tmp_path / "src"), tmp_path / "stream", calib=calibration(), group_size=32, quiet=True,
                            gptaq_alpha=gptaq_alpha)
    assert loaded_calls == [0, 1]
    a, b = tensors_of(in_memory), tensors_of(streamed)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- --lm-head: the output head quantized too

def _head_from(t: dict, k: int) -> torch.Tensor:
    return dequantize(t["lm_head.qweight"], t["lm_head.qzeros"], t["lm_head.scales"], t["lm_head.g_idx"], 4, k)


@pytest.mark.parametrize("model_type,tied", [("qwen2", False), ("llama", True)])
def test_lm_head_is_quantized_on_the_final_norms_outputs_and_loads_as_a_quant_linear(tmp_path, monkeypatch,
                                                                                     model_type, tied):
    from qwen_quant.kernels.loader import load_quantized
    from qwen_quant.kernels.quant_linear import QuantLinear

    def model():
        m = tiny_hf_model(model_type)
        if tied:
            m.config.tie_word_embeddings = True
            m.tie_weights()
            assert m.lm_head.weight is m.model.embed_tokens.weight
        return m

    original = model().state_dict()
    out = run(model(), tmp_path / "ckpt", lm_head=True)
    t = tensors_of(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["lm_head"] is True and cfg["tie_word_embeddings"] is False
    assert "lm_head.weight" not in t and t["lm_head.qweight"].shape == (64 // 8, VOCAB)
    # the embeddings stay 16-bit (a tied model keeps them: only the head is quantized)
    torch.testing.assert_close(t["model.embed_tokens.weight"], original["model.embed_tokens.weight"].half())
    head = _head_from(t, 64)
    rel = (head - original["lm_head.weight"]).norm() / original["lm_head.weight"].norm()
    assert 0 < rel < 0.2
    report = json.loads((out / "quant_report.json").read_text())
    assert report["layers"][-1]["name"] == "lm_head" and 0 < report["layers"][-1]["rel_error"] < 0.3
    assert "the output head (lm_head) is quantized too" in (out / "README.md").read_text()

    # GPTQ treats every output row on its own given H: slicing the head's rows changes no byte
    monkeypatch.setattr(pipeline, "HEAD_ROWS", 96)  # 256 rows in slices of 96, 96, 64
    sliced = run(model(), tmp_path / "sliced", lm_head=True)
    assert (sliced / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # our loader makes the head a QuantLinear: logits are the final norm's output times the dequantized head
    loaded_model = load_quantized(out, backend="torch", dtype=torch.float32)
    assert isinstance(loaded_model.lm_head, QuantLinear)
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        res = loaded_model(ids, output_hidden_states=True)
    torch.testing.assert_close(res.logits, res.hidden_states[-1] @ head.T, rtol=1e-4, atol=1e-4)


def test_lm_head_default_off_keeps_the_16_bit_head(tmp_path):
    out = run(tiny_hf_model("qwen2"), tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["lm_head"] is False and "lm_head.weight" in tensors_of(out)


def test_lm_head_streamed_equals_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    tiny_hf_model("qwen2").save_pretrained(tmp_path / "src")
    from transformers import AutoModelForCausalLM

    mem = run(AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32), tmp_path / "mem", lm_head=True)
    streamed = api.quantize(str(tmp_path / "src"), tmp_path / "stream", calib=calibration(), group_size=32, quiet=True,
                            lm_head=True)
    a, b = tensors_of(mem), tensors_of(streamed)
    assert set(a) == set(b) and "lm_head.qweight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bits", [3, 8])
def test_lm_head_slices_pack_to_the_same_bytes_at_other_widths(tmp_path, monkeypatch, bits):
    """3-bit qzeros words span 32 columns: slices of a multiple of 32 rows pack exactly as the whole head."""
    whole = run(tiny_hf_model("qwen2"), tmp_path / "whole", lm_head=True, bits=bits)
    monkeypatch.setattr(pipeline, "HEAD_ROWS", 96)
    sliced = run(tiny_hf_model("qwen2"), tmp_path / "sliced", lm_head=True, bits=bits)
    assert (sliced / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
