"""CUDA C++ Int4 backend: real nvcc build for sm_80/sm_90a, ctypes load, and CPU emulation of the
kernels' index math (the re-layout + each kernel's per-lane reads, fragments and writes) against a
float64 reference. Real GPU runs only where torch sees a GPU.

The four tests on the real build are marked slow (the nvcc build takes ~15 s of CPU for sm_80 +
sm_90a; CI still runs them). Tolerances: the emulators run in float64 and must match the float64 reference to 1e-9 relative
(they replay index math, not rounding). On a GPU the kernels accumulate in fp32 and round once to
the output dtype: |err| <= ulp(dtype) * |ref| + 2^-18 * (|x| @ |W|^T) (cuda_backend.output_tolerance).
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qwen_quant.errors import UserError
from qwen_quant.kernels import cuda_backend as cb
from qwen_quant.kernels.format import dequantize

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if cb.find_nvcc() is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH in CI: the CUDA sources must be build-checked there")
        pytest.skip("nvcc not installed on this machine (CI has it)")
    return cb.build_library(archs=cb.CI_ARCHS, out_dir=tmp_path_factory.mktemp("cuda_build"))


@pytest.mark.slow  # one real nvcc build for two archs: ~15 s CPU, more on a busy machine
def test_nvcc_builds_for_sm80_and_sm90a_without_spills(built):
    assert built.path.is_file() and not built.cached
    log = built.log
    assert "for 'sm_80'" in log and "for 'sm_90a'" in log
    spill_lines = [line for line in log.splitlines() if "spill stores" in line]
    assert spill_lines, "ptxas -v output missing"
    assert all("0 bytes spill stores, 0 bytes spill loads" in line for line in spill_lines), log
    # a second build with unchanged sources is a cache hit
    again = cb.build_library(archs=cb.CI_ARCHS, out_dir=built.path.parent)
    assert again.cached and again.path == built.path


@pytest.mark.slow
def test_library_loads_and_exposes_launchers(built):
    lib = cb.KernelLibrary(built.path)
    for name in cb.KernelLibrary.SYMBOLS:
        assert hasattr(lib.lib, name)
    assert "bad shape" in lib.error_string(10001)
    assert lib.error_string(0).lower().startswith("no error")


@pytest.mark.slow
def test_launcher_checks_arguments_before_any_cuda_call(built):
    lib = cb.KernelLibrary(built.path).lib
    fake = ctypes.c_void_p(4096)  # never dereferenced: argument checks come first
    args = dict(variant=0, dtype=0, device=-1, x=fake, M=1, K=128, w=fake, groups=fake, perm=None,
                shift=5, n_pad=16, N=16, y=fake, stream=None)

    def call(**over):
        a = {**args, **over}
        return lib.qq_int4_matmul(*a.values())

    assert call(M=0) == 10001 and call(M=17) == 10001 and call(K=100) == 10001
    assert call(N=17) == 10001 and call(shift=3) == 10001
    assert call(w=ctypes.c_void_p(4104)) == 10002  # weights must be 16-byte aligned
    assert call(variant=7) == 10003
    assert call(dtype=5) != 0


@pytest.mark.slow
def test_sass_has_tensor_core_mma_and_lop3(built):
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(cuobjdump) if cuobjdump.is_file() else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump to read the SASS")
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", str(built.path)], capture_output=True, text=True,
                          timeout=120).stdout
    mma_part = sass[sass.index("int4_mma_kernel"):]
    assert "HMMA.16816.F32" in mma_part and "LOP3" in mma_part
    assert "LDG.E.128" in sass and "LDL" not in sass and "STL" not in sass  # 16-byte loads, no local memory


def test_available_says_why_without_a_gpu():
    if HAS_GPU:
        pytest.skip("a GPU is present")
    ok, reason = cb.available()
    assert ok is False and "GPU" in reason


def test_supports():
    assert cb.supports(4096, 11008, 4, 128, True)
    assert cb.supports(576, 40, 4, 128, False)      # partial last group is fine
    assert cb.supports(128, 7, 4, -1, False)        # odd N is padded
    assert not cb.supports(4096, 4096, 3, 128, False)
    assert not cb.supports(100, 64, 4, 32, False)   # K % 64
    assert not cb.supports(4096, 64, 4, 40, False)  # group not a multiple of 16


def test_prepare_rejects_what_it_cannot_run():
    layer = cb.random_layer(96, 16, 32, False)
    with pytest.raises(UserError, match="in_features % 64"):
        cb.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 32)
    layer = cb.random_layer(128, 16, 32, False)
    with pytest.raises(UserError, match="variant"):
        cb.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 32, variant="fast")


@pytest.mark.parametrize("group", [64, 32])  # "chunk rows" and "unit rows" numbering
def test_relayout_puts_each_code_where_the_fragment_formula_says(group):
    layer = cb.random_layer(192, 40, group, True, seed=3)
    state = cb.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, group)
    assert state.n_pad == 48 and state.scale_block_rows == group and state.perm is not None
    assert state.chunk_rows == (group >= 64)
    words = state.weight.view(3, 3, 32, 4).to(torch.int64) & 0xFFFFFFFF
    k, n = cb.fragment_coords(chunk_rows=state.chunk_rows)
    shifts = torch.arange(0, 32, 4).view(1, 1, 8)
    expect = torch.nn.functional.pad(layer["codes"][state.perm.long()], (0, 8))  # kernel row order, padded N
    for nb in range(3):
        for kc in range(3):
            nib = (words[nb, kc].unsqueeze(-1) >> shifts) & 15  # [lane, u, i]
            assert torch.equal(nib, expect[kc * 64 + k, nb * 16 + n].long())
    # every scale block holds one group, in kernel row order
    groups = layer["g_idx"].long()[state.perm.long()]
    block = torch.arange(192) >> state.scale_block_shift
    col = torch.arange(40)
    entry = state.groups[block.view(-1, 1), (col // 16).view(1, -1), (col % 8).view(1, -1)]  # [K, N, 4]
    half = (col % 16 // 8).view(1, -1)
    assert torch.equal(entry.gather(2, (2 * half).expand(192, 40).unsqueeze(2)).squeeze(2), layer["scales"][groups])
    assert torch.equal(entry.gather(2, (2 * half + 1).expand(192, 40).unsqueeze(2)).squeeze(2),
                       layer["zeros"][groups].half())


CASES = [  # K, N, group, act_order, M, dtype
    (64, 16, 32, False, 1, torch.float16),
    (128, 40, 32, True, 5, torch.bfloat16),
    (192, 24, 64, True, 8, torch.float16),
    (576, 24, 128, False, 16, torch.float16),   # partial last group (the demo model's 576 / 128)
    (256, 8, -1, False, 9, torch.bfloat16),
    (256, 56, 128, True, 3, torch.bfloat16),
    (128, 16, 16, True, 12, torch.float16),
    (192, 40, 48, True, 2, torch.bfloat16),     # group not a power of two: 16-row table blocks
    (576, 24, -1, False, 4, torch.float16),     # g = -1 with K not a power of two
]


@pytest.mark.parametrize("variant", cb.VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}-N{c[1]}-g{c[2]}-act{int(c[3])}-M{c[4]}-{str(c[5])[6:]}")
def test_emulated_kernel_matches_float64_reference(case, variant):
    k_total, n, group, act, rows, dtype = case
    layer = cb.random_layer(k_total, n, group, act, seed=k_total * n + rows)
    state = cb.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, group)
    x = torch.randn(rows, k_total, generator=torch.Generator().manual_seed(rows)).to(dtype)
    w = dequantize(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, k_total,
                   dtype=torch.float64)[:n]
    ref = x.double() @ w.T
    got = cb.emulate(x, state, variant)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_emulation_reads_gptq_v2_zeros():
    layer = cb.random_layer(128, 24, 32, False, seed=9)
    from qwen_quant.kernels.format import pack_qzeros

    qzeros_v2 = pack_qzeros(layer["zeros"], 4, v1=False)  # true zeros, no "minus one"
    state = cb.prepare(layer["qweight"], qzeros_v2, layer["scales"], layer["g_idx"], 4, 32, v1=False)
    x = torch.randn(2, 128).half()
    ref = cb.reference_matmul(x, layer["codes"], layer["zeros"], layer["scales"], layer["g_idx"])
    torch.testing.assert_close(cb.emulate(x, state, "mma"), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", cb.VARIANTS)
def test_emulation_catches_a_corrupted_layout(variant):
    """Negative control: the emulation is sensitive to where each byte sits."""
    layer = cb.random_layer(128, 16, 32, False, seed=5)
    state = cb.prepare(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], 4, 32)
    words = state.weight.view(1, 2, 32, 4).clone()
    words[0, 0, 3, [1, 2]] = words[0, 0, 3, [2, 1]]  # one lane's two units swapped
    broken = cb.CudaInt4Weights(**{**state.__dict__, "weight": words.reshape(-1)})
    x = torch.randn(3, 128).half()
    ref = cb.reference_matmul(x, layer["codes"], layer["zeros"], layer["scales"], layer["g_idx"])
    assert (cb.emulate(x, broken, variant) - ref).abs().max() > 1e-4


def test_warp_ranges_cover_every_chunk_once():
    for k_chunks in (1, 2, 3, 7, 9, 64, 172, 214, 296):
        n_warps = cb.warps_per_block(k_chunks)
        covered = [c for begin, end in cb.warp_chunk_ranges(k_chunks, n_warps) for c in range(begin, end)]
        assert covered == list(range(k_chunks))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exponent_trick_gives_exact_code_minus_zero(dtype):
    codes = torch.arange(16)
    word = (codes.view(16, 1) | (codes.flip(0).view(1, 16) << 16)).reshape(-1)  # every (lo, hi) pair
    for zero in (0, 1, 8, 15, 16):  # v1 can decode a true zero of 16
        bias = {torch.float16: 1024.0, torch.bfloat16: 128.0}[dtype] + zero
        pairs = cb._magic_dequant(word, 0, torch.full(word.shape, bias, dtype=torch.float64), dtype)
        assert torch.equal(pairs[:, 0], (word & 15).double() - zero)
        assert torch.equal(pairs[:, 1], ((word >> 16) & 15).double() - zero)


# ----------------------------------------------------------------------------- real GPU (where present)

@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", cb.VARIANTS)
@pytest.mark.parametrize("case", CASES + [(4096, 1000, 128, True, 16, torch.bfloat16)], ids=str)
def test_gpu_kernel_matches_float64_reference(case, variant):
    ok, reason = cb.available()
    assert ok, reason
    k_total, n, group, act, rows, dtype = case
    layer = cb.random_layer(k_total, n, group, act, seed=k_total + n)
    dev = torch.device("cuda")
    state = cb.prepare(*(layer[key].to(dev) for key in ("qweight", "qzeros", "scales", "g_idx")), 4, group,
                       variant=variant)
    x = torch.randn(rows, k_total).to(dtype)
    got = cb.matmul(x.to(dev), state).double().cpu()
    truth = (layer["codes"], layer["zeros"], layer["scales"], layer["g_idx"])
    ref, abs_ref = cb.reference_matmul(x, *truth), cb.reference_matmul(x, *truth, absolute=True)
    assert ((got - ref).abs() <= cb.output_tolerance(ref, abs_ref, dtype)).all()


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_gpu_matmul_is_graph_capturable():
    layer = cb.random_layer(256, 48, 64, True)
    dev = torch.device("cuda")
    state = cb.prepare(*(layer[key].to(dev) for key in ("qweight", "qzeros", "scales", "g_idx")), 4, 64)
    x = torch.randn(4, 256, device=dev, dtype=torch.float16)
    eager = cb.matmul(x, state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cb.matmul(x, state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
