"""CUDA C++ Int4 backend (batch 1-16): kernels in kernels/cuda/*.cu, built with nvcc at first use.

Nothing is compiled at install. The first call on a GPU builds one shared library for the device's
architecture into a cache folder ($QWEN_QUANT_CACHE/cuda, else ~/.cache/qwen_quant/cuda; the file name
carries a hash of the sources, the architectures and the nvcc version), loads it with ctypes (plain
CUDA, no torch headers: the CPU torch wheel cannot build torch extensions) and runs a small
self-check of each kernel variant against a float64 reference. A variant that fails is disabled
with one warning; if none works, or nvcc or a GPU is missing, `available()` says why and the caller
uses Triton.

Variants (pick with `variant=` or $QWEN_QUANT_CUDA_VARIANT): "mma" (tensor cores, the default) and
"simple" (fp32 FMA over the same bytes, the safe fallback).

The weight re-layout (`prepare`) is plain torch and runs on any device; `emulate` replays each
kernel's per-thread index math in float64 on the CPU, which is how the tests check a kernel that
cannot run here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path

import torch

from qwen_quant.errors import UserError
from qwen_quant.files import atomic_path

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
VARIANTS = ("mma", "simple")
VARIANT_ENV = "QWEN_QUANT_CUDA_VARIANT"
CI_ARCHS = ("80", "90a")  # what CI builds to prove the sources compile
CHUNK_K = 64              # rows of K per 16-byte lane load (int4_common.cuh kChunkK)
BLOCK_N = 16              # output columns per thread block (kBlockN)
MAX_WARPS = 8             # kMaxWarps
SIMPLE_ROWS = 4           # batch rows per launch of the simple kernel (kSimpleRows)
MAX_ROWS_PER_CALL = 16    # batch rows per launcher call
_VARIANT_CODE = {"mma": 0, "simple": 1}
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}


# ----------------------------------------------------------------------------- building

def cache_dir() -> Path:
    """Where built libraries live: the cuda/ folder of the shared cache (qwen_quant.files.cache_dir)."""
    from qwen_quant.files import cache_dir as shared

    return shared() / "cuda"


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def source_files() -> list[Path]:
    return sorted([*SOURCE_DIR.glob("*.cu"), *SOURCE_DIR.glob("*.cuh")])


def arch_for_capability(major: int, minor: int) -> str:
    """nvcc arch suffix for a device: Hopper gets the 'a' target (all of its instructions)."""
    return f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"


def gencode_flags(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    path: Path
    log: str        # nvcc/ptxas output (register use, spills) of a fresh build; "" when cached
    seconds: float
    cached: bool


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"


def build_library(archs=CI_ARCHS, out_dir: Path | None = None, nvcc: str | None = None,
                  force: bool = False) -> BuildResult:
    """Compile kernels/cuda into a shared library (cached by sources + archs + nvcc version).

    Raises RuntimeError with nvcc's last lines when the build fails, UserError when nvcc is absent.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise UserError("nvcc not found: install the CUDA toolkit (or set CUDA_HOME) to use backend='cuda'")
    main = SOURCE_DIR / "int4_launch.cu"
    flags = ["-shared", "-Xcompiler", "-fPIC", "-O3", "--threads", "2", "-Xptxas", "-v",
             "-std=c++17", *gencode_flags(archs)]
    digest = hashlib.sha256()
    for f in source_files():
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    digest.update(" ".join(flags).encode() + _nvcc_version(nvcc).encode())
    out_dir = Path(out_dir) if out_dir else cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"qq_int4_{'_'.join(archs)}_{digest.hexdigest()[:16]}.so"
    if target.is_file() and not force:
        return BuildResult(target, "", 0.0, True)
    start = time.perf_counter()
    with atomic_path(target) as tmp:  # a reader never sees half a library
        proc = subprocess.run([nvcc, *flags, "-o", str(tmp), str(main)], capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = " | ".join(line for line in log.strip().splitlines()[-4:])
            raise RuntimeError(f"nvcc failed (exit {proc.returncode}): {tail}")
    return BuildResult(target, log, time.perf_counter() - start, False)


class KernelLibrary:
    """ctypes view of the extern "C" launchers in int4_launch.cu."""

    SYMBOLS = ("qq_int4_abi_version", "qq_int4_error_string", "qq_int4_preload", "qq_int4_matmul")
    ABI_VERSION = 1

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.qq_int4_abi_version.restype = ctypes.c_int
        self.lib.qq_int4_error_string.restype = ctypes.c_char_p
        self.lib.qq_int4_error_string.argtypes = [ctypes.c_int]
        self.lib.qq_int4_preload.restype = ctypes.c_int
        self.lib.qq_int4_preload.argtypes = [ctypes.c_int]
        self.lib.qq_int4_matmul.restype = ctypes.c_int
        i, p = ctypes.c_int, ctypes.c_void_p
        self.lib.qq_int4_matmul.argtypes = [i, i, i, p, i, i, p, p, p, i, i, i, p, p]
        if self.lib.qq_int4_abi_version() != self.ABI_VERSION:
            raise RuntimeError(f"{self.path} has ABI {self.lib.qq_int4_abi_version()}, expected {self.ABI_VERSION}")

    def error_string(self, code: int) -> str:
        return self.lib.qq_int4_error_string(code).decode()

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"CUDA Int4 {what} failed: {self.error_string(code)} (code {code})")

    def preload(self, device: int) -> None:
        self.check(self.lib.qq_int4_preload(device), "kernel preload")


