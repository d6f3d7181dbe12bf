// Shared pieces of the Int4 GEMV/GEMM kernels (batch 1-16): the re-laid weight layout, the
// fast int4 -> fp16/bf16 conversion, group bookkeeping. Plain CUDA only (no torch headers), so
// nvcc builds it on any machine; kernels/cuda_backend.py mirrors every index formula here in torch.
//
// Re-laid weight layout (built once by cuda_backend.prepare):
//   uint4 w[n_blocks][k_chunks][32 lanes]     n_blocks = n_pad / 16, k_chunks = K / 64
// One warp reads 512 contiguous bytes per chunk: a 64 (k) x 16 (n) tile, 16 bytes per lane.
// Word u (0..3) of a lane holds the k16 x n16 "unit" u of the chunk; its nibble i (bits 4i..4i+3)
// is the code of
//   column n = 16 * n_block + g + 8 * (s & 1)
//   row    k = 64 * chunk + 16 * u + 2 * t + 8 * (s >> 1) + hi
// with g = lane / 4, t = lane % 4, s = i % 4, hi = i / 4 ("unit rows"). When group-table blocks span
// whole chunks (block_shift >= 6, "chunk rows") the rows inside a chunk are renumbered instead:
//   row    k = 64 * chunk + 16 * t + 4 * u + 2 * (s >> 1) + hi
// so the activations a lane needs for a whole chunk are 16 contiguous values (two 16-byte loads).
// Either way the mma sees the same k16 x n16 fragments. This is exactly the A-operand fragment
// of mma.m16n8k16 (A = weight^T tile, rows = output columns), so the tensor-core kernel feeds
// registers straight from the load, and the simple kernel reads the same bytes with plain FMA.
//
// Group table (scales and zero points, fp16):
//   uint2 groups[K >> block_shift][n_blocks][8 (g)] = halves (scale, zero) of column 16 nb + g,
//   then (scale, zero) of column 16 nb + g + 8
// Kernel row k uses block k >> block_shift (2^block_shift rows, >= 16, inside one group), so each
// k16 unit needs one 8-byte load per lane, and there is no division and no branch per group.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace qq {

constexpr int kChunkK = 64;    // rows of K per 16-byte lane load
constexpr int kBlockN = 16;    // output columns per thread block
constexpr int kMaxWarps = 8;   // warps per block split K between them

// Per-dtype constants of the exponent trick: OR-ing a 4-bit code into the mantissa of `bias`
// gives the float bias + code exactly; subtracting bias + zero leaves code - zero exactly.
template <typename T> struct Num;
template <> struct Num<half> {
  using T2 = half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 in both halves
  static constexpr float kBias = 1024.0f;
  static __device__ __forceinline__ float to_float(half v) { return __half2float(v); }
  static __device__ __forceinline__ half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ half2 splat(float v) { return __float2half2_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 in both halves
  static constexpr float kBias = 128.0f;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat162 splat(float v) { return __float2bfloat162_rn(v); }
};

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

template <typename T2> __device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2> __device__ __forceinline__ T2 from_u32(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

// Pair s (0..3) of a word: nibbles s (low half) and s + 4 (high half) as bias + code, minus
// (bias + zero): two exact small integers code - zero.
template <typename T>
__device__ __forceinline__ typename Num<T>::T2 dequant_pair(uint32_t word, int s, typename Num<T>::T2 bias_zero) {
  using T2 = typename Num<T>::T2;
  const uint32_t biased = lop3_and_or(word >> (4 * s), 0x000F000Fu, Num<T>::kMagic);
  return __hsub2(from_u32<T2>(biased), bias_zero);
}

// Kernel row of B-register r (0, 1), half `hi` of unit u for lane quad position t (see layout above).
template <bool kChunkRows>
__device__ __forceinline__ int fragment_row(int chunk, int u, int t, int r, int hi) {
  return kChunkRows ? chunk * kChunkK + 16 * t + 4 * u + 2 * r + hi : chunk * kChunkK + 16 * u + 2 * t + 8 * r + hi;
}

// Contiguous share of the K chunks for one warp (every chunk exactly once over the block).
__device__ __forceinline__ void warp_chunk_range(int k_chunks, int warp, int n_warps, int* begin, int* end) {
  const int per = (k_chunks + n_warps - 1) / n_warps;
  *begin = min(k_chunks, warp * per);
  *end = min(k_chunks, *begin + per);
}

// This lane's (scale, zero) pairs for the k16 unit starting at kernel row k0 (rows already permuted
// for act-order; prepare checks each block holds one group).
__device__ __forceinline__ const uint2* group_entry(const uint2* __restrict__ groups, int k0, int block_shift,
                                                    int n_blocks, int g) {
  return groups + ((size_t)(k0 >> block_shift) * n_blocks + blockIdx.x) * 8 + g;
}

// One activation (m, k) with the optional act-order gather.
template <typename T, bool kPerm>
__device__ __forceinline__ T load_x(const T* __restrict__ x, int K, int m, int k, const int* __restrict__ perm) {
  return x[(size_t)m * K + (kPerm ? __ldg(perm + k) : k)];
}

}  // namespace qq
