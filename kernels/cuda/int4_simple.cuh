// Variant "simple": the same re-laid bytes as the tensor-core kernel, read with plain integer
// shifts and fp32 FMA. Few moving parts, so it is the safe fallback if the mma kernel ever fails
// its self-check. Per lane: 2 output columns x kMaxM batch rows of fp32 accumulators.
#pragma once

#include "int4_common.cuh"

namespace qq {

// Act-order gather decided at run time (perm != NULL): fewer instantiations, a fallback's speed.
template <typename T, int kMaxM>
__global__ void __launch_bounds__(32 * kMaxWarps, 1) int4_simple_kernel(
    const T* __restrict__ x, int M, int K, const uint4* __restrict__ w, const uint2* __restrict__ groups,
    const int* __restrict__ perm, int block_shift, int n_pad, int N, T* __restrict__ y) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int k_chunks = K / kChunkK, n_blocks = n_pad / kBlockN;
  int c_begin, c_end;
  warp_chunk_range(k_chunks, warp, n_warps, &c_begin, &c_end);
  const uint4* wp = w + (size_t)blockIdx.x * k_chunks * 32 + lane;
  const int col0 = blockIdx.x * kBlockN + g;  // this lane's columns: col0 and col0 + 8
  const bool chunk_rows = block_shift >= 6;   // which row numbering prepare used (int4_common.cuh)

  float acc[2][kMaxM];
#pragma unroll
  for (int cs = 0; cs < 2; ++cs)
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[cs][m] = 0.0f;

  for (int c = c_begin; c < c_end; ++c) {
    const uint4 q = __ldg(wp + (size_t)c * 32);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int k0 = c * kChunkK + 16 * u;
      const uint2 entry = __ldg(group_entry(groups, k0, block_shift, n_blocks, g));
      const half2 sz[2] = {from_u32<half2>(entry.x), from_u32<half2>(entry.y)};  // (scale, zero)
      float part[2][kMaxM];
#pragma unroll
      for (int cs = 0; cs < 2; ++cs)
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) part[cs][m] = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int s = i & 3, hi = i >> 2, cs = s & 1;
        const int k = chunk_rows ? fragment_row<true>(c, u, t, s >> 1, hi) : fragment_row<false>(c, u, t, s >> 1, hi);
        const float v = (float)((words[u] >> (4 * i)) & 0xFu) - __high2float(sz[cs]);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m)
          if (m < M) part[cs][m] += v * Num<T>::to_float(x[(size_t)m * K + (perm ? __ldg(perm + k) : k)]);
      }
#pragma unroll
      for (int cs = 0; cs < 2; ++cs)
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) acc[cs][m] += __low2float(sz[cs]) * part[cs][m];
    }
  }

  // Sum the 4 lanes sharing a column (t = 0..3), then the warps.
  __shared__ float red[kMaxWarps][8][2][kMaxM];
#pragma unroll
  for (int cs = 0; cs < 2; ++cs)
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      float v = acc[cs][m];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (t == 0) red[warp][g][cs][m] = v;
    }
  __syncthreads();
  if (warp == 0 && t == 0) {
#pragma unroll
    for (int cs = 0; cs < 2; ++cs) {
      const int col = col0 + 8 * cs;
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        float v = 0.0f;
        for (int wi = 0; wi < n_warps; ++wi) v += red[wi][g][cs][m];
        if (m < M && col < N) y[(size_t)m * N + col] = Num<T>::from_float(v);
      }
    }
  }
}

}  // namespace qq
