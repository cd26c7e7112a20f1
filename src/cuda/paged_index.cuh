// CUDA paged index branch, stage 1: block scores. One CTA = one request x one query tile (its
// (query, group) rows, at most kMaxRows) x one chunk of the request's candidate blocks. Each ki page
// of the chunk is read once for all rows of the tile, 32 keys at a time into shared memory (FP8
// pages dequantised with the page's scale), scored against the pre-scaled index queries (one warp
// per row, one lane per key) and max-pooled per block. Only candidate blocks (j < local block of the
// row's query) are scored; they are fully visible, so no key inside them needs a causal mask.
// Scores go to [Hkv, total_q, ld]; stage 2 (paged_index.cu) selects from them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/grid_dependency.cuh"
#include "cuda/paged_layout.h"
#include "cuda/paged_load.cuh"
#include "cuda/paged_tile.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

constexpr int kIndexKeys = 32;  // keys per shared-memory chunk: one per lane
// Block score of a page id outside the cache. The device cannot throw as the CPU does; ranking such a
// block first makes the attention read its page id, and the attention writes NaN for every row that
// reads one (paged_attention.cuh, poison_tile), so a bad page table shows instead of being skipped.
constexpr float kBadPageScore = __builtin_huge_valf();

struct IndexArgs {
  const void* qi;  // [total_q, Hkv, Di] of T
  int64_t qi_s0, qi_s1;
  const unsigned char* ki;  // [num_pages, B, Di], T or FP8
  int64_t ki_s0, ki_s1;     // bytes
  bool ki_fp8;
  const float* ki_scale;
  int64_t kis_s0;
  const int32_t* cu_q;
  const int32_t* kv_lens;
  const int32_t* page_table;
  int64_t pt_s0, pt_s1, num_pages;
  float* scores;
  int64_t ld;
  int hkv, di, block_size;
  float iscale;
  int tile_q, tiles;
  int64_t chunk, chunks;
  int row_cap;  // rows of the largest tile of this plan (<= kMaxRows): sizes the row arrays
  PlanBounds bounds;
};

// The CTA's share of an index grid (request x query tile x block chunk): its query tile, rows
// (query * Hkv + group) and candidate blocks [j0, j1); ok is false when it has nothing to score.
// Shared by the three block-score kernels (this one, paged_index_stream.cuh, paged_index_mma.cuh).
struct IndexWork {
  QueryTile qt;
  int64_t j0, j1;
  int rows;
  bool ok;
};
__device__ __forceinline__ IndexWork index_work(const IndexArgs& a) {
  IndexWork w;
  int64_t id = blockIdx.x;
  const int64_t chunk = id % a.chunks;
  id /= a.chunks;
  w.qt = query_tile(id, a.tiles, a.tile_q, a.cu_q, a.kv_lens, a.bounds);
  w.rows = w.qt.nq * a.hkv;
  const int64_t candidates =
      w.qt.nq == 0 ? 0
                   : rules::local_block(rules::query_position(w.qt.q_len, w.qt.kv, w.qt.q0 + w.qt.nq - 1),
                                        a.block_size);
  w.j0 = chunk * a.chunk;
  w.j1 = min(candidates, w.j0 + a.chunk);
  w.ok = w.j0 < candidates;
  return w;
}

// + raw staging of a chunk's ki rows (cp.async), 8 x esize bytes per 8-element vector.
inline std::size_t index_smem_bytes(int row_cap, int di, int esize) {
  return sizeof(float) * (std::size_t(row_cap + kIndexKeys) * (di + 4) + std::size_t(row_cap)) + 16 +
         std::size_t(kIndexKeys) * di * std::size_t(esize);
}

