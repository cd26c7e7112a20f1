// Block-sparse (and dense causal) attention backward, deterministic by construction (no atomics on
// gradients):
//   1. delta = rowsum(dout * out) per (query, head), fp32.
//   2. dQ, query-major: the forward's tiles (64 rows = (query, head) pairs of one GQA group) walk the
//      same union of selected blocks (attention_block_union.cuh), recompute P = exp(scale QK^T - lse),
//      dP = dO V^T, dS = P (dP - delta) and keep dQ = scale dS K in registers; written once.
//   3. dK, dV, key-major: a CTA owns 64 keys of one group and loops, in ascending order, over the
//      queries that selected the keys' block (key_query_lists.cuh), gathered 64 / G at a time into
//      tiles of rows that all use the block, accumulating dV = P^T dO and dK = scale dS^T Q in
//      registers.
// Fragment layouts mirror the forward (attention_forward_kernel.cuh): A operands from registers or
// ldmatrix of a swizzled row-major tile, B operands by ldmatrix (non-transposed for a product with
// the tile's rows as n, transposed for the tile's rows as k).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_mma.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/key_splits.h"
#include "cuda/sequence_of_row.cuh"
#include "cuda/query_partials.cuh"
#include "cuda/attention_block_union.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

struct BackwardParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  void* dq;
  void* dk;
  void* dv;
  float* delta;         // [total_q, Hq] workspace
  // Sparse, when they fit (query_partials.cuh): the dK/dV kernel also writes dQ / scale per
  // (query, head, slot part) and attention_backward_dq_reduce_kernel sums them (no dQ kernel).
  float* dq_part;
  int dq_partials_per_row;
  const int32_t* topk;  // nullptr: dense causal
  const int32_t* cu_q;
  const int32_t* cu_k;
  KeyQueryLists lists;  // sparse only: the queries that selected each (group, key block)
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, o_s0, o_s1, do_s0, do_s1, lse_s0, lse_s1;
  int64_t dq_s0, dq_s1, dk_s0, dk_s1, dv_s0, dv_s1, topk_s0, topk_s1;
  int num_q_heads;
  int topk_k;
  int group_size;
  int block_size;
  int bitmap_words;
  int union_cap;
  float scale_log2;
  float scale;
  // dK/dV kernel: CTAs per key tile (blockIdx.z = sequence * key_splits + split), each taking a share
  // of the tile's query list; with more than one, f32 partials [split][total_k][Hkv][dK, dV][D]
  // that attention_backward_dkdv_reduce_kernel sums in split order.
  int key_splits;
  float* dkdv_part;
  int64_t total_k;
  int num_kv_heads;
};

constexpr float kLog2e = 1.4426950408889634f;

