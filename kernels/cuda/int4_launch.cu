// extern "C" entry points of the Int4 kernels, called from Python through ctypes
// (kernels/cuda_backend.py). Raw pointers, sizes and a cudaStream_t in; a status code out:
// 0 = success, a cudaError_t, or one of the argument codes below (qq_int4_error_string says which).
#include <cuda_runtime.h>

#include "int4_common.cuh"
#include "int4_mma.cuh"
#include "int4_simple.cuh"

namespace {

enum Status : int {
  kOk = 0,
  kBadShape = 10001,    // M, K, N, n_pad or scale_block_rows outside what the layout allows
  kBadPointer = 10002,  // null or misaligned buffer
  kBadVariant = 10003,
  kBadDtype = 10004,
};
enum Variant : int { kMma = 0, kSimple = 1 };
enum Dtype : int { kFp16 = 0, kBf16 = 1 };
constexpr int kSimpleRows = 4;  // the simple kernel takes at most 4 batch rows per launch

using qq::kChunkK;
using qq::kBlockN;
using qq::kMaxWarps;

// Both kernels share this signature.
template <typename T>
using KernelFn = void (*)(const T*, int, int, const uint4*, const uint2*, const int*, int, int, int, T*);

template <typename T, bool kPerm, bool kChunkGroups>
KernelFn<T> pick_mma(int M) {
  return M <= 8 ? qq::int4_mma_kernel<T, 1, kPerm, kChunkGroups> : qq::int4_mma_kernel<T, 2, kPerm, kChunkGroups>;
}

template <typename T, bool kPerm>
KernelFn<T> pick_kernel(int variant, int M, bool chunk_groups) {
  if (variant == kMma) return chunk_groups ? pick_mma<T, kPerm, true>(M) : pick_mma<T, kPerm, false>(M);
  return M <= 1 ? qq::int4_simple_kernel<T, 1> : qq::int4_simple_kernel<T, kSimpleRows>;
}

template <typename T>
int launch(int variant, const void* x, int M, int K, const void* w, const void* groups, const void* perm,
           int block_shift, int n_pad, int N, void* y, cudaStream_t stream) {
  const int k_chunks = K / kChunkK;
  // Split K over up to 8 warps, each with >= 16 chunks where K allows: long enough streams for the
  // load pipeline, and small blocks so several fit on one SM (one wave for Qwen-7B MLP shapes).
  const int n_warps = k_chunks / 16 < 1 ? 1 : (k_chunks / 16 > kMaxWarps ? kMaxWarps : k_chunks / 16);
  // The mma kernel takes all 16 rows at once; the simple one walks the batch kSimpleRows at a time.
  const int rows_per_launch = variant == kMma ? M : kSimpleRows;
  for (int m0 = 0; m0 < M; m0 += rows_per_launch) {
    const int rows = M - m0 < rows_per_launch ? M - m0 : rows_per_launch;
    const bool chunk_groups = block_shift >= 6;  // table blocks span whole 64-row chunks
    const KernelFn<T> kernel =
        perm ? pick_kernel<T, true>(variant, rows, chunk_groups) : pick_kernel<T, false>(variant, rows, chunk_groups);
    kernel<<<n_pad / kBlockN, 32 * n_warps, 0, stream>>>(
        static_cast<const T*>(x) + (size_t)m0 * K, rows, K, static_cast<const uint4*>(w),
        static_cast<const uint2*>(groups), static_cast<const int*>(perm), block_shift, n_pad, N,
        static_cast<T*>(y) + (size_t)m0 * N);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return (int)e;
  }
  return kOk;
}

template <typename T>
cudaError_t preload_dtype() {
  cudaFuncAttributes attr;
  for (int variant : {kMma, kSimple})
    for (int M : {1, 4, 16})
      for (bool chunk_groups : {false, true}) {
        cudaError_t e = cudaFuncGetAttributes(&attr, pick_kernel<T, false>(variant, M, chunk_groups));
        if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, pick_kernel<T, true>(variant, M, chunk_groups));
        if (e != cudaSuccess) return e;
      }
  return cudaSuccess;
}

int select_device(int device) {
  if (device < 0) return kOk;
  int current = -1;
  cudaError_t e = cudaGetDevice(&current);
  if (e == cudaSuccess && current != device) e = cudaSetDevice(device);
  return (int)e;
}

bool misaligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes != 0; }

}  // namespace

extern "C" {

int qq_int4_abi_version() { return 1; }

const char* qq_int4_error_string(int code) {
  switch (code) {
    case kBadShape: return "qq_int4: bad shape (need 1 <= M <= 16, K % 64 == 0, n_pad % 16 == 0, 0 < N <= n_pad, 4 <= block_shift <= 30)";
    case kBadPointer: return "qq_int4: null or misaligned buffer (x and weights 16-byte, groups 8-byte aligned)";
    case kBadVariant: return "qq_int4: unknown kernel variant";
    case kBadDtype: return "qq_int4: unsupported dtype (fp16 or bf16)";
    default: return cudaGetErrorString((cudaError_t)code);
  }
}

// Load every kernel instantiation now: lazy module loading must not first happen inside a CUDA
// graph capture. Returns a status code.
int qq_int4_preload(int device) {
  int status = select_device(device);
  if (status != kOk) return status;
  cudaError_t e = preload_dtype<half>();
  if (e == cudaSuccess) e = preload_dtype<__nv_bfloat16>();
  return (int)e;
}

// y[M, N] = x[M, K] @ W^T with W in the re-laid Int4 layout (see int4_common.cuh).
// groups: the (scale, zero) table; block_shift: log2 of its rows per block.
// perm: NULL, or int32[K] act-order permutation (x column of kernel row k is perm[k]).
int qq_int4_matmul(int variant, int dtype, int device, const void* x, int M, int K, const void* w,
                   const void* groups, const void* perm, int block_shift, int n_pad, int N, void* y, void* stream) {
  if (M < 1 || M > 16 || K <= 0 || K % kChunkK || n_pad <= 0 || n_pad % kBlockN || N <= 0 || N > n_pad ||
      block_shift < 4 || block_shift > 30)
    return kBadShape;
  if (!x || !w || !groups || !y || misaligned(x, 16) || misaligned(w, 16) || misaligned(groups, 8) ||
      misaligned(y, 2) || (perm && misaligned(perm, 4)))
    return kBadPointer;
  if (variant != kMma && variant != kSimple) return kBadVariant;
  int status = select_device(device);
  if (status != kOk) return status;
  (void)cudaGetLastError();  // clear an earlier non-sticky error so the check below is ours
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == kFp16) return launch<half>(variant, x, M, K, w, groups, perm, block_shift, n_pad, N, y, s);
  if (dtype == kBf16)
    return launch<__nv_bfloat16>(variant, x, M, K, w, groups, perm, block_shift, n_pad, N, y, s);
  return kBadDtype;
}

}  // extern "C"
