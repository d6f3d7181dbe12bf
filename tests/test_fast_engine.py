"""The fast engine (engine/) against transformers, on the CPU.

References: transformers' own generate / forward on the same weights, in float32. Tokens must be
identical (greedy); logits agree to float32 noise (we allow 1e-3 absolute on logits of size ~10-30,
which is far below any real difference: a wrong rope, mask or norm moves them by > 0.1).
"""

from __future__ import annotations

import math
import time
import types

import pytest
import torch
import torch.nn as nn

from qwen_quant.errors import UserError
from qwen_quant.engine.fast import FastEngine
from qwen_quant.engine.generate import Generator, Sampling, generate
from qwen_quant.engine.model import logn_scales, ntk_alpha_for
from qwen_quant.engine.weights import from_hf_model, from_state_dict
from tiny_models import random_ids
from tiny_models import tiny_causal_lm as tiny_hf

LOGIT_TOL = 1e-3
PROMPT = "The old lighthouse keeper looked at the sea and said"


def hf_greedy(model, ids, n):
    """transformers generate, greedy, exactly n tokens -> (new tokens [B, n], logits per step)."""
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], [x.float() for x in out.logits]


def assert_same_generation(model, ids, n):
    ref_tokens, ref_logits = hf_greedy(model, ids, n)
    out = Generator(model, ids.shape[1] + n).generate_ids(ids, n, return_logits=True)
    assert torch.equal(out.tokens, ref_tokens)
    assert len(out.logits) == n
    worst = max((a - b).abs().max().item() for a, b in zip(out.logits, ref_logits))
    assert worst < LOGIT_TOL, f"logits differ by {worst}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models gain nothing from a second thread, and on a busy 2-core box OpenMP's spinning makes
    two threads many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo():
    from qwen_quant.models.load import load_model

    loaded = load_model("demo", dtype=torch.float32)
    ids = torch.tensor([loaded.encode(PROMPT)])
    return loaded, ids


# ---------------------------------------------------------------- the demo model (reference and Int4)

@pytest.mark.slow
def test_demo_greedy_matches_transformers(demo):
    loaded, ids = demo
    assert_same_generation(loaded.model, ids, 64)


@pytest.mark.slow
def test_demo_int4_greedy_matches_transformers_on_the_same_quantized_model(demo):
    """The demo's first 4 blocks, RTN Int4 on the torch backend (which dequantizes at every call: all 30
    blocks would take minutes for 2 x 64 tokens), against transformers generate on the same model."""
    from qwen_quant.kernels.quant_linear import QuantLinear
    from qwen_quant.quantize.gptq import rtn_quantize
    from qwen_quant.models.layouts import blocks_of, layout_for
    from qwen_quant.models.load import load_model

    model = load_model("demo", dtype=torch.float32).model
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    layout = layout_for(model)
    for block in blocks_of(model, layout):
        for name in layout.linear_names:
            lin = block.get_submodule(name)
            q = rtn_quantize(lin.weight.detach(), bits=4, group_size=128, sym=True)
            new = QuantLinear.from_quant(q.codes, q.scales, q.zeros, q.g_idx, lin.bias, 4, 128, dtype=torch.float32)
            new.set_backend("torch")
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, new)
    # and a quantized output head (qwen-quantize --lm-head), untied from the 16-bit embeddings
    q = rtn_quantize(model.lm_head.weight.detach(), bits=4, group_size=128, sym=True)
    model.lm_head = QuantLinear.from_quant(q.codes, q.scales, q.zeros, q.g_idx, None, 4, 128, dtype=torch.float32)
    model.lm_head.set_backend("torch")
    model.config.tie_word_embeddings = False
    fast = from_hf_model(model)
    assert isinstance(fast.blocks[0].attn.q_proj, QuantLinear)  # the engine runs the Int4 layers themselves
    assert isinstance(fast.lm_head, QuantLinear)
    assert_same_generation(model, demo[1], 64)


# ---------------------------------------------------------------- other layouts