template <class T>
__global__ void __launch_bounds__(kThreads) index_scores_kernel(const IndexArgs a) {
  wait_for_prior_grid_then_release_next();
  extern __shared__ float4 smem4[];
  const int dp = a.di + 4;  // padded rows: lane c's float4 reads fall in distinct banks
  float* qs = reinterpret_cast<float*>(smem4);
  float* ks = qs + a.row_cap * dp;
  float* bmax = ks + kIndexKeys * dp;
  const int esize = a.ki_fp8 ? 1 : int(sizeof(T)), slot_bytes = 8 * esize;
  unsigned char* stage = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(bmax + a.row_cap) + 15) & ~uintptr_t(15));
  const int t = threadIdx.x, lane = t & 31;

  const IndexWork w = index_work(a);
  if (!w.ok) return;
  const int r = w.qt.r, q_len = w.qt.q_len, q0 = w.qt.q0, rows = w.rows;
  const int64_t qbase = w.qt.qbase, kv = w.qt.kv, j0 = w.j0, j1 = w.j1;
  const int B = a.block_size;
  const int vecs = a.di / 8;

  for (int i = t; i < rows * vecs; i += kThreads) {
    const int row = i / vecs, v = i - row * vecs;
    const T* src = static_cast<const T*>(a.qi) + (qbase + q0 + row / a.hkv) * a.qi_s0 +
                   int64_t(row % a.hkv) * a.qi_s1 + v * 8;
    float x[8];
    load8<T>(src, x);
#pragma unroll
    for (int e = 0; e < 8; ++e) qs[row * dp + v * 8 + e] = x[e] * a.iscale;
  }

  for (int64_t j = j0; j < j1; ++j) {
    const int64_t page = a.page_table[r * a.pt_s0 + j * a.pt_s1];
    const bool valid = page >= 0 && page < a.num_pages;  // an id outside the cache is not read
    const float scale = valid && a.ki_fp8 ? a.ki_scale[page * a.kis_s0] : 1.f;
    if (t < rows) bmax[t] = valid ? -INFINITY : kBadPageScore;
    for (int c0 = 0; valid && c0 < B; c0 += kIndexKeys) {
      const int nk = min(kIndexKeys, B - c0);
      __syncthreads();  // the previous chunk's readers are done with ks; bmax is initialised
      // All of the thread's copies in flight at once; it converts exactly the vectors it copied.
      for (int i = t; i < nk * vecs; i += kThreads) {
        const int key = i / vecs, v = i - key * vecs;
        cp_async_vec8(stage + int64_t(i) * slot_bytes,
                      a.ki + page * a.ki_s0 + (c0 + key) * a.ki_s1 + int64_t(v) * slot_bytes, esize);
      }
      cp_async_wait_all();
      for (int i = t; i < nk * vecs; i += kThreads) {
        const int key = i / vecs, v = i - key * vecs;
        float x[8];
        load8_cache<T>(stage + int64_t(i) * slot_bytes, 0, a.ki_fp8, scale, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) ks[key * dp + v * 8 + e] = x[e];
      }
      __syncthreads();
      for (int row = t >> 5; row < rows; row += kThreads / 32) {
        float s = -INFINITY;
        if (lane < nk) {
          const float4* qv = reinterpret_cast<const float4*>(qs + row * dp);
          const float4* kvv = reinterpret_cast<const float4*>(ks + lane * dp);
          float acc = 0.f;
          for (int d = 0; d < a.di / 4; ++d) {
            const float4 x = qv[d], y = kvv[d];
            acc = fmaf(x.x, y.x, acc);
            acc = fmaf(x.y, y.y, acc);
            acc = fmaf(x.z, y.z, acc);
            acc = fmaf(x.w, y.w, acc);
          }
          s = acc;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, off));
        if (lane == 0) bmax[row] = fmaxf(bmax[row], s);
      }
    }
    __syncthreads();
    if (t < rows) {
      const int qi = t / a.hkv, g = t - qi * a.hkv;
      const int64_t p = rules::query_position(q_len, kv, q0 + qi);
      if (j < rules::local_block(p, B)) {
        const float s = bmax[t];
        // A NaN score has no rank: the lowest, as on the CPU.
        a.scores[(int64_t(g) * a.bounds.total_q + qbase + q0 + qi) * a.ld + j] = isnan(s) ? -INFINITY : s;
      }
    }
  }
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