// 1. delta[row, head] = sum_d dout * out (one warp per (row, head)).
template <class T, int D>
__global__ void __launch_bounds__(128) attention_backward_delta_kernel(const BackwardParams p,
                                                                       int64_t total_rows) {
  const int64_t r = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (r >= total_rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t row = r / p.num_q_heads, head = r % p.num_q_heads;
  const T* o = static_cast<const T*>(p.out) + row * p.o_s0 + head * p.o_s1;
  const T* d = static_cast<const T*>(p.dout) + row * p.do_s0 + head * p.do_s1;
  float acc = 0.f;
#pragma unroll
  for (int c = lane; c < D; c += 32) acc += float(o[c]) * float(d[c]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) p.delta[r] = acc;
}

template <int D>
struct BackwardSmem {
  static constexpr int kTileElems = kAttnRows * D;
  static constexpr std::size_t kTileBytes = std::size_t(kTileElems) * 2;
  static constexpr std::size_t kFixedBytes = 6 * kTileBytes;
  // dQ kernel: Q, dO, K[2], V[2], then the union bookkeeping (as the forward).
  static std::size_t dq_bytes(int bitmap_words, int union_cap) {
    return kFixedBytes + BlockUnionSmem<1>::bytes(bitmap_words, union_cap);
  }
  // dK/dV kernel: K, V, Q[2], dO[2], then per stage and row: visible limit, lse, delta, the
  // partial's index (dQ partials), then dS of each 32-row half (dQ partials) and the staged queries.
  static constexpr std::size_t kRowMetaBytes = 2 * 3 * kAttnRows * 4;
  static constexpr std::size_t kPartIndexBytes = 2 * kAttnRows * 8;
  static constexpr std::size_t kDsBytes = 2 * 32 * kAttnKeys * 2;
  static constexpr std::size_t dkdv_bytes(bool dq_partials) {
    return kFixedBytes + kRowMetaBytes + kPartIndexBytes + (dq_partials ? kDsBytes : 0) + GatheredQueryStage::kBytes;
  }
};

// 2. dQ: one CTA per forward tile.
template <class T, int D>
__global__ void __launch_bounds__(kAttnThreads, 2) attention_backward_dq_kernel(const BackwardParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sdO = sQ + BackwardSmem<D>::kTileElems;
  uint16_t* sK = sdO + BackwardSmem<D>::kTileElems;      // two stages
  uint16_t* sV = sK + 2 * BackwardSmem<D>::kTileElems;  // two stages
  const BlockUnionSmem<1> su =
      BlockUnionSmem<1>::carve(smem_raw + BackwardSmem<D>::kFixedBytes, p.bitmap_words, p.union_cap);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t rows_total = lq * G;
  const int64_t f0 = int64_t(gridDim.x - 1 - blockIdx.x) * kAttnRows;
  if (f0 >= rows_total) return;
  const int64_t i_first = f0 / G;
  const int64_t i_last = (f0 + kAttnRows - 1 < rows_total ? f0 + kAttnRows - 1 : rows_total - 1) / G;
  const int64_t p_first = rules::query_position(lq, lk, i_first);
  const int64_t p_last = rules::query_position(lq, lk, i_last);
  const int64_t local_last = rules::local_block(p_last, B);
  const bool dense = p.topk == nullptr;
  const bool partial_tile = f0 + kAttnRows > rows_total;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* dout = static_cast<const uint16_t*>(p.dout);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  load_tile<D>(sQ, q, [&](int r) -> const uint16_t* {
    const int64_t f = f0 + r;
    if (f >= rows_total) return nullptr;
    return q + (q_begin + f / G) * p.q_s0 + (int64_t(g) * G + f % G) * p.q_s1;
  });
  load_tile<D>(sdO, dout, [&](int r) -> const uint16_t* {
    const int64_t f = f0 + r;
    if (f >= rows_total) return nullptr;
    return dout + (q_begin + f / G) * p.do_s0 + (int64_t(g) * G + f % G) * p.do_s1;
  });
  mma::cp_async_commit();

  int num_union = int(local_last + 1);
  if (!dense) {
    num_union = build_block_union<kAttnThreads, 1>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap, g,
                                                   q_begin, lq, lk, B, i_first, i_last, local_last);
  }
  auto block_at = [&](int u) -> int64_t { return dense ? int64_t(u) : int64_t(su.blocks[u]); };

  const int sub_per_block = B / kAttnKeys;
  int num_iters = 0;
  if (num_union > 0) {
    const int64_t last_block = block_at(num_union - 1);
    const int64_t last_subs = (p_last - rules::block_begin(last_block, B)) / kAttnKeys + 1;
    num_iters = (num_union - 1) * sub_per_block + int(last_subs < sub_per_block ? last_subs : sub_per_block);
  }
  auto key_start = [&](int it) -> int64_t {
    return rules::block_begin(block_at(it / sub_per_block), B) + int64_t(it % sub_per_block) * kAttnKeys;
  };
  auto load_kv = [&](int it, int stage) {
    const int64_t ks = key_start(it);
    load_tile<D>(sK + stage * BackwardSmem<D>::kTileElems, k, [&](int r) -> const uint16_t* {
      const int64_t t = ks + r;
      return t < lk ? k + (k_begin + t) * p.k_s0 + int64_t(g) * p.k_s1 : nullptr;
    });
    load_tile<D>(sV + stage * BackwardSmem<D>::kTileElems, v, [&](int r) -> const uint16_t* {
      const int64_t t = ks + r;
      return t < lk ? v + (k_begin + t) * p.v_s0 + int64_t(g) * p.v_s1 : nullptr;
    });
  };
  if (num_iters > 0) load_kv(0, 0);
  mma::cp_async_commit();

  // This thread's two rows: position (-1 = padding), query bit, lse * log2 e and delta.
  const int row_a = warp * 16 + (lane >> 2);
  int64_t pos[2];
  int qbit[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t f = f0 + row_a + 8 * h;
    const bool valid = f < rows_total;
    pos[h] = valid ? rules::query_position(lq, lk, f / G) : -1;
    qbit[h] = valid ? int(f / G - i_first) : 0;
    const int64_t row = q_begin + f / G, head = int64_t(g) * G + f % G;
    lse2[h] = valid ? p.lse[row * p.lse_s0 + head * p.lse_s1] * kLog2e : 0.f;
    delta[h] = valid ? p.delta[row * p.num_q_heads + head] : 0.f;
  }
  const unsigned long long all_queries =
      (i_last - i_first + 1) >= 64 ? ~0ull : ((1ull << (i_last - i_first + 1)) - 1ull);

  mma::cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int r = warp * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
    mma::ldmatrix_x4(mma::smem_addr(sQ + swz<D>(r, c)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }

  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  for (int it = 0; it < num_iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < num_iters) {
      load_kv(it + 1, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* tK = sK + stage * BackwardSmem<D>::kTileElems;
    const uint16_t* tV = sV + stage * BackwardSmem<D>::kTileElems;
    const int64_t ks = key_start(it);

    // S = Q K^T and dP = dO V^T (rows: this warp's 16; columns: the 64 keys).
    float s[kAttnKeys / 8][4], dp[kAttnKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kAttnKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t df[4];
      {
        const int r = warp * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
        mma::ldmatrix_x4(mma::smem_addr(sdO + swz<D>(r, c)), df[0], df[1], df[2], df[3]);
      }
#pragma unroll
      for (int np = 0; np < kAttnKeys / 16; ++np) {
        uint32_t b0, b1, b2, b3;
        const int r = np * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 16 + ((lane >> 3) & 1) * 8;
        mma::ldmatrix_x4(mma::smem_addr(tK + swz<D>(r, c)), b0, b1, b2, b3);
        mma::mma_16816<T>(s[2 * np], qf[kk], b0, b1);
        mma::mma_16816<T>(s[2 * np + 1], qf[kk], b2, b3);
        mma::ldmatrix_x4(mma::smem_addr(tV + swz<D>(r, c)), b0, b1, b2, b3);
        mma::mma_16816<T>(dp[2 * np], df, b0, b1);
        mma::mma_16816<T>(dp[2 * np + 1], df, b2, b3);
      }
    }

    // P (0 where masked: unselected rows, causal tail) and dS = P (dP - delta), in place in s.
    const unsigned long long sel = dense ? all_queries : su.mask[it / sub_per_block];
    const bool needs_mask = partial_tile || sel != all_queries || ks + kAttnKeys - 1 > p_first;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_sel = (sel >> qbit[h]) & 1ull;
      const int64_t lim = row_sel ? pos[h] - ks : -1;
#pragma unroll
      for (int n = 0; n < kAttnKeys / 8; ++n) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int key = n * 8 + (lane & 3) * 2 + j;
          const bool masked = needs_mask && key > lim;
          const float pr = masked ? 0.f : exp2f(fmaf(s[n][2 * h + j], p.scale_log2, -lse2[h]));
          s[n][2 * h + j] = pr * (dp[n][2 * h + j] - delta[h]);
        }
      }
    }

    // dQ += dS K (dS in the score accumulators, as P in the forward).
    warp_acc_times_tile<T, D>(s, tK, dq);
    __syncthreads();
  }

  T* dq_out = static_cast<T*>(p.dq);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (pos[h] < 0) continue;
    const int64_t f = f0 + row_a + 8 * h;
    const int64_t row = q_begin + f / G;
    const int64_t head = int64_t(g) * G + f % G;
    T* dst = dq_out + row * p.dq_s0 + head * p.dq_s1 + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t packed = mma::Elem<T>::pack(dq[n][2 * h] * p.scale, dq[n][2 * h + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dst + n * 8) = packed;
    }
  }
}

