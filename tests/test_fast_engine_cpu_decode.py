"""The fast engine's CPU decode step: host-int positions (no mask), the vectorized greedy argmax and the
packed bf16 products, each against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen_quant.engine.generate import Generator, Sampling, greedy
from qwen_quant import workarounds
from qwen_quant.engine.model import PackedLinear, for_decode, packable
from qwen_quant.engine.weights import from_hf_model
from tiny_models import random_ids, tiny_causal_lm

VOCAB = 256


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_qwen2(dtype=torch.float32):
    return tiny_causal_lm("qwen2", dtype, vocab_size=VOCAB)


def ids(n):
    return random_ids(n, vocab=VOCAB)


@pytest.mark.parametrize("vocab", [151936, 49152, 1000, 128, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_with_first_index_on_ties(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g).to(dtype)
    logits[1, vocab // 3] = logits[1, vocab - 1] = 50  # a tie: the first index wins, as in argmax
    logits[2, :] = 0  # all equal: index 0
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert greedy(logits)[1].item() == vocab // 3 and greedy(logits)[2].item() == 0


def test_a_prompt_in_chunks_gives_the_logits_of_one_pass():
    """Host-int positions after earlier tokens (T > 1, start > 0) mask causally with the offset."""
    model = tiny_qwen2()
    x = ids(12)
    fast = from_hf_model(model)
    fast.setup_caches(1, 16)
    with torch.no_grad():
        whole = fast(x, 0, last_only=False)
        first = fast(x[:, :5], 0, last_only=False)
        rest = fast(x[:, 5:], 5, last_only=False)
        by_device_positions = fast(x, torch.arange(12), kv_len=12, last_only=False)
    assert (torch.cat([first, rest], dim=1) - whole).abs().max().item() < 1e-4
    assert (by_device_positions - whole).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="exactly 12"):
        fast(x, 0, kv_len=16)


needs_bf16 = pytest.mark.skipif(not packable(nn.Linear(8, 8).to(torch.bfloat16)),
                                reason="this CPU's oneDNN has no native bf16: plain linears are used")


@needs_bf16
def test_packed_linears_are_only_plain_bf16_cpu_linears_and_compute_their_products():
    lins = [nn.Linear(64, n, bias=b).to(torch.bfloat16) for n, b in ((40, True), (24, False), (24, True))]
    packed = for_decode(*lins)
    assert isinstance(packed, PackedLinear) and packed.out_features == 88
    for dtype in (torch.float32, torch.float16):  # fp32 and fp16 stay the modules they are
        other = nn.Linear(64, 40).to(dtype)
        assert for_decode(other) is other and not packable(other)
    hooked = nn.Linear(64, 40).to(torch.bfloat16)
    hooked.register_forward_hook(lambda *a: None)
    assert for_decode(hooked) is hooked  # hooks must run: the module is called as it is
    head = nn.Linear(64, 40).to(torch.bfloat16)
    head.register_forward_pre_hook(workarounds._canonical_strides)  # what every loaded model's lm_head carries
    assert isinstance(for_decode(head), PackedLinear)  # it changes strides, never values: still packed
    with pytest.raises(ValueError, match="packed together"):
        for_decode(lins[0], hooked)
    for shape in [(1, 1, 64), (1, 3, 64), (2, 5, 64)]:  # a decode row, a prefill, a batch
        x = torch.randn(shape).to(torch.bfloat16)
        want = torch.cat([F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
                          for lin in lins], dim=-1)
        got = packed(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_bf16_model_on_the_cpu_decodes_like_transformers():
    model = tiny_qwen2(torch.bfloat16)
    x = ids(9)
    gen = Generator(model, 9 + 12)
    block = gen.model.blocks[0]
    if packable(model.lm_head):  # where oneDNN has native bf16: packed products, q/k/v and gate/up fused
        assert isinstance(gen.model.lm_head, PackedLinear) and isinstance(block.attn.qkv, PackedLinear)
        assert isinstance(block.mlp.gate_up, PackedLinear) and block.attn.q_proj is None
    out = gen.generate_ids(x, 12, return_logits=True)
    ref = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    # compare while the tokens agree (bf16 rounding may break a near-tie later); most of them must
    same = int((out.tokens == ref.sequences[:, 9:]).cumprod(dim=1).sum())
    assert same >= 8, f"bf16 decode diverged from transformers after {same} tokens"
    scale = max(r.float().abs().max().item() for r in ref.logits[:same])
    worst = max((a - b.float()).abs().max().item() for a, b in zip(out.logits[:same], ref.logits[:same]))
    assert worst < 0.03 * scale, f"bf16 logits differ by {worst} (scale {scale})"


@needs_bf16
@pytest.mark.parametrize("tied", [False, True])
def test_an_engine_that_owns_its_model_keeps_one_copy_of_each_weight_and_the_same_tokens(tied):
    """qwen-profile's fast cells: the dense weights behind the packed ones are dropped (meta), the tokens
    unchanged; a head tied to the embeddings keeps the table the engine still reads for its inputs."""
    from qwen_quant.engine.fast import FastEngine

    def model():
        m = tiny_qwen2(torch.bfloat16)
        if tied:
            m.lm_head.weight = m.model.embed_tokens.weight
        return m

    x = ids(7)
    want = FastEngine(model(), 7 + 10).timed_generate(x, 10)["tokens"]
    owned = model()
    engine = FastEngine(owned, 7 + 10, owns_model=True)
    got = engine.timed_generate(x, 10)["tokens"]
    assert torch.equal(got, want)
    assert owned.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # dropped: packed with k, v
    assert owned.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert owned.model.embed_tokens.weight.device.type == "cpu"  # the engine's embedding
    assert (owned.lm_head.weight.device.type == "cpu") == tied
    with pytest.raises(RuntimeError, match="handed to the fast engine"):  # the borrowed model can no longer run
        owned(x)


def test_returned_tokens_are_ordinary_tensors():
    """generate_ids runs under inference_mode; what it returns can still be written to outside it."""
    model = tiny_qwen2()
    out = Generator(model, 16).generate_ids(ids(4), 6)
    out.tokens.add_(0)  # an inference tensor would raise here


def test_host_and_device_positions_agree_with_qwen_v1_logn_scaling():
    """The eager step (host-int positions, exact reads) and the bucketed one (device positions, masked reads,
    as replayed in CUDA graphs) give the same tokens and logits, with Qwen v1's log-n query scaling on."""
    model = tiny_qwen2()
    runs = []
    for bucketed in (False, True):
        fast = from_hf_model(model)
        fast.args.logn_seq_length = 6  # queries past position 6 are scaled: both paths must index q_scale alike
        gen = Generator(fast, 32, bucket=8)
        assert gen.model.q_scale is not None
        gen.step_for(Sampling()).bucketed = bucketed
        runs.append(gen.generate_ids(ids(5), 20, return_logits=True))
    eager, bucketed = runs
    assert torch.equal(eager.tokens, bucketed.tokens)
    assert max((a - b).abs().max().item() for a, b in zip(eager.logits, bucketed.logits)) < 1e-4