@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_layouts_match_transformers_logits_and_tokens(kind):
    model = tiny_hf(kind, tie_word_embeddings=kind == "llama")
    ids = random_ids(12)
    fast = from_hf_model(model)
    fast.setup_caches(1, 32)
    with torch.no_grad():
        got = fast(ids, torch.arange(12), kv_len=12, last_only=False)
        want = model(ids).logits
    assert (got - want).abs().max().item() < LOGIT_TOL
    assert_same_generation(model, ids, 10)


def test_rope_scaling_is_taken_from_the_model():
    model = tiny_hf("qwen2", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    assert_same_generation(model, random_ids(9), 8)


class _V1Block(nn.Module):
    """A Qwen v1 decoder block's module names (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1/w2/c_proj)."""

    def __init__(self, layer):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.ln_1, self.ln_2 = layer.input_layernorm, layer.post_attention_layernorm
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(a.q_proj.in_features, 3 * a.q_proj.out_features)
        self.attn.c_attn.weight.data = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        self.attn.c_attn.bias.data = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        self.attn.c_proj = a.o_proj
        self.mlp = nn.Module()
        self.mlp.w1, self.mlp.w2, self.mlp.c_proj = m.up_proj, m.gate_proj, m.down_proj  # w2 is the gate


def qwen_v1_tree(hf_qwen2):
    """The module tree and config keys of Qwen v1 (QWenLMHeadModel) over a Qwen2 model's MHA weights."""
    cfg = hf_qwen2.config
    root = nn.Module()
    root.config = types.SimpleNamespace(
        model_type="qwen", hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_hidden_layers=cfg.num_hidden_layers, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        rotary_pct=1.0, rotary_emb_base=cfg.rope_parameters["rope_theta"], layer_norm_epsilon=cfg.rms_norm_eps,
        vocab_size=cfg.vocab_size, seq_length=2048, use_logn_attn=True, use_dynamic_ntk=True)
    root.transformer = nn.Module()
    root.transformer.wte = hf_qwen2.model.embed_tokens
    root.transformer.h = nn.ModuleList(_V1Block(layer) for layer in hf_qwen2.model.layers)
    root.transformer.ln_f = hf_qwen2.model.norm
    root.lm_head = hf_qwen2.lm_head
    return root


def test_qwen_v1_names_give_the_qwen2_logits():
    hf = tiny_hf("qwen2", num_key_value_heads=4)  # Qwen v1 is multi-head attention
    ids = random_ids(12)
    fast = from_hf_model(qwen_v1_tree(hf))
    assert fast.blocks[0].attn.qkv is not None  # the fused c_attn is used as one projection
    fast.setup_caches(1, 24)
    with torch.no_grad():
        got = fast(ids, torch.arange(12), kv_len=12, last_only=False)
        want = hf(ids).logits
    assert (got - want).abs().max().item() < LOGIT_TOL
    out = Generator(fast, 24).generate_ids(ids, 8)
    assert torch.equal(out.tokens, hf_greedy(hf, ids, 8)[0])


def test_qwen_v1_long_context_helpers():
    # log-n scaling: 1 within the training length, log_L(n) past it
    s = logn_scales(8, 12, torch.float64, "cpu")
    assert torch.all(s[:8] == 1) and abs(s[11].item() - math.log(12) / math.log(8)) < 1e-12
    assert logn_scales(8, 8, torch.float32, "cpu") is None
    # dynamic NTK alpha as Qwen v1 computes it: 2^ceil(log2(T/L) + 1) - 1
    assert ntk_alpha_for(2048, 2048) == 1.0
    assert ntk_alpha_for(2049, 2048) == 3.0
    assert ntk_alpha_for(4097, 2048) == 7.0


def test_state_dict_gives_the_same_logits_as_the_model():
    hf = tiny_hf("qwen3")
    ids = random_ids(10)
    a, b = from_hf_model(hf), from_state_dict(dict(hf.state_dict()), hf.config)
    for m in (a, b):
        m.setup_caches(1, 16)
    with torch.no_grad():
        la = a(ids, torch.arange(10), kv_len=10, last_only=False)
        lb = b(ids, torch.arange(10), kv_len=10, last_only=False)
    assert torch.equal(la, lb)
    with pytest.raises(UserError, match="no weight"):
        sd = dict(hf.state_dict())
        del sd["model.layers.1.mlp.up_proj.weight"]
        from_state_dict(sd, hf.config)


# ---------------------------------------------------------------- the static cache

def test_cache_boundary_exact_fit_works_and_one_more_is_a_clear_error():
    model = tiny_hf("qwen2")
    ids = random_ids(7)
    gen = Generator(model, max_seq_len=7 + 9)
    out = gen.generate_ids(ids, 9)  # prompt + new tokens == max_seq_len exactly
    assert out.tokens.shape == (1, 9)
    assert torch.equal(out.tokens, hf_greedy(model, ids, 9)[0])
    with pytest.raises(UserError, match="exceeds the KV cache of 16 positions"):
        gen.generate_ids(ids, 10)
    with pytest.raises(UserError, match="exceeds"):
        gen.generate_ids(random_ids(16), 1)


def test_unwritten_cache_slots_are_never_read():
    model = tiny_hf("qwen3")
    ids = random_ids(6)
    gen = Generator(model, max_seq_len=20)
    clean = gen.generate_ids(ids, 14, return_logits=True)
    for block in gen.model.blocks:  # poison every slot: prefill and decode must overwrite before reading
        block.attn.kv_cache.k.fill_(float("nan"))
        block.attn.kv_cache.v.fill_(float("nan"))
    poisoned = gen.generate_ids(ids, 14, return_logits=True)
    assert torch.equal(clean.tokens, poisoned.tokens)
    assert all(torch.equal(a, b) for a, b in zip(clean.logits, poisoned.logits))


def test_bucketed_reads_as_in_cuda_graphs_give_the_same_logits():
    """Graph replays read the cache up to a bucket's end and mask the rest: same result as exact reads."""
    model = tiny_hf("llama")
    ids = random_ids(5)
    exact = Generator(model, 40).generate_ids(ids, 30, return_logits=True)
    gen = Generator(model, 40, bucket=8)
    step = gen.step_for(Sampling())
    step.bucketed = True
    assert [step.kv_len_for(p) for p in (5, 7, 8, 38, 39)] == [8, 8, 16, 40, 40]
    bucketed = gen.generate_ids(ids, 30, return_logits=True)
    assert torch.equal(exact.tokens, bucketed.tokens)
    assert max((a - b).abs().max().item() for a, b in zip(exact.logits, bucketed.logits)) < 1e-4


def test_fused_decode_ops_trace_as_one_graph_each_and_agree():
    """The GPU decode step compiles its element-wise ops (fullgraph); traced here without codegen."""
    from qwen_quant.engine.model import compiled_ops

    model = tiny_hf("qwen3")
    ids = random_ids(6)
    eager = Generator(model, 20).generate_ids(ids, 10, return_logits=True)
    gen = Generator(model, 20)
    gen.model.decode_ops = compiled_ops(backend="aot_eager")
    fused = gen.generate_ids(ids, 10, return_logits=True)
    assert torch.equal(eager.tokens, fused.tokens)
    assert max((a - b).abs().max().item() for a, b in zip(eager.logits, fused.logits)) < 1e-4


def test_int8_kv_cache_stays_close():
    model = tiny_hf("llama")
    ids = random_ids(10)
    ref = Generator(model, 40).generate_ids(ids, 24, return_logits=True)
    gen = Generator(model, 40, kv_cache="int8")
    assert gen.model.blocks[0].attn.kv_cache.k.dtype == torch.int8
    int8 = gen.generate_ids(ids, 24, return_logits=True)
    # compare while the tokens still agree (afterwards the two runs see different inputs)
    same = int((ref.tokens == int8.tokens).cumprod(dim=1).sum())
    assert same >= 8, f"int8 KV cache diverged after {same} tokens"
    rel = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref.logits[:same], int8.logits[:same]))
    assert 0 < rel < 0.05, f"int8 KV cache moves logits by {rel:.4f} of their range"


