// Block-sparse attention forward, key-major: a CTA owns 64 keys of one group and walks the queries
// that selected their block (key_query_lists.cuh), 64 / G at a time, so every row of the matrix unit
// uses the keys it multiplies. Each (query, head) row gets a softmax over those keys alone, written
// as one partial (query_partials.cuh: out / l in f32 and its log-sum-exp); the merge kernel combines
// a row's partials in slot order. An alternative to the query-major kernel (attention_forward_kernel.cuh)
// for selections that neighbouring queries do not share (with a small group, the 64 / G consecutive
// queries of a query tile then share few blocks and the union walk masks most of each tile);
// attention_forward.cu says when it is used.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_mma.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/query_partials.cuh"
#include "cuda/sequence_of_row.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

struct GatheredForwardParams {
  AttentionParams a;
  KeyQueryLists lists;
  float* part_out;  // [total_q * Hq * partials_per_row][D]: softmax(S) V over one partial's keys
  float* part_lse;  // [total_q * Hq * partials_per_row]: their log-sum-exp (natural log)
  int partials_per_row;
  int num_q_heads;
  int key_splits;   // CTAs sharing one key tile's query list (blockIdx.z = sequence * splits + split)
};

template <int D>
struct GatheredForwardSmem {
  static constexpr int kTileElems = kAttnRows * D;
  // K, V, Q[2], then per stage and row: visible limit and partial index.
  static constexpr std::size_t kBytes = 4 * std::size_t(kTileElems) * 2 + 2 * kAttnRows * (4 + 8);
};

template <class T, int D>
__global__ void __launch_bounds__(kAttnThreads, 2) attention_forward_gathered_kernel(const GatheredForwardParams gp) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kTile = GatheredForwardSmem<D>::kTileElems;
  const AttentionParams& p = gp.a;
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + kTile;
  uint16_t* sQ = sV + kTile;  // two stages
  int* s_lim = reinterpret_cast<int*>(sQ + 2 * kTile);                // [2][64]
  int64_t* s_part = reinterpret_cast<int64_t*>(s_lim + 2 * kAttnRows);  // [2][64]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = int(blockIdx.z) / gp.key_splits, split = int(blockIdx.z) % gp.key_splits, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t ks = int64_t(blockIdx.x) * kAttnKeys;
  if (ks >= lk) return;
  const int64_t block = rules::block_of(ks, B);
  const GatheredWalk walk(gp.lists, false, G, g, b, k_begin, ks, lq, lk, B, gp.key_splits, split);
  const int64_t num_tiles = walk.num_tiles();
  if (num_tiles == 0) return;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);
  load_key_rows<D>(sK, k, k_begin, ks, lk, p.k_s0, int64_t(g) * p.k_s1);
  load_key_rows<D>(sV, v, k_begin, ks, lk, p.v_s0, int64_t(g) * p.v_s1);
  mma::cp_async_commit();

  // Tile u into `stage`: its Q rows by cp.async; per row the last visible key offset here (-1: a
  // padding row, or the query is before these keys) and the index of the partial it writes.
  auto load_q = [&](int64_t u, int stage) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int m = 0; m < kAttnRows * kChunks / kAttnThreads; ++m) {
      const int i = tid + m * kAttnThreads, r = i / kChunks, c = i % kChunks;
      int head;
      const int64_t qi = walk.row_query(u, r, head);
      const uint16_t* src = qi < 0 ? q : q + (q_begin + qi) * p.q_s0 + (int64_t(g) * G + head) * p.q_s1 + c * 8;
      mma::cp_async_16(mma::smem_addr(sQ + stage * kTile + swz<D>(r, c * 8)), src, qi < 0 ? 0 : 16);
    }
    if (tid < kAttnRows) {
      int head;
      const int64_t i = walk.row_query(u, tid, head);
      const int lim = gathered_limit(lq, lk, i, ks, kAttnKeys);
      int64_t part = -1;
      if (lim >= 0) {
        const int64_t row = q_begin + i, hq = int64_t(g) * G + head;
        part = (row * gp.num_q_heads + hq) * gp.partials_per_row +
               partial_index(walk.slot(u, walk.tiles.entry(tid)), block, ks, B);
      }
      s_lim[stage * kAttnRows + tid] = lim;
      s_part[stage * kAttnRows + tid] = part;
    }
  };
  load_q(0, 0);
  mma::cp_async_commit();

  const int row_a = warp * 16 + (lane >> 2);  // this thread's rows: row_a and row_a + 8
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
    const uint16_t* tQ = sQ + stage * kTile;

    float s[kAttnKeys / 8][4];
    warp_scores<T, D>(tQ, sK, s);

    // Softmax over these keys per row (scores raw; exp2 with the scale folded in).
    float m_scaled[2], l[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lim = s_lim[stage * kAttnRows + row_a + 8 * h];
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kAttnKeys / 8; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (n * 8 + (lane & 3) * 2 + j > lim) s[n][2 * h + j] = -INFINITY;
          mx = fmaxf(mx, s[n][2 * h + j]);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      m_scaled[h] = mx == -INFINITY ? 0.f : mx * p.scale_log2;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kAttnKeys / 8; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2f(fmaf(s[n][2 * h + j], p.scale_log2, -m_scaled[h]));
          s[n][2 * h + j] = e;
          sum += e;
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l[h] = sum;
    }

    // O = P V.
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    warp_acc_times_tile<T, D>(s, sV, o);

    // Each row's partial: out / l and lse (rows that see none of these keys write nothing).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t part = s_part[stage * kAttnRows + row_a + 8 * h];
      if (part < 0) continue;
      const float inv = 1.f / l[h];  // >= 1: the row sees key 0 of the tile
      float* dst = gp.part_out + part * D + (lane & 3) * 2;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
      if ((lane & 3) == 0) gp.part_lse[part] = (m_scaled[h] + log2f(l[h])) * 0.6931471805599453f;
    }
    __syncthreads();
  }
}

