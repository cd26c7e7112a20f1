// The KL's student log-sum-exp (SPEC.md: the softmax of iscale <qi, ki> over a query's selected
// visible tokens), key-major: a CTA owns 64 index keys and walks, group by group, the queries that
// selected their block (key_query_lists.cuh), 64 at a time (the student has one row per query and
// group); each query gets a log-sum-exp over these keys as one partial (query_partials.cuh), and the
// merge kernel combines a row's partials. Used with the key-major dqi (kl_alignment_mma_kernel.cuh),
// in place of walk 1 of the query-major kernel, whose tiles of consecutive queries share few blocks.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention_forward_kernel.cuh"  // kAttnRows, kAttnKeys, kAttnThreads, swz, load_tile
#include "cuda/attention_mma.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/kl_alignment_mma_kernel.cuh"  // KlMmaParams
#include "cuda/query_partials.cuh"
#include "cuda/sequence_of_row.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

template <int Di>
struct KlStudentSmem {
  static constexpr int kTileElems = kAttnRows * Di;
  // ki, qi[2], then per stage and query: visible limit and partial index.
  static constexpr std::size_t kBytes = 3 * std::size_t(kTileElems) * 2 + 2 * kAttnRows * (4 + 8);
};

// Grid (key tiles of the longest sequence, batch, key_splits).
template <class T, int Di>
__global__ void __launch_bounds__(kAttnThreads) kl_student_lse_partials_kernel(const KlMmaParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kTile = KlStudentSmem<Di>::kTileElems;
  uint16_t* sKi = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sQi = sKi + kTile;  // two stages
  int* s_lim = reinterpret_cast<int*>(sQi + 2 * kTile);                 // [2][64]
  int64_t* s_part = reinterpret_cast<int64_t*>(s_lim + 2 * kAttnRows);  // [2][64]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.y, B = p.B;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t ks = int64_t(blockIdx.x) * kAttnKeys;
  if (ks >= lk) return;
  const int64_t block = rules::block_of(ks, B);
  const uint16_t* qi = static_cast<const uint16_t*>(p.qi);
  const uint16_t* ki = static_cast<const uint16_t*>(p.ki);

  load_key_rows<Di>(sKi, ki, k_begin, ks, lk, p.ki_s0, 0);
  mma::cp_async_commit();

  const int row_a = warp * 16 + (lane >> 2);  // this thread's query rows: row_a and row_a + 8
  for (int g = 0; g < p.hkv; ++g) {
    const GatheredWalk walk(p.lists, false, 1, g, b, k_begin, ks, lq, lk, B, p.key_splits, int(blockIdx.z));
    const int64_t num_tiles = walk.num_tiles();
    if (num_tiles == 0) continue;
    __syncthreads();  // the previous group's last tile is done with every stage
    auto load_q = [&](int64_t u, int stage) {
      load_tile<Di>(sQi + stage * kTile, qi, [&](int r) -> const uint16_t* {
        const int64_t i = walk.query(u, r);
        return i < 0 ? nullptr : qi + (q_begin + i) * p.qi_s0 + int64_t(g) * p.qi_s1;
      });
      if (tid < kAttnRows) {
        const int64_t i = walk.query(u, tid);
        const int lim = gathered_limit(lq, lk, i, ks, kAttnKeys);
        int64_t part = -1;
        if (lim >= 0)
          part = ((q_begin + i) * p.hkv + g) * p.partials_per_row + partial_index(walk.slot(u, tid), block, ks, B);
        s_lim[stage * kAttnRows + tid] = lim;
        s_part[stage * kAttnRows + tid] = part;
      }
    };
    load_q(0, 0);
    mma::cp_async_commit();
    for (int64_t u = 0; u < num_tiles; ++u) {
      const int stage = int(u & 1);
      if (u + 1 < num_tiles) {
        load_q(u + 1, stage ^ 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
      __syncthreads();
      // Z = qi ki^T for this warp's 16 query rows and the 64 keys.
      const uint16_t* tQi = sQi + stage * kTile;
      float z[kAttnKeys / 8][4];
      warp_scores<T, Di>(tQi, sKi, z);
      // Per row: log-sum-exp of iscale * z over the visible keys, as walk 1 of the query kernel.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lim = s_lim[stage * kAttnRows + row_a + 8 * h];
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kAttnKeys / 8; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            if (n * 8 + (lane & 3) * 2 + j <= lim) mx = fmaxf(mx, z[n][2 * h + j] * p.iscale);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < kAttnKeys / 8; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            if (n * 8 + (lane & 3) * 2 + j <= lim) sum += expf(z[n][2 * h + j] * p.iscale - mx);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int64_t part = s_part[stage * kAttnRows + row_a + 8 * h];
        if (part >= 0 && (lane & 3) == 0) p.student_part[part] = mx + logf(sum);
      }
      __syncthreads();
    }
  }
  mma::cp_async_wait<0>();  // the ki tile, when no query was visited
}

// student_lse of each (query, group) row from its partials (partial_used); -inf without any.
__global__ void __launch_bounds__(128) kl_student_lse_merge_kernel(const KlMmaParams p, int batch,
                                                                   int64_t total_rows) {
  const int64_t r = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (r >= total_rows) return;
  const int lane = threadIdx.x & 31;
  const PartialRow pr(r, p.hkv, 1, p.cu_q, p.cu_k, batch, p.topk, p.topk_s0, p.topk_s1);
  float mx, l;
  merge_used_lse(p.student_part + r * p.partials_per_row, pr.ids, p.topk_k, p.B / kAttnKeys, pr.pos, p.B, mx, l);
  if (lane == 0) p.student_lse[r] = l > 0.f ? mx + logf(l) : -INFINITY;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