// Packed key row `row` of group g: dK = scale * dk_pair(n) and dV = dv_pair(n) at columns col + 8 n,
// col + 8 n + 1; with key splits, this CTA's f32 share (every split writes every key row, zeros
// included). Shared by the mma.sync and wgmma dK/dV kernels.
template <class T, int D, class DkPair, class DvPair>
__device__ __forceinline__ void store_dkdv_row(const BackwardParams& p, int split, int64_t row, int g, int col,
                                               DkPair dk_pair, DvPair dv_pair) {
  if (p.key_splits > 1) {
    float* dst = p.dkdv_part + ((int64_t(split) * p.total_k + row) * p.num_kv_heads + g) * (2 * D) + col;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const float2 dk = dk_pair(n);
      *reinterpret_cast<float2*>(dst + n * 8) = make_float2(dk.x * p.scale, dk.y * p.scale);
      *reinterpret_cast<float2*>(dst + D + n * 8) = dv_pair(n);
    }
    return;
  }
  T* dkd = static_cast<T*>(p.dk) + row * p.dk_s0 + int64_t(g) * p.dk_s1 + col;
  T* dvd = static_cast<T*>(p.dv) + row * p.dv_s0 + int64_t(g) * p.dv_s1 + col;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const float2 dk = dk_pair(n), dv = dv_pair(n);
    *reinterpret_cast<uint32_t*>(dkd + n * 8) = mma::Elem<T>::pack(dk.x * p.scale, dk.y * p.scale);
    *reinterpret_cast<uint32_t*>(dvd + n * 8) = mma::Elem<T>::pack(dv.x, dv.y);
  }
}