// Rows of at most 32 partials (topk_k * block_size / 64 <= 32, the usual case): lane i owns partial
// i's used bit, log-sum-exp and weight, found once, and each partial's D floats are read as one
// vector per lane (lane l holds elements D/32 * l ..), all of a row's loads in flight together. The
// same sums in the same order as the general path (max and weight sum by one butterfly, outputs in
// ascending partial order), so the result does not depend on which path ran.
template <int D>
__device__ __forceinline__ void merge_row_vector(const float* row_parts, const float* lse_parts, const int32_t* ids,
                                                 int topk_k, int parts, int64_t pos, int B, float& mx, float& l,
                                                 float (&acc)[D / 32]) {
  constexpr int kVec = D / 32;
  using Vec = typename std::conditional<kVec == 4, float4, float2>::type;
  static_assert(kVec == 2 || kVec == 4, "D 64 or 128");
  const int lane = int(threadIdx.x & 31);
  const unsigned used = used_partials_ballot(ids, topk_k, parts, 0, pos, B);
  const float my_lse = (used >> lane) & 1u ? lse_parts[lane] : -INFINITY;
  mx = my_lse;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float my_w = (used >> lane) & 1u ? expf(my_lse - mx) : 0.f;
  l = my_w;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
  // Sixteen partials' loads in flight at a time (16 x D/32 registers), a half with none used skipped.
#pragma unroll
  for (int half = 0; half < 32; half += 16) {
    if (((used >> half) & 0xffffu) == 0) continue;
    Vec v[16];
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if ((used >> (half + j)) & 1u) v[j] = reinterpret_cast<const Vec*>(row_parts + int64_t(half + j) * D)[lane];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float w = __shfl_sync(0xffffffffu, my_w, half + j);
      if ((used >> (half + j)) & 1u) {
        const float* x = reinterpret_cast<const float*>(&v[j]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = fmaf(w, x[e], acc[e]);
      }
    }
  }
}

// out and lse of each (query, head) row from its partials (partial_used), in slot order; a row with
// none (only with malformed topk rows) gets out = 0 and lse = -inf, as the query-major kernel.
template <class T, int D>
__global__ void __launch_bounds__(128) attention_forward_merge_kernel(const GatheredForwardParams gp, int batch,
                                                                      int64_t total_rows) {
  const AttentionParams& p = gp.a;
  const int64_t r = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (r >= total_rows) return;
  const int lane = threadIdx.x & 31;
  const PartialRow pr(r, gp.num_q_heads, p.group_size, p.cu_q, p.cu_k, batch, p.topk, p.topk_s0, p.topk_s1);
  const int64_t row = pr.row, hq = r % gp.num_q_heads;
  const int parts = p.block_size / kAttnKeys;
  const float* lse_parts = gp.part_lse + r * gp.partials_per_row;
  const float* row_parts = gp.part_out + r * gp.partials_per_row * D;
  T* dst = static_cast<T*>(p.out) + row * p.o_s0 + hq * p.o_s1;
  float mx, l;
  float acc[D / 32];
  if (p.topk_k * parts <= 32) {
    merge_row_vector<D>(row_parts, lse_parts, pr.ids, p.topk_k, parts, pr.pos, p.block_size, mx, l, acc);
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) dst[D / 32 * lane + e] = mma::Elem<T>::from_float(acc[e] * inv);
  } else {
    merge_used_lse(lse_parts, pr.ids, p.topk_k, parts, pr.pos, p.block_size, mx, l);
#pragma unroll
    for (int j = 0; j < D / 32; ++j) acc[j] = 0.f;
    if (l > 0.f)
      sum_used_partials<D>(row_parts, pr.ids, p.topk_k, parts, pr.pos, p.block_size,
                           [&](int idx) { return expf(lse_parts[idx] - mx); }, acc);
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int j = 0; j < D / 32; ++j) dst[lane + 32 * j] = mma::Elem<T>::from_float(acc[j] * inv);
  }
  if (lane == 0) p.lse[row * p.lse_s0 + hq * p.lse_s1] = l > 0.f ? mx + logf(l) : -INFINITY;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
