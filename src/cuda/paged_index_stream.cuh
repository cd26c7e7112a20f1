// CUDA paged index branch, stage 1, bandwidth-oriented variant for decode (the default where it
// applies; MSA_PAGED_INDEX_KERNEL=smem keeps paged_index.cuh's kernel; see docs/serving.md). Same grid, arguments and score layout as
// index_scores_kernel (paged_index.cuh), so the same top-k select follows unchanged.
//
// Why: the shared-memory kernel stages ki through cp.async + f32 rows in shared memory and is bound
// by shared-memory traffic (41% of HBM bandwidth at 32 x 128K, no gain from FP8's half bytes). At
// decode a tile has few rows (q_len x Hkv), so the rows fit in registers and ki can be streamed
// straight from global memory: each lane holds the slice of Di that its 16-byte ki loads cover
// (8 bf16/f16, 4 f32 or 16 FP8 codes) for kStreamRows rows, a key is covered by Di / E lanes
// ("lanes per key"), a warp covers 32 / (lanes per key) keys per load and keeps kUnroll loads per
// thread in flight. Dot products are f32 FMAs from registers, summed over the key's lanes with xor
// shuffles; the block max stays in registers (FP8: the page scale is positive, so it multiplies the
// block max once instead of every code). Each warp owns whole blocks of the CTA's chunk, so no
// shared memory and no __syncthreads. Tiles with more than kStreamRows rows take several passes
// over the chunk (later passes hit L1/L2); chunked prefill (q_len > kStreamMaxQueries) keeps the
// shared-memory kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/paged_index.cuh"
#include "cuda/paged_layout.h"
#include "cuda/paged_load.cuh"
#include "cuda/paged_tile.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

constexpr int kStreamRows = 4;         // rows held in registers per pass (decode q_len 1 x Hkv 4)
constexpr int kStreamMaxQueries = 16;  // plans with longer query suffixes keep index_scores_kernel

// Elements of one 16-byte ki load, and loads in flight per thread.
template <class T, bool kFp8>
struct StreamShape {
  static constexpr int kElems = kFp8 ? 16 : int(16 / sizeof(T));
  static constexpr int kUnroll = kFp8 ? 4 : 8;
};

template <class T, bool kFp8>
__device__ __forceinline__ void unpack16(const uint4& u, float* x);

template <>
__device__ __forceinline__ void unpack16<float, false>(const uint4& u, float* x) {
  x[0] = __uint_as_float(u.x);
  x[1] = __uint_as_float(u.y);
  x[2] = __uint_as_float(u.z);
  x[3] = __uint_as_float(u.w);
}
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16, false>(const uint4& u, float* x) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void unpack16<__half, false>(const uint4& u, float* x) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
// 16 E4M3 codes, unscaled (the hardware converter is exact: every E4M3 value is a half).
__device__ __forceinline__ void unpack16_fp8(const uint4& u, float* x) {
  const __nv_fp8x2_storage_t* b = reinterpret_cast<const __nv_fp8x2_storage_t*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(b[i], __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r));
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void unpack16<float, true>(const uint4& u, float* x) { unpack16_fp8(u, x); }
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16, true>(const uint4& u, float* x) { unpack16_fp8(u, x); }
template <>
__device__ __forceinline__ void unpack16<__half, true>(const uint4& u, float* x) { unpack16_fp8(u, x); }