# ----------------------------------------------------------------------------- re-layout

@dataclasses.dataclass(frozen=True)
class CudaInt4Weights:
    """One linear layer re-laid for the kernels (see int4_common.cuh for the byte layout)."""

    weight: torch.Tensor          # int32 [n_pad/16 * K/64 * 32 * 4]
    groups: torch.Tensor          # fp16 [K >> shift, n_pad/16, 8, 4]: (scale, zero) of column g, then g + 8
    perm: torch.Tensor | None     # int32 [K]: kernel row k reads activation column perm[k]; None = identity
    in_features: int
    out_features: int
    n_pad: int
    scale_block_shift: int        # log2 of the rows sharing one group-table row (a group, or part of one)
    variant: str

    @property
    def scale_block_rows(self) -> int:
        return 1 << self.scale_block_shift

    @property
    def chunk_rows(self) -> bool:
        """Rows numbered per chunk (table blocks span whole chunks), see int4_common.cuh."""
        return chunk_rows_for(self.scale_block_shift)


def chunk_rows_for(scale_block_shift: int) -> bool:
    """Mirror of the kernels' `block_shift >= 6` switch."""
    return scale_block_shift >= 6


def supports(in_features: int, out_features: int, bits: int, group_size: int, desc_act: bool = False) -> bool:
    """Shapes the kernels take: 4 bits, K a multiple of 64, groups a multiple of 16 (or -1).

    A partial last group (K not a multiple of the group size) is fine; desc_act either way.
    """
    return (bits == 4 and in_features > 0 and in_features % CHUNK_K == 0 and out_features > 0
            and (group_size == -1 or (group_size > 0 and group_size % 16 == 0)))


