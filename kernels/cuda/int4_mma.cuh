// Variant "mma": tensor-core kernel for batch 1-16 (Marlin-class ideas, our own code).
// Swapped operands: A = weight^T tile (16 output columns x k16) comes straight from the 16-byte
// lane load (the layout in int4_common.cuh *is* the A fragment), B = x^T (k16 x 8 batch rows),
// so batch <= 8 needs one mma.m16n8k16 per unit and batch <= 16 two. Codes become fp16/bf16 with
// the exponent trick (one lop3 + one sub per pair), the integer products code - zero are exact,
// and each k16 unit's fp32 mma result is scaled by its group's scale into fp32 accumulators.
#pragma once

#include "int4_common.cuh"

namespace qq {

template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <> __device__ __forceinline__ void mma_16816<half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x[m, k] and x[m, k + 1] packed as one B-fragment register (low half = k).
template <typename T, bool kPerm>
__device__ __forceinline__ uint32_t load_x_pair(const T* __restrict__ x, int K, int m, int k, const int* __restrict__ perm) {
  if (kPerm) {
    const T lo = load_x<T, true>(x, K, m, k, perm), hi = load_x<T, true>(x, K, m, k + 1, perm);
    return (uint32_t)(*reinterpret_cast<const unsigned short*>(&lo)) |
           ((uint32_t)(*reinterpret_cast<const unsigned short*>(&hi)) << 16);
  }
  return *reinterpret_cast<const uint32_t*>(x + (size_t)m * K + k);  // k even, K even: 4-byte aligned
}

// kChunkGroups: every group-table block spans whole 64-row chunks (block_shift >= 6, e.g. groups
// of 64/128 or -1), so a chunk needs one table entry, its four mma results are scaled once, and the
// weights use "chunk rows" (int4_common.cuh): a lane's activations for a chunk are contiguous.
template <typename T, int kHalves, bool kPerm, bool kChunkGroups>
__global__ void __launch_bounds__(32 * kMaxWarps, 2) int4_mma_kernel(
    const T* __restrict__ x, int M, int K, const uint4* __restrict__ w, const uint2* __restrict__ groups,
    const int* __restrict__ perm, int block_shift, int n_pad, int N, T* __restrict__ y) {
  using T2 = typename Num<T>::T2;
  // Chunks per step: every load of a step (weights, group entries, activations) is issued before
  // the first use, so a warp waits one memory latency per step, not one per k16 unit.
  constexpr int kDepth = (kHalves == 1 ? 4 : 2) / (kPerm ? 2 : 1);  // as deep as 128 registers allow
  constexpr int kEntries = kChunkGroups ? 1 : 4;                      // table entries per chunk
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int k_chunks = K / kChunkK, n_blocks = n_pad / kBlockN;
  int c_begin, c_end;
  warp_chunk_range(k_chunks, warp, n_warps, &c_begin, &c_end);
  const uint4* wp = w + (size_t)blockIdx.x * k_chunks * 32 + lane;
  const int col0 = blockIdx.x * kBlockN + g;  // A rows g and g + 8 are columns col0 and col0 + 8

  // C fragment: c[0], c[1] = (column col0, batch 8h + 2t, +1); c[2], c[3] = (column col0 + 8, same).
  float acc[kHalves][4];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[h][i] = 0.0f;

  // Software pipeline: the weights of the next step are in flight while this step computes.
  uint4 q[kDepth];
#pragma unroll
  for (int j = 0; j < kDepth; ++j)
    q[j] = (c_begin + j < c_end) ? __ldg(wp + (size_t)(c_begin + j) * 32) : make_uint4(0u, 0u, 0u, 0u);

  for (int c = c_begin; c < c_end; c += kDepth) {
    uint4 q_next[kDepth];
#pragma unroll
    for (int j = 0; j < kDepth; ++j) {
      const int cn = c + kDepth + j;
      q_next[j] = (cn < c_end) ? __ldg(wp + (size_t)cn * 32) : make_uint4(0u, 0u, 0u, 0u);
    }
    uint2 entry[kDepth][kEntries];
    uint32_t xb[kDepth][kHalves][8];  // B registers of units 0..3: xb[..][2u + r] (fragment_row)
#pragma unroll
    for (int j = 0; j < kDepth; ++j)
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int k0 = (c + j) * kChunkK + 16 * u;
        const bool live = c + j < c_end;
        if (u < kEntries)
          entry[j][u] = live ? __ldg(group_entry(groups, k0, block_shift, n_blocks, g)) : make_uint2(0u, 0u);
      }
#pragma unroll
    for (int j = 0; j < kDepth; ++j)
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        const bool row = c + j < c_end && g + 8 * h < M;
        if (kChunkGroups && !kPerm) {  // 16 contiguous activations: two 16-byte loads
          const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)(g + 8 * h) * K + (c + j) * kChunkK + 16 * t);
          const uint4 lo = row ? __ldg(src) : make_uint4(0u, 0u, 0u, 0u);
          const uint4 hi = row ? __ldg(src + 1) : make_uint4(0u, 0u, 0u, 0u);
          const uint32_t v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int r = 0; r < 8; ++r) xb[j][h][r] = v[r];
        } else {
#pragma unroll
          for (int r = 0; r < 8; ++r)  // unit r / 2, register r % 2
            xb[j][h][r] = row ? load_x_pair<T, kPerm>(x, K, g + 8 * h,
                                                      fragment_row<kChunkGroups>(c + j, r >> 1, t, r & 1, 0), perm)
                              : 0u;
        }
      }