// kLanes: lanes per key (Di / E, a power of two <= 32), a template parameter so the shuffle
// reductions are straight-line code the scheduler can interleave across keys and rows. At least 3
// CTAs per SM (<= 168 registers): without the bound ptxas capped some 16-bit instances at 128
// registers and spilled.
template <class T, bool kFp8, int kLanes>
__global__ void __launch_bounds__(kThreads, 3) index_scores_stream_kernel(const IndexArgs a) {
  wait_for_prior_grid_then_release_next();
  constexpr int E = StreamShape<T, kFp8>::kElems, U = StreamShape<T, kFp8>::kUnroll, R = kStreamRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  const IndexWork w = index_work(a);
  if (!w.ok) return;
  const int r = w.qt.r, q_len = w.qt.q_len, q0 = w.qt.q0, rows = w.rows;
  const int64_t qbase = w.qt.qbase, kv = w.qt.kv, j0 = w.j0, j1 = w.j1;
  const int B = a.block_size;

  constexpr int kpw = 32 / kLanes;  // keys per warp-wide load
  const int sub = lane & (kLanes - 1), slot = lane / kLanes;

  for (int r0 = 0; r0 < rows; r0 += R) {
    float q[R][E];
    int local[R];  // the row's candidates are the blocks before its local block (ids fit the int32 page table)
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int row = r0 + i;
      local[i] = -1;
      if (row < rows) {
        const T* src = static_cast<const T*>(a.qi) + (qbase + q0 + row / a.hkv) * a.qi_s0 +
                       int64_t(row % a.hkv) * a.qi_s1 + sub * E;
#pragma unroll
        for (int e = 0; e < E; ++e) q[i][e] = to_float<T>(src[e]) * a.iscale;
        local[i] = int(rules::local_block(rules::query_position(q_len, kv, q0 + row / a.hkv), B));
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) q[i][e] = 0.f;
      }
    }

    // The next block's page id is read one block ahead: its latency hides behind this block's loads.
    int64_t next_page = j0 + warp < j1 ? a.page_table[r * a.pt_s0 + (j0 + warp) * a.pt_s1] : -1;
    for (int64_t j = j0 + warp; j < j1; j += kThreads / 32) {
      const int64_t page = next_page;
      if (j + kThreads / 32 < j1) next_page = a.page_table[r * a.pt_s0 + (j + kThreads / 32) * a.pt_s1];
      const bool valid = page >= 0 && page < a.num_pages;  // an id outside the cache is not read
      float best[R];
#pragma unroll
      for (int i = 0; i < R; ++i) best[i] = valid ? -INFINITY : kBadPageScore;
      if (valid) {  // warp-uniform
        const unsigned char* base = a.ki + page * a.ki_s0 + sub * 16;
        for (int k0 = 0; k0 < B; k0 += kpw * U) {
          uint4 v[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int key = k0 + u * kpw + slot;
            v[u] = key < B ? __ldg(reinterpret_cast<const uint4*>(base + int64_t(key) * a.ki_s1))
                           : make_uint4(0u, 0u, 0u, 0u);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float x[E];
            unpack16<T, kFp8>(v[u], x);
            const bool in_block = k0 + u * kpw + slot < B;  // uniform over the key's lanes
#pragma unroll
            for (int i = 0; i < R; ++i) {
              float d = 0.f;
#pragma unroll
              for (int e = 0; e < E; ++e) d = fmaf(q[i][e], x[e], d);
#pragma unroll
              for (int off = kLanes / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
              if (in_block) best[i] = fmaxf(best[i], d);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int off = kLanes; off < 32; off <<= 1)
          best[i] = fmaxf(best[i], __shfl_xor_sync(0xffffffffu, best[i], off));
      }
      if (lane < R && valid && kFp8) {
        // The page scale is positive: scaling the block max equals the max of scaled products.
        const float scale = a.ki_scale[page * a.kis_s0];
#pragma unroll
        for (int i = 0; i < R; ++i) best[i] *= scale;
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int row = r0 + i;
        if (lane == i && row < rows && j < local[i]) {
          const int qi = row / a.hkv, g = row - qi * a.hkv;
          const float s = best[i];
          // A NaN score has no rank: the lowest, as on the CPU.
          a.scores[(int64_t(g) * a.bounds.total_q + qbase + q0 + qi) * a.ld + j] = isnan(s) ? -INFINITY : s;
        }
      }
    }
  }
}

// Host side: whether MSA_PAGED_INDEX_KERNEL leaves the streaming kernel on, and whether this plan and
// cache can take it (decode-sized query suffixes; Di a power-of-two number of 16-byte vectors, at
// most one per lane; ki rows 16-byte aligned, which FP8 caches need not be).
// Launches the instance for this Di (stream_index_supported has checked that it exists).
template <class T, bool kFp8>
void launch_stream_index(const IndexArgs& a, unsigned ctas, cudaStream_t stream) {
  switch (a.di / StreamShape<T, kFp8>::kElems) {
    case 2: return launch_chained(index_scores_stream_kernel<T, kFp8, 2>, ctas, kThreads, 0, stream, a);
    case 4: return launch_chained(index_scores_stream_kernel<T, kFp8, 4>, ctas, kThreads, 0, stream, a);
    case 8: return launch_chained(index_scores_stream_kernel<T, kFp8, 8>, ctas, kThreads, 0, stream, a);
    case 16: return launch_chained(index_scores_stream_kernel<T, kFp8, 16>, ctas, kThreads, 0, stream, a);
    default: return launch_chained(index_scores_stream_kernel<T, kFp8, 32>, ctas, kThreads, 0, stream, a);
  }
}

// The default where supported (faster on the H100, docs/serving.md); MSA_PAGED_INDEX_KERNEL=smem keeps
// the shared-memory kernel.
inline bool stream_index_requested() {
  const char* v = std::getenv("MSA_PAGED_INDEX_KERNEL");
  return v == nullptr || std::strcmp(v, "smem") != 0;
}

inline bool stream_index_supported(int max_q_len, int di, int elem_bytes, const void* ki, int64_t ki_s0_bytes,
                                   int64_t ki_s1_bytes) {
  if (max_q_len > kStreamMaxQueries) return false;
  const int elems = 16 / elem_bytes;
  if (di % elems != 0) return false;
  const int lanes = di / elems;
  if (lanes < 2 || lanes > 32 || (lanes & (lanes - 1)) != 0) return false;
  return reinterpret_cast<std::uintptr_t>(ki) % 16 == 0 && ki_s0_bytes % 16 == 0 && ki_s1_bytes % 16 == 0;
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