// 3. dK, dV: one CTA per 64 keys of one group; warp w owns keys w*16 .. w*16+15 as the M dimension.
// kDqPartials: also dQ's share of these keys for every gathered row, through shared memory (dS is
// spread over the warps by key), written as that row's partial.
template <class T, int D, bool kDqPartials>
__global__ void __launch_bounds__(kAttnThreads, 2) attention_backward_dkdv_kernel(const BackwardParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kTile = BackwardSmem<D>::kTileElems;
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + kTile;
  uint16_t* sQ = sV + kTile;        // two stages
  uint16_t* sdO = sQ + 2 * kTile;   // two stages
  int* s_lim = reinterpret_cast<int*>(smem_raw + BackwardSmem<D>::kFixedBytes);  // [2][64]
  float* s_lse = reinterpret_cast<float*>(s_lim + 2 * kAttnRows);                        // [2][64]
  float* s_delta = s_lse + 2 * kAttnRows;                                                // [2][64]
  int64_t* s_part = reinterpret_cast<int64_t*>(s_delta + 2 * kAttnRows);                  // [2][64]
  uint16_t* sDs = reinterpret_cast<uint16_t*>(s_part + 2 * kAttnRows);                    // [2][32][64]
  GatheredQueryStage staged(reinterpret_cast<int*>(sDs + (kDqPartials ? 2 * 32 * kAttnKeys : 0)));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = int(blockIdx.z) / p.key_splits, split = int(blockIdx.z) % p.key_splits, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t ks = int64_t(blockIdx.x) * kAttnKeys;
  if (ks >= lk) return;
  const int64_t block = rules::block_of(ks, B);
  const GatheredWalk walk(p.lists, p.topk == nullptr, G, g, b, k_begin, ks, lq, lk, B, p.key_splits, split);
  const int64_t num_tiles = walk.num_tiles();

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* dout = static_cast<const uint16_t*>(p.dout);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  load_key_rows<D>(sK, k, k_begin, ks, lk, p.k_s0, int64_t(g) * p.k_s1);
  load_key_rows<D>(sV, v, k_begin, ks, lk, p.v_s0, int64_t(g) * p.v_s1);
  mma::cp_async_commit();

  // Loads tile u, its queries staged in buffer `stage` (= u & 1), into `stage`: Q and dO rows, lse
  // and delta by cp.async, and per row the last key offset in this key tile it may see (-1: padding
  // row, or its query's position is before the tile; 32-bit to keep registers for the accumulators)
  // and its dQ partial. Waits on no global read.
  auto load_q = [&](int64_t u, int stage) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int m = 0; m < kAttnRows * kChunks / kAttnThreads; ++m) {
      const int i = tid + m * kAttnThreads, r = i / kChunks, c = i % kChunks;
      int head;
      const int qi = staged.row_query(walk.tiles, stage, u, r, head);
      const int64_t hq = int64_t(g) * G + head;
      const uint16_t* qs = qi < 0 ? q : q + (q_begin + qi) * p.q_s0 + hq * p.q_s1 + c * 8;
      const uint16_t* ds = qi < 0 ? dout : dout + (q_begin + qi) * p.do_s0 + hq * p.do_s1 + c * 8;
      mma::cp_async_16_or_zero(mma::smem_addr(sQ + stage * kTile + swz<D>(r, c * 8)), qs, qi < 0);
      mma::cp_async_16_or_zero(mma::smem_addr(sdO + stage * kTile + swz<D>(r, c * 8)), ds, qi < 0);
    }
    if (tid < kAttnRows) {
      int head;
      const int i = staged.row_query(walk.tiles, stage, u, tid, head);
      const int64_t row = q_begin + i, hq = int64_t(g) * G + head;
      const int lim = gathered_limit(lq, lk, i, ks, kAttnKeys);
      const bool visible = lim >= 0;
      int64_t part = -1;
      if constexpr (kDqPartials)
        if (visible)
          part = (row * p.num_q_heads + hq) * p.dq_partials_per_row +
                 partial_index(staged.slot[stage * kAttnRows + walk.tiles.entry(tid)], block, ks, B);
      mma::cp_async_4_or_zero(mma::smem_addr(s_lse + stage * kAttnRows + tid),
                              visible ? p.lse + row * p.lse_s0 + hq * p.lse_s1 : p.lse, !visible);
      mma::cp_async_4_or_zero(mma::smem_addr(s_delta + stage * kAttnRows + tid),
                              visible ? p.delta + row * p.num_q_heads + hq : p.delta, !visible);
      s_part[stage * kAttnRows + tid] = part;
      s_lim[stage * kAttnRows + tid] = lim;
    }
  };
  staged.fetch(walk, 0);
  staged.store(0);
  staged.fetch(walk, 1);
  staged.store(1);
  __syncthreads();
  if (num_tiles > 0) load_q(0, 0);
  mma::cp_async_commit();
  staged.fetch(walk, 2);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  const int key_row = warp * 16 + (lane >> 2);  // this thread's keys: key_row and key_row + 8
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
    const uint16_t* tdO = sdO + stage * kTile;
    const int* lim = s_lim + stage * kAttnRows;
    const float* lse = s_lse + stage * kAttnRows;
    const float* dlt = s_delta + stage * kAttnRows;

    // Two halves of 32 query rows keep the score registers small.
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      // S^T = K Q^T and dP^T = V dO^T (rows: this warp's 16 keys; columns: 32 query rows).
      float s[4][4], dpt[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dpt[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t kf[4], vf[4];
        const int ar = warp * 16 + (lane & 15), ac = kk * 16 + (lane >> 4) * 8;
        mma::ldmatrix_x4(mma::smem_addr(sK + swz<D>(ar, ac)), kf[0], kf[1], kf[2], kf[3]);
        mma::ldmatrix_x4(mma::smem_addr(sV + swz<D>(ar, ac)), vf[0], vf[1], vf[2], vf[3]);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t b0, b1, b2, b3;
          const int r = half * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8;
          const int c = kk * 16 + ((lane >> 3) & 1) * 8;
          mma::ldmatrix_x4(mma::smem_addr(tQ + swz<D>(r, c)), b0, b1, b2, b3);
          mma::mma_16816<T>(s[2 * np], kf, b0, b1);
          mma::mma_16816<T>(s[2 * np + 1], kf, b2, b3);
          mma::ldmatrix_x4(mma::smem_addr(tdO + swz<D>(r, c)), b0, b1, b2, b3);
          mma::mma_16816<T>(dpt[2 * np], vf, b0, b1);
          mma::mma_16816<T>(dpt[2 * np + 1], vf, b2, b3);
        }
      }

      // P^T into s, dS^T into dpt (0 where the row may not see the key).
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = half * 32 + n * 8 + (lane & 3) * 2 + (e & 1);
          const int key = key_row + 8 * (e >> 1);
          const float pr = key > lim[col] ? 0.f : exp2f(fmaf(s[n][e], p.scale_log2, -lse[col] * kLog2e));
          s[n][e] = pr;
          dpt[n][e] = pr * (dpt[n][e] - dlt[col]);
        }
      }
      uint16_t* tDs = sDs + half * 32 * kAttnKeys;
      if constexpr (kDqPartials) {  // dS of these 32 rows as [row][key], 16-bit
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            tDs[swz<kAttnKeys>(n * 8 + (lane & 3) * 2 + (e & 1), key_row + 8 * (e >> 1))] =
                uint16_t(mma::Elem<T>::pack(dpt[n][e], 0.f) & 0xffffu);
      }

      // dV += P^T dO and dK += dS^T Q over these 32 rows (rows are the k dimension: transposed loads).
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t ap[4], ad[4];
        ap[0] = mma::Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
        ap[1] = mma::Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
        ap[2] = mma::Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        ap[3] = mma::Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        ad[0] = mma::Elem<T>::pack(dpt[2 * kk][0], dpt[2 * kk][1]);
        ad[1] = mma::Elem<T>::pack(dpt[2 * kk][2], dpt[2 * kk][3]);
        ad[2] = mma::Elem<T>::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
        ad[3] = mma::Elem<T>::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
        for (int dpair = 0; dpair < D / 16; ++dpair) {
          uint32_t b0, b1, b2, b3;
          const int r = half * 32 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int c = dpair * 16 + (lane >> 4) * 8;
          mma::ldmatrix_x4_trans(mma::smem_addr(tdO + swz<D>(r, c)), b0, b1, b2, b3);
          mma::mma_16816<T>(dv[2 * dpair], ap, b0, b1);
          mma::mma_16816<T>(dv[2 * dpair + 1], ap, b2, b3);
          mma::ldmatrix_x4_trans(mma::smem_addr(tQ + swz<D>(r, c)), b0, b1, b2, b3);
          mma::mma_16816<T>(dk[2 * dpair], ad, b0, b1);
          mma::mma_16816<T>(dk[2 * dpair + 1], ad, b2, b3);
        }
      }
      if constexpr (kDqPartials) {
        // dQ of these 32 rows against the 64 keys: warp w takes rows 16 (w & 1) .. + 15 and the
        // columns of half w >> 1 of D; each row's share goes to its partial, written once.
        __syncthreads();
        const int mt = warp & 1, c0 = (warp >> 1) * (D / 2);
        float dq[D / 16][4];
#pragma unroll
        for (int n = 0; n < D / 16; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kAttnKeys / 16; ++kk) {
          uint32_t a[4];
          {
            const int r = mt * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
            mma::ldmatrix_x4(mma::smem_addr(tDs + swz<kAttnKeys>(r, c)), a[0], a[1], a[2], a[3]);
          }
#pragma unroll
          for (int dpair = 0; dpair < D / 32; ++dpair) {
            uint32_t b0, b1, b2, b3;
            const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = c0 + dpair * 16 + (lane >> 4) * 8;
            mma::ldmatrix_x4_trans(mma::smem_addr(sK + swz<D>(r, c)), b0, b1, b2, b3);
            mma::mma_16816<T>(dq[2 * dpair], a, b0, b1);
            mma::mma_16816<T>(dq[2 * dpair + 1], a, b2, b3);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t part = s_part[stage * kAttnRows + half * 32 + mt * 16 + (lane >> 2) + 8 * h];
          if (part < 0) continue;
          float* dst = p.dq_part + part * D + c0 + (lane & 3) * 2;
#pragma unroll
          for (int n = 0; n < D / 16; ++n)
            *reinterpret_cast<float2*>(dst + n * 8) = make_float2(dq[n][2 * h], dq[n][2 * h + 1]);
        }
      }
    }
    staged.store(stage);  // tile u + 2, into the buffer whose copies load_q(u) issued
    staged.fetch(walk, u + 3);
    __syncthreads();
  }
  mma::cp_async_wait<0>();  // the K/V group when no query tile was visited

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t t = ks + key_row + 8 * h;
    if (t >= lk) continue;
    store_dkdv_row<T, D>(
        p, split, k_begin + t, g, (lane & 3) * 2, [&](int n) { return make_float2(dk[n][2 * h], dk[n][2 * h + 1]); },
        [&](int n) { return make_float2(dv[n][2 * h], dv[n][2 * h + 1]); });
  }
}