#pragma unroll
    for (int j = 0; j < kDepth; ++j) {
      if (c + j >= c_end) break;  // warp-uniform
      const uint32_t words[4] = {q[j].x, q[j].y, q[j].z, q[j].w};
      float part[kHalves][4];  // sum of x * (code - zero) over one group's units: exact products
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[h][i] = 0.0f;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint2 e = entry[j][kChunkGroups ? 0 : u];
        const half2 sz[2] = {from_u32<half2>(e.x), from_u32<half2>(e.y)};  // (scale, zero)
        const T2 bias_zero[2] = {Num<T>::splat(Num<T>::kBias + __high2float(sz[0])),
                                 Num<T>::splat(Num<T>::kBias + __high2float(sz[1]))};
        const float scale[2] = {__low2float(sz[0]), __low2float(sz[1])};
        uint32_t a[4];  // a[s]: row g + 8 (s & 1), k = 2t + 8 (s >> 1) + {0, 1}
#pragma unroll
        for (int s = 0; s < 4; ++s) a[s] = as_u32(dequant_pair<T>(words[u], s, bias_zero[s & 1]));
#pragma unroll
        for (int h = 0; h < kHalves; ++h) mma_16816<T>(part[h], a, xb[j][h][2 * u], xb[j][h][2 * u + 1]);
        if (!kChunkGroups || u == 3) {  // the group ends here: scale into the fp32 accumulators
#pragma unroll
          for (int h = 0; h < kHalves; ++h)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[h][i] += scale[i >> 1] * part[h][i];
              part[h][i] = 0.0f;
            }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kDepth; ++j) q[j] = q_next[j];
  }

  // Sum the warps' partial tiles through shared memory.
  __shared__ float red[kMaxWarps][32][kHalves * 4];
#pragma unroll
  for (int h = 0; h < kHalves; ++h)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][lane][h * 4 + i] = acc[h][i];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int h = 0; h < kHalves; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = 0.0f;
        for (int wi = 0; wi < n_warps; ++wi) v += red[wi][lane][h * 4 + i];
        const int m = 8 * h + 2 * t + (i & 1), col = col0 + 8 * (i >> 1);
        if (m < M && col < N) y[(size_t)m * N + col] = Num<T>::from_float(v);
      }
  }
}

}  // namespace qq