def test_unknown_kv_cache_kind_is_a_user_error():
    with pytest.raises(UserError, match="unknown KV cache"):
        FastEngine(tiny_hf("qwen2"), 16, "cpu", kv_cache="int4")


# ---------------------------------------------------------------- sampling and stopping

def test_sampling():
    model = tiny_hf("qwen2")
    ids = random_ids(4)
    gen = Generator(model, 40)
    greedy = gen.generate_ids(ids, 20).tokens
    assert torch.equal(gen.generate_ids(ids, 20, Sampling(temperature=1.0, top_k=1)).tokens, greedy)
    assert torch.equal(gen.generate_ids(ids, 20, Sampling(temperature=1.0, top_p=1e-6)).tokens, greedy)
    torch.manual_seed(3)
    a = gen.generate_ids(ids, 20, Sampling(temperature=5.0)).tokens
    torch.manual_seed(3)
    b = gen.generate_ids(ids, 20, Sampling(temperature=5.0)).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy)  # hot sampling from 200 tokens: 20 argmax picks in a row is ~impossible
    with pytest.raises(UserError):
        Sampling(temperature=-1)


def test_stops_at_eos_with_a_check_every_few_tokens():
    model = tiny_hf("qwen2")
    ids = random_ids(4)
    gen = Generator(model, 40)
    full = gen.generate_ids(ids, 30).tokens[0].tolist()
    k = 9
    eos = full[k]
    first = full.index(eos)
    out = gen.generate_ids(ids, 30, eos_ids=(eos,), eos_check_every=4)
    assert out.finish_reason == "eos"
    assert out.tokens[0].tolist() == full[:first + 1]