def _unpack_nibbles_along_k(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """qweight int32 [K/8, N] -> codes int32 [K, N] (row 8r+j in bits 4j..4j+3), on qweight's device."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15
    return codes.reshape(-1, qweight.shape[1])[:in_features]


def _unpack_nibbles_along_n(qzeros: torch.Tensor, out_features: int) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=qzeros.device, dtype=torch.int32)
    vals = (qzeros.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15
    return vals.reshape(qzeros.shape[0], -1)[:, :out_features]


def fragment_coords(chunk_rows: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, n) inside a 64 x 16 chunk of the code held by nibble i of word u of lane `lane`: [32, 4, 8].

    Mirrors int4_common.cuh: n = g + 8 (s & 1); k = fragment_row(u, t, r = s >> 1, hi), i.e.
    16 u + 2 t + 8 r + hi ("unit rows") or 16 t + 4 u + 2 r + hi ("chunk rows").
    """
    lane = torch.arange(32, device=device).view(32, 1, 1)
    u = torch.arange(4, device=device).view(1, 4, 1)
    i = torch.arange(8, device=device).view(1, 1, 8)
    g, t, s, hi = lane // 4, lane % 4, i % 4, i // 4
    k = fragment_row(0, u, t, s // 2, hi, chunk_rows)
    n = g + 8 * (s % 2)
    return k.expand(32, 4, 8), n.expand(32, 4, 8)


def fragment_row(chunk, u, t, r, hi, chunk_rows: bool):
    """Mirror of fragment_row in int4_common.cuh (works on ints and tensors)."""
    if chunk_rows:
        return chunk * CHUNK_K + 16 * t + 4 * u + 2 * r + hi
    return chunk * CHUNK_K + 16 * u + 2 * t + 8 * r + hi


def relayout_codes(codes: torch.Tensor, chunk_rows: bool) -> torch.Tensor:
    """codes int [K, n_pad] (K % 64 == 0, n_pad % 16 == 0) -> the kernels' int32 words, flat."""
    k_total, n_pad = codes.shape
    chunks, blocks = k_total // CHUNK_K, n_pad // BLOCK_N
    tiles = codes.reshape(chunks, CHUNK_K, blocks, BLOCK_N).permute(2, 0, 1, 3)  # [nb, kc, 64, 16]
    k, n = fragment_coords(chunk_rows, codes.device)
    nibbles = tiles[:, :, k, n].to(torch.int64)                                # [nb, kc, 32, 4, 8]
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)                  # uint32 bits as int32
    return words.to(torch.int32).reshape(-1).contiguous()


def _scale_block_rows(sorted_groups: torch.Tensor, group_size: int) -> tuple[int, torch.Tensor]:
    """Largest power-of-two row block (>= 16) in which every kernel-order row has one group.

    Returns (rows, group of each block). Regular checkpoints get the group size itself (g = -1: the
    largest power of two dividing K), so the table is no bigger than the scales.
    """
    k_total = sorted_groups.numel()
    first_choice = (k_total & -k_total) if group_size == -1 else group_size
    for rows in (first_choice, 64, 32, 16):
        if rows < 16 or rows & (rows - 1):
            continue
        first = sorted_groups[::rows]
        if torch.equal(first.repeat_interleave(rows)[:k_total], sorted_groups):
            return rows, first.long()
    raise UserError("g_idx has groups that do not start on a multiple of 16 rows: the cuda backend "
                    "cannot run this layer; use backend='triton' or 'torch'")


def prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
            bits: int, group_size: int, v1: bool = True, variant: str | None = None) -> CudaInt4Weights:
    """Re-lay one layer's GPTQ tensors once (on their device) for the kernels.

    Act-order: input rows are sorted by group so groups are contiguous; the permutation goes in the
    state and the kernel gathers activations through it. v1=False reads gptq_v2 (true) zero points.
    On a GPU this also builds and self-checks the kernels at first use (see `available`).
    """
    n = qweight.shape[1]
    k_total = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
    if not supports(k_total, n, bits, group_size):
        raise UserError(f"cuda backend cannot run bits={bits}, in_features={k_total}, group_size={group_size} "
                        "(needs 4 bits, in_features % 64 == 0, group_size % 16 == 0 or -1): use backend='triton'")
    return relayout(qweight, qzeros, scales, g_idx, group_size, v1, _resolve_variant(variant, qweight.device))


