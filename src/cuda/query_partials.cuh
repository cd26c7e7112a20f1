// Per-query partial results of the key-major kernels: a kernel that owns 64 keys and gathers the
// queries that selected their block (key_query_lists.cuh) writes, for each (query, head) row, one
// partial per (topk slot, 64-key part of the block) -- the forward its softmax over those keys, the
// backward its share of dQ -- and a reduce kernel combines a row's partials in slot order
// (deterministic). Which partials exist is one rule, partial_used(), so writers and readers agree
// without zero-filling the buffer.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cuda/attention_forward_kernel.cuh"  // kAttnKeys
#include "cuda/sequence_of_row.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

// Partials a row may have: topk slots times 64-key parts of a block.
__host__ __device__ __forceinline__ int partials_per_row(int topk_k, int block_size) {
  return topk_k * (block_size / kAttnKeys);
}

// f32 partials of `floats_per_partial` each for every (query, head) row, within a budget: beyond it
// the query-major kernels (tile unions) are used instead. The budget is an eighth of the device's
// memory (10 GB on an H100 80GB: room for the KL's dqi partials at 128K, which take the KL from 194
// to 108 ms there), at least 2 GiB, or MSA_PARTIALS_BUDGET_MB for a caller who wants another trade
// (the workspace grows by the partials). Read by workspace_bytes and by the call alike: both must
// see the same value. Host only.
constexpr std::size_t kMinQueryPartialBudget = std::size_t(2) << 30;
inline double query_partial_budget_bytes() {
  if (const char* e = std::getenv("MSA_PARTIALS_BUDGET_MB")) {
    const double mb = std::atof(e);
    if (mb > 0.0) return mb * double(1 << 20);
  }
  // Total memory per device, queried once (a host-side property: no stream work, safe while a
  // stream is being captured).
  static double total[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return double(kMinQueryPartialBudget);
  if (total[dev] == 0.0) {
    cudaDeviceProp prop{};
    total[dev] = cudaGetDeviceProperties(&prop, dev) == cudaSuccess ? double(prop.totalGlobalMem) : -1.0;
  }
  const double eighth = total[dev] / 8.0;
  return eighth > double(kMinQueryPartialBudget) ? eighth : double(kMinQueryPartialBudget);
}
inline bool query_partials_fit(int64_t total_q, int num_q_heads, int topk_k, int block_size,
                               int floats_per_partial) {
  const double bytes = double(total_q) * num_q_heads * partials_per_row(topk_k, block_size) *
                       double(floats_per_partial) * sizeof(float);
  return bytes <= query_partial_budget_bytes();
}

// Index of the partial that keys [ks, ks + 64) of `block` give a query whose first slot holding the
// block (a repeated id counts once; the key -> query lists carry it) is `slot`.
__device__ __forceinline__ int partial_index(int slot, int64_t block, int64_t ks, int B) {
  return slot * (B / kAttnKeys) + int((ks - rules::block_begin(block, B)) / kAttnKeys);
}

// Row r of a per-row reduce kernel (one warp a row): r = query row * rows_per_query + j, and j's
// group is j / rows_per_group (attention: Hq rows of G heads a group; KL: Hkv rows, one a group).
// Gives the packed query row, its group, its position in its sequence's keys (the suffix rule, for
// partial_used) and its topk row.
struct PartialRow {
  int64_t row;
  int g;
  int64_t pos;
  const int32_t* ids;
  __device__ PartialRow(int64_t r, int rows_per_query, int rows_per_group, const int32_t* cu_q, const int32_t* cu_k,
                        int batch, const int32_t* topk, int64_t topk_s0, int64_t topk_s1)
      : row(r / rows_per_query), g(int(r % rows_per_query) / rows_per_group) {
    const int b = sequence_of_row(cu_q, batch, row);
    pos = rules::query_position(cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b], row - cu_q[b]);
    ids = topk + int64_t(g) * topk_s0 + row * topk_s1;
  }
};

// Whether partial (slot, part) of a query at position `pos` was written: a valid id (0..local
// block), not repeated in an earlier slot, and a part starting at or before the query.
__device__ __forceinline__ bool partial_used(const int32_t* ids, int slot, int part, int64_t pos, int B) {
  const int id = ids[slot];
  if (id < 0 || id > rules::local_block(pos, B)) return false;
  for (int s = 0; s < slot; ++s)
    if (ids[s] == id) return false;
  return rules::block_begin(id, B) + int64_t(part) * kAttnKeys <= pos;
}

// Warp-wide: the used partials (partial_used) of a row, ascending, as a bit per partial index; lane
// l tests index base + l. Rows have at most 64 partials here (topk_k * parts <= 64 per call: the
// caller loops over bases).
__device__ __forceinline__ unsigned used_partials_ballot(const int32_t* ids, int topk_k, int parts, int base,
                                                         int64_t pos, int B) {
  const int idx = base + int(threadIdx.x & 31);
  const bool used = idx < topk_k * parts && partial_used(ids, idx / parts, idx % parts, pos, B);
  return __ballot_sync(0xffffffffu, used);
}

// Warp-wide: the max and the sum of exp(lse - max) over a row's used partials' log-sum-exps
// (lane-parallel, reduced in a fixed order); sum 0 when the row has none.
__device__ __forceinline__ void merge_used_lse(const float* lse_parts, const int32_t* ids, int topk_k, int parts,
                                               int64_t pos, int B, float& mx, float& sum) {
  const int lane = int(threadIdx.x & 31);
  mx = -INFINITY;
  for (int base = 0; base < topk_k * parts; base += 32) {
    const unsigned used = used_partials_ballot(ids, topk_k, parts, base, pos, B);
    if ((used >> lane) & 1u) mx = fmaxf(mx, lse_parts[base + lane]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  sum = 0.f;
  for (int base = 0; base < topk_k * parts; base += 32) {
    const unsigned used = used_partials_ballot(ids, topk_k, parts, base, pos, B);
    if ((used >> lane) & 1u) sum += expf(lse_parts[base + lane] - mx);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
}

// Warp-wide sum over a row's used partials, in ascending index order (deterministic), of w(index)
// times the partial's D floats (lane l holds elements l, l + 32, ...). Loads are issued 8 partials
// at a time so that a row's reads overlap.
template <int D, class Weight>
__device__ __forceinline__ void sum_used_partials(const float* row_parts, const int32_t* ids, int topk_k, int parts,
                                                  int64_t pos, int B, Weight weight, float (&acc)[D / 32]) {
  const int lane = int(threadIdx.x & 31);
  for (int base = 0; base < topk_k * parts; base += 32) {
    unsigned mask = used_partials_ballot(ids, topk_k, parts, base, pos, B);
    while (mask) {
      int idx[8];
      int n = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        idx[j] = mask ? base + __ffs(mask) - 1 : -1;
        if (mask) mask &= mask - 1, ++n;
      }
      float v[8][D / 32];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < D / 32; ++e) v[j][e] = idx[j] >= 0 ? row_parts[int64_t(idx[j]) * D + lane + 32 * e] : 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j >= n) break;
        const float w = weight(idx[j]);
#pragma unroll
        for (int e = 0; e < D / 32; ++e) acc[e] = fmaf(w, v[j][e], acc[e]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