# ---------------------------------------------------------------- public API and profile engine

def test_public_generate_with_text_and_with_ids(demo):
    import qwen_quant

    loaded, ids = demo
    res = qwen_quant.generate(loaded.model, PROMPT, 8, tokenizer=loaded.tokenizer, stop_at_eos=False)
    assert len(res.token_ids) == 8 and res.finish_reason == "length"
    assert res.prompt_ids == ids[0].tolist()
    assert res.text == loaded.decode(res.token_ids)
    again = generate(loaded.model, ids[0].tolist(), 8, stop_at_eos=False)
    assert again.token_ids == res.token_ids and again.text is None
    with pytest.raises(UserError, match="tokenizer"):
        generate(loaded.model, "text", 4)


def test_fast_engine_timed_generate_contract():
    model = tiny_hf("qwen3")
    ids = random_ids(5)
    for kv in ("auto", "int8"):
        engine = FastEngine(model, 5 + 12, "cpu", kv_cache=kv)
        r = engine.timed_generate(ids, 12)
        assert r["tokens"].shape == (1, 12) and len(r["token_s"]) == 11
        assert r["prefill_s"] > 0 and all(t > 0 for t in r["token_s"])
    assert torch.equal(FastEngine(model, 17, "cpu").timed_generate(ids, 12)["tokens"], hf_greedy(model, ids, 12)[0])


def test_cpu_decode_speed_vs_hf_generate(capsys):
    """Benchmark figure (printed, not asserted): the issue asks for >= 1.5x HF generate on synthetic:tiny."""
    from qwen_quant.models.load import load_model

    model = load_model("synthetic:tiny", dtype=torch.float32).model
    ids = random_ids(8, vocab=1000)
    n = 48
    engine = FastEngine(model, 8 + n, "cpu")
    engine.timed_generate(ids, 4)  # warm-up
    r = engine.timed_generate(ids, n)
    fast = len(r["token_s"]) / sum(r["token_s"])
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    t2 = time.perf_counter()
    hf = (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9)
    with capsys.disabled():
        print(f"\n[fast engine, CPU, synthetic:tiny fp32] decode {fast:.1f} tok/s vs HF generate {hf:.1f} tok/s "
              f"= {fast / hf:.2f}x (goal >= 1.5x)")
    assert r["tokens"].shape == (1, n)