def relayout(qweight, qzeros, scales, g_idx, group_size: int, v1: bool, variant: str) -> CudaInt4Weights:
    """The re-layout half of `prepare` (4-bit, shapes already checked); touches no GPU runtime."""
    n = qweight.shape[1]
    k_total = g_idx.numel() if g_idx is not None else qweight.shape[0] * 8
    device = qweight.device
    codes = _unpack_nibbles_along_k(qweight.to(torch.int32), k_total)
    zeros = _unpack_nibbles_along_n(qzeros.to(torch.int32), n) + (1 if v1 else 0)
    if g_idx is None:
        g_idx = torch.arange(k_total, device=device) // (k_total if group_size == -1 else group_size)
    g_idx = g_idx.to(device=device, dtype=torch.int64)
    perm = torch.argsort(g_idx, stable=True)
    identity = torch.equal(perm, torch.arange(k_total, device=device))
    if not identity:
        codes = codes[perm]
    rows, block_group = _scale_block_rows(g_idx[perm], group_size)
    n_pad = -(-n // BLOCK_N) * BLOCK_N
    pad = n_pad - n
    codes = torch.nn.functional.pad(codes, (0, pad))
    scales_r = torch.nn.functional.pad(scales[block_group].to(torch.float16), (0, pad))
    zeros_r = torch.nn.functional.pad(zeros[block_group].to(torch.float16), (0, pad))
    return CudaInt4Weights(
        weight=relayout_codes(codes, chunk_rows_for(rows.bit_length() - 1)), groups=group_table(scales_r, zeros_r),
        perm=None if identity else perm.to(torch.int32).contiguous(),
        in_features=k_total, out_features=n, n_pad=n_pad, scale_block_shift=rows.bit_length() - 1,
        variant=variant)


def group_table(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[blocks, n_pad] scales and zeros -> [blocks, n_pad/16, 8 (g), 4]: (s, z) of column g, then of g + 8.

    One 8-byte load per lane per k16 unit (int4_common.cuh, "Group table").
    """
    blocks, n_pad = scales.shape
    pairs = torch.stack([scales, zeros], dim=-1).view(blocks, n_pad // BLOCK_N, 2, 8, 2)  # [b, nb, cs, g, (s,z)]
    return pairs.permute(0, 1, 3, 2, 4).reshape(blocks, n_pad // BLOCK_N, 8, 4).contiguous()


# ----------------------------------------------------------------------------- runtime

class _Runtime:
    """The built library plus the variants that passed their self-check (one per process)."""

    def __init__(self, library: KernelLibrary | None, good: tuple[str, ...], reason: str):
        self.library, self.good, self.reason = library, good, reason


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _make_runtime() -> _Runtime:
    if not torch.cuda.is_available():
        return _Runtime(None, (), "no CUDA GPU is visible to torch")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return _Runtime(None, (), f"the GPU has compute capability {major}.{minor}; the kernels need 8.0+ (mma.sync bf16)")
    if find_nvcc() is None:
        return _Runtime(None, (), "nvcc not found (install the CUDA toolkit or set CUDA_HOME) to build the kernels")
    try:
        built = build_library(archs=(arch_for_capability(major, minor),))
        library = KernelLibrary(built.path)
        library.preload(torch.cuda.current_device())
    except Exception as exc:  # a failed build or load means "use Triton", never a crash
        return _Runtime(None, (), f"building/loading the CUDA kernels failed: {exc}")
    good, failures = [], []
    for variant in VARIANTS:
        problem = self_check(library, variant)
        (failures.append(f"{variant}: {problem}") if problem else good.append(variant))
    if failures:
        warnings.warn("CUDA Int4 kernel variant(s) disabled after a failed self-check: " + "; ".join(failures),
                      RuntimeWarning, stacklevel=3)
    if not good:
        return _Runtime(None, (), "every CUDA kernel variant failed its self-check")
    return _Runtime(library, tuple(good), f"built {built.path.name}; variants {', '.join(good)}")


def _get_runtime() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _make_runtime()
        return _runtime


def available() -> tuple[bool, str]:
    """(True, what) when the kernels are built, loaded and self-checked on this GPU, else (False, why)."""
    rt = _get_runtime()
    return rt.library is not None, rt.reason


def _resolve_variant(variant: str | None, device: torch.device) -> str:
    variant = variant or os.environ.get(VARIANT_ENV) or None
    if variant is not None and variant not in VARIANTS:
        raise UserError(f"unknown CUDA kernel variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if device.type != "cuda":
        return variant or VARIANTS[0]  # CPU: re-layout only (emulation, tests)
    rt = _get_runtime()
    if rt.library is None:
        raise UserError(f"the cuda backend is not available: {rt.reason}; use backend='triton'")
    if variant is None:
        return rt.good[0]
    if variant not in rt.good:
        raise UserError(f"CUDA kernel variant {variant!r} failed its self-check on this GPU; use {rt.good[0]!r}")
    return variant


def _launch(library: KernelLibrary, variant: str, x2d: torch.Tensor, state: CudaInt4Weights,
            out: torch.Tensor) -> None:
    stream = torch.cuda.current_stream(x2d.device).cuda_stream
    perm = state.perm.data_ptr() if state.perm is not None else None
    for m0 in range(0, x2d.shape[0], MAX_ROWS_PER_CALL):  # row slices of contiguous tensors stay contiguous
        xs, ys = x2d[m0:m0 + MAX_ROWS_PER_CALL], out[m0:m0 + MAX_ROWS_PER_CALL]
        code = library.lib.qq_int4_matmul(
            _VARIANT_CODE[variant], _DTYPE_CODE[x2d.dtype], x2d.device.index, xs.data_ptr(), xs.shape[0],
            state.in_features, state.weight.data_ptr(), state.groups.data_ptr(), perm,
            state.scale_block_shift, state.n_pad, state.out_features, ys.data_ptr(), stream)
        library.check(code, f"matmul ({variant}, M={xs.shape[0]}, K={state.in_features}, N={state.out_features})")


def matmul(x2d: torch.Tensor, state: CudaInt4Weights, variant: str | None = None) -> torch.Tensor:
    """y[M, N] = x2d[M, K] @ W^T in x2d's dtype (fp16 or bf16). No host sync; only `y` is allocated.

    Meant for M <= 16 (one launch); larger M runs in slices of 16 rows.
    """
    if x2d.dtype not in _DTYPE_CODE:
        raise UserError(f"cuda backend takes fp16 or bf16 activations, got {x2d.dtype}")
    if x2d.dim() != 2 or x2d.shape[1] != state.in_features:
        raise UserError(f"activations of shape {tuple(x2d.shape)} do not match in_features={state.in_features}")
    if not x2d.is_cuda or x2d.device != state.weight.device:
        raise UserError("cuda backend: activations and weights must be on the same CUDA device")
    rt = _get_runtime()
    if rt.library is None:
        raise UserError(f"the cuda backend is not available: {rt.reason}; use backend='triton'")
    variant = variant or state.variant
    if variant not in rt.good:
        raise UserError(f"CUDA kernel variant {variant!r} is disabled on this GPU; use one of {rt.good}")
    if not x2d.is_contiguous() or x2d.data_ptr() % 16:  # the kernels read x with 16-byte loads
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    out = torch.empty(x2d.shape[0], state.out_features, dtype=x2d.dtype, device=x2d.device)
    _launch(rt.library, variant, x2d, state, out)
    return out


# ----------------------------------------------------------------------------- self-check

def reference_matmul(x2d: torch.Tensor, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """float64 y = x @ W^T with W[n, k] = scales[g, n] (codes[k, n] - zeros[g, n]), g = g_idx[k].

    absolute=True gives |x| @ |W|^T, the scale of the partial sums (for tolerances).
    """
    g = g_idx.long().cpu()
    w = scales.double().cpu()[g] * (codes.double().cpu() - zeros.double().cpu()[g])  # [K, N]
    x = x2d.double().cpu()
    return x.abs() @ w.abs() if absolute else x @ w


def output_tolerance(ref: torch.Tensor, abs_ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Allowed |y - ref|: one rounding of the output to `dtype` (one ulp) + fp32 summation error.

    abs_ref = |x| @ |W|^T bounds the size of the partial sums.
    """
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    return ulp * ref.abs() + 2.0**-18 * abs_ref + 1e-6


def random_layer(k_total: int, n: int, group_size: int, act_order: bool, seed: int = 0):
    """Random GPTQ tensors (v1 zeros) with their unpacked truth, for self-checks and tests."""
    from qwen_quant.kernels.format import num_groups, pack_qweight, pack_qzeros

    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(k_total, group_size)
    codes = torch.randint(0, 16, (k_total, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 16, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).to(torch.float16)
    size = k_total if group_size == -1 else group_size
    g_idx = (torch.arange(k_total) // size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k_total, generator=gen)]
    n_packed = -(-n // 8) * 8
    qzeros = pack_qzeros(torch.nn.functional.pad(zeros, (0, n_packed - n), value=1), 4)
    return dict(qweight=pack_qweight(codes, 4), qzeros=qzeros, scales=scales, g_idx=g_idx,
                codes=codes, zeros=zeros)


SELF_CHECK_CASES = ((128, 40, 32, True, 1), (192, 24, 64, False, 5), (256, 16, -1, False, 16), (128, 48, 128, True, 11))


def self_check(library: KernelLibrary, variant: str) -> str | None:
    """Run `variant` on a few small layers vs the float64 reference; None when right, else what went wrong."""
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        for k_total, n, group, act, rows in SELF_CHECK_CASES:
            layer = random_layer(k_total, n, group, act, seed=k_total + n)
            state = relayout(*(layer[key].to(device) for key in ("qweight", "qzeros", "scales", "g_idx")),
                             group_size=group, v1=True, variant=variant)
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(rows, k_total, generator=torch.Generator().manual_seed(rows)).to(dtype)
                truth = (layer["codes"], layer["zeros"], layer["scales"], layer["g_idx"])
                ref, abs_ref = reference_matmul(x, *truth), reference_matmul(x, *truth, absolute=True)
                out = torch.full((rows, n), float("nan"), dtype=dtype, device=device)  # poison
                _launch(library, variant, x.to(device), state, out)
                got = out.double().cpu()
                err = (got - ref).abs()
                bad = ~(err <= output_tolerance(ref, abs_ref, dtype))
                if bad.any():
                    return (f"K={k_total} N={n} group={group} act_order={act} M={rows} {dtype}: "
                            f"{int(bad.sum())} wrong outputs, max error {float(err.nan_to_num(float('inf')).max()):.3g}")
        torch.cuda.synchronize(device)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- CPU emulation

def warp_chunk_ranges(k_chunks: int, n_warps: int) -> list[tuple[int, int]]:
    """Mirror of warp_chunk_range in int4_common.cuh."""
    per = -(-k_chunks // n_warps)
    return [(min(k_chunks, w * per), min(k_chunks, min(k_chunks, w * per) + per)) for w in range(n_warps)]


def warps_per_block(k_chunks: int) -> int:
    """Mirror of the launcher's choice in int4_launch.cu."""
    return max(1, min(MAX_WARPS, k_chunks // 16))


def _emulation_inputs(x2d: torch.Tensor, state: CudaInt4Weights):
    nb, kc = state.n_pad // BLOCK_N, state.in_features // CHUNK_K
    words = state.weight.cpu().view(nb, kc, 32, 4)
    x = x2d.double().cpu()
    perm = state.perm.long().cpu() if state.perm is not None else torch.arange(state.in_features)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    k0 = (torch.arange(kc).view(kc, 1) * CHUNK_K + 16 * torch.arange(4).view(1, 4))  # [kc, u]
    blk = k0 >> state.scale_block_shift                                                # group_entry
    col0 = torch.arange(nb).view(nb, 1) * BLOCK_N + g.view(1, 32)                      # [nb, lane]
    return nb, kc, words, x, perm, g, t, k0, blk, col0


def _group_values(state: CudaInt4Weights, blk, nb_index, g, cs: int):
    """(scale, zero) a lane reads from its group-table entry: groups[blk, nb, g] halves 2cs, 2cs + 1."""
    table = state.groups.double().cpu()
    return table[blk, nb_index, g, 2 * cs], table[blk, nb_index, g, 2 * cs + 1]


def _ptx_a_owner():
    """PTX ISA, mma.m16n8k16 .f16/.bf16 A fragment: element e (reg e // 2, half e % 2) of lane -> (row, col)."""
    lane, e = torch.arange(32).view(32, 1), torch.arange(8).view(1, 8)
    group, tig = lane // 4, lane % 4
    row = torch.where((e < 2) | ((e >= 4) & (e < 6)), group, group + 8)
    col = tig * 2 + (e & 1) + torch.where(e >= 4, 8, 0)
    return row, col  # [32, 8]


def _ptx_b_owner():
    """B fragment (k16 x n8): element e (reg e // 2) of lane -> (row k, col n)."""
    lane, e = torch.arange(32).view(32, 1), torch.arange(4).view(1, 4)
    group, tig = lane // 4, lane % 4
    return tig * 2 + (e & 1) + torch.where(e >= 2, 8, 0), group.expand(32, 4)


def _ptx_c_owner():
    """C fragment (16 x 8 fp32): element e of lane -> (row, col)."""
    lane, e = torch.arange(32).view(32, 1), torch.arange(4).view(1, 4)
    group, tig = lane // 4, lane % 4
    return group + torch.where(e >= 2, 8, 0), tig * 2 + (e & 1)


def _magic_dequant(words: torch.Tensor, s: int, bias_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bit-level replay of dequant_pair: returns [..., 2] (low half, high half) as float64."""
    magic = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}[dtype]
    biased = ((words >> (4 * s)) & 0x000F000F) | magic
    biased = torch.where(biased >= 2**31, biased - 2**32, biased).to(torch.int32)  # keep int32 bits
    halves = biased.contiguous().view(dtype).view(*biased.shape, 2).double()      # little end = low half
    return halves - bias_zero.unsqueeze(-1)


def emulate_mma(x2d: torch.Tensor, state: CudaInt4Weights) -> torch.Tensor:
    """float64 replay of int4_mma_kernel's per-lane loads, fragments and writes: y [M, N]."""
    dtype = x2d.dtype if x2d.dtype in _DTYPE_CODE else torch.float16
    bias = {torch.float16: 1024.0, torch.bfloat16: 128.0}[dtype]
    nb, kc, words, x, perm, g, t, k0, blk, col0 = _emulation_inputs(x2d, state)
    rows = x.shape[0]
    words64 = words.to(torch.int64) & 0xFFFFFFFF
    nbi = torch.arange(nb)
    # A registers a[s] of each lane: [nb, kc, lane, u, s, half]
    a = torch.empty(nb, kc, 32, 4, 4, 2, dtype=torch.float64)
    for s in range(4):
        _, zero = _group_values(state, blk.view(1, kc, 1, 4), nbi.view(nb, 1, 1, 1), g.view(1, 1, 32, 1), s & 1)
        a[..., s, :] = _magic_dequant(words64, s, bias + zero, dtype)      # bias_zero[s & 1]
    a_row, a_col = _ptx_a_owner()
    A = torch.zeros(nb, kc, 4, 16, 16, dtype=torch.float64)
    for lane in range(32):
        for e in range(8):
            A[:, :, :, a_row[lane, e], a_col[lane, e]] = a[:, :, lane, :, e // 2, e % 2]
    b_row, b_col = _ptx_b_owner()
    c_row, c_col = _ptx_c_owner()
    halves = 1 if rows <= 8 else 2
    y = torch.zeros(rows, state.n_pad, dtype=torch.float64)
    for h in range(halves):
        # B registers: lane loads x[m = g + 8h, fragment_row(chunk, u, t, r, half)] (zero when m >= M)
        B = torch.zeros(kc, 4, 16, 8, dtype=torch.float64)
        chunk, unit = torch.arange(kc).view(kc, 1), torch.arange(4).view(1, 4)
        for lane in range(32):
            m = int(g[lane]) + 8 * h
            for e in range(4):
                k = fragment_row(chunk, unit, int(t[lane]), e // 2, e % 2, state.chunk_rows)
                val = x[m, perm[k]] if m < rows else torch.zeros_like(k, dtype=torch.float64)
                B[:, :, b_row[lane, e], b_col[lane, e]] = val
        D = A @ B.unsqueeze(0)                                              # [nb, kc, u, 16, 8]
        for lane in range(32):
            for e in range(4):
                c = D[:, :, :, c_row[lane, e], c_col[lane, e]]              # [nb, kc, u]
                col = col0[:, lane] + 8 * (e >> 1)                          # [nb]
                scale, _ = _group_values(state, blk.view(1, kc, 4), nbi.view(nb, 1, 1), int(g[lane]), e >> 1)
                m = 8 * h + 2 * int(t[lane]) + (e & 1)
                if m < rows:
                    y[m].index_add_(0, col, (scale * c).sum((1, 2)))
    return y[:, :state.out_features]


def emulate_simple(x2d: torch.Tensor, state: CudaInt4Weights) -> torch.Tensor:
    """float64 replay of int4_simple_kernel's per-lane nibble reads and FMAs: y [M, N]."""
    nb, kc, words, x, perm, g, t, k0, blk, col0 = _emulation_inputs(x2d, state)
    rows = x.shape[0]
    words64 = words.to(torch.int64) & 0xFFFFFFFF
    y = torch.zeros(rows, state.n_pad, dtype=torch.float64)
    for i in range(8):
        s, hi = i & 3, i >> 2
        cs = s & 1
        code = ((words64 >> (4 * i)) & 0xF).double()                          # [nb, kc, lane, u]
        col = (col0 + 8 * cs).view(nb, 1, 32, 1)
        scale, zero = _group_values(state, blk.view(1, kc, 1, 4), torch.arange(nb).view(nb, 1, 1, 1),
                                    g.view(1, 1, 32, 1), cs)
        v = code - zero
        k = fragment_row(torch.arange(kc).view(1, kc, 1, 1), torch.arange(4).view(1, 1, 1, 4),
                         t.view(1, 1, 32, 1), s >> 1, hi, state.chunk_rows)       # [1, kc, lane, u]
        xs = x[:, perm[k.expand(1, kc, 32, 4)]]                               # [M, 1, kc, lane, u]
        contrib = (scale * v).unsqueeze(0) * xs                               # [M, nb, kc, lane, u]
        cols = col.expand(nb, kc, 32, 4).reshape(-1)
        y.index_add_(1, cols, contrib.reshape(rows, -1))
    return y[:, :state.out_features]


def emulate(x2d: torch.Tensor, state: CudaInt4Weights, variant: str | None = None) -> torch.Tensor:
    """CPU float64 replay of a kernel variant's index math (before the final rounding)."""
    variant = variant or state.variant
    if variant == "mma":
        return emulate_mma(x2d, state)
    if variant == "simple":
        return emulate_simple(x2d, state)
    raise UserError(f"unknown CUDA kernel variant {variant!r}: use one of {', '.join(VARIANTS)}")