// dK, dV from the split partials, summed in split order (bitwise reproducible).
template <class T, int D>
__global__ void attention_backward_dkdv_reduce_kernel(const BackwardParams p) {
  const int64_t n = p.total_k * p.num_kv_heads * (2 * D);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int z = 0; z < p.key_splits; ++z) sum += p.dkdv_part[int64_t(z) * n + i];
    const int64_t row = i / (2 * D), key = row / p.num_kv_heads;
    const int g = int(row % p.num_kv_heads), e = int(i % (2 * D));
    T* dst = e < D ? static_cast<T*>(p.dk) + key * p.dk_s0 + int64_t(g) * p.dk_s1 + e
                   : static_cast<T*>(p.dv) + key * p.dv_s0 + int64_t(g) * p.dv_s1 + (e - D);
    *dst = mma::Elem<T>::from_float(sum);
  }
}

// dQ from the dK/dV kernel's partials: one warp per (query, head) row sums the partials that exist
// (partial_used) in slot order, times the softmax scale.
template <class T, int D>
__global__ void __launch_bounds__(128) attention_backward_dq_reduce_kernel(const BackwardParams p, int batch,
                                                                           int64_t total_rows) {
  const int64_t r = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (r >= total_rows) return;
  const int lane = threadIdx.x & 31;
  const PartialRow pr(r, p.num_q_heads, p.group_size, p.cu_q, p.cu_k, batch, p.topk, p.topk_s0, p.topk_s1);
  float acc[D / 32];
#pragma unroll
  for (int j = 0; j < D / 32; ++j) acc[j] = 0.f;
  sum_used_partials<D>(p.dq_part + r * p.dq_partials_per_row * D, pr.ids, p.topk_k, p.block_size / kAttnKeys,
                       pr.pos, p.block_size, [](int) { return 1.f; }, acc);
  T* dst = static_cast<T*>(p.dq) + pr.row * p.dq_s0 + (r % p.num_q_heads) * p.dq_s1;
#pragma unroll
  for (int j = 0; j < D / 32; ++j) dst[lane + 32 * j] = mma::Elem<T>::from_float(acc[j] * p.scale);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
