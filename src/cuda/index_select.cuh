// Stage 2 of the CUDA index branch: exp-free top-k per (group, query) row over the block scores of
// stage 1, the local block forced into its slot, and the selected LSE from the per-block LSEs.
//
// One warp per row. For k - 1 <= 32 the warp keeps the best k - 1 (score, id) pairs as a sorted list
// spread over its lanes (lane i holds rank i). Candidates stream in 1024 at a time (eight float4
// loads per lane in flight); a per-segment lower bound and a ballot against the list's last entry
// filter them, so only a few candidates per row pay for an insertion (a compare, a ballot and a
// shift by one lane). Larger k
// falls back to k - 1 rounds of a warp-wide arg-best, each over the candidates ranking after the
// previous pick.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/grid_dependency.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

constexpr int kSelectWarps = 8;
constexpr int kListLanes = 32;  // k - 1 up to this many takes the ballot path

// Whether select_topk_split_kernel (one CTA a row) serves `rows` rows of `ld` candidates on `workers`
// SMs: rows fewer than the SMs (one warp a row would leave most of them idle) and long enough that
// a warp scans several 1024-candidate segments; list path only.
inline bool select_split_rows(int64_t rows, int64_t ld, int k, int workers) {
  return k - 1 <= kListLanes && rows <= workers && ld >= 2048;
}

struct SelectArgs {
  const float* scores;  // [Hkv, total_q, ld] from stage 1
  const float* lses;    // same layout, or null when no selected LSE is asked for
  int64_t ld;
  const int32_t* cu_q;
  const int32_t* cu_k;     // cumulative key lengths, or null when k_lens gives them per sequence
  const int32_t* k_lens;   // (paged plans: the kv lengths, so no kernel has to accumulate them)
  int batch;
  int num_kv_heads;
  int block_size;
  int k;
  int64_t total_q;
  int32_t* topk;  // [Hkv, total_q, k]
  int64_t topk_s0, topk_s1;
  float* selected_lse;  // [Hkv, total_q] or null
  int64_t lse_s0, lse_s1;
};

// Sorted insertion of (s, id) into the lane-distributed list of `len` lanes holding `filled` entries.
__device__ __forceinline__ void list_insert(float s, int id, float& my_s, int& my_id, int lane,
                                            int len, int filled) {
  const bool before =
      lane < len && (lane >= filled || rules::ranks_before(s, int64_t(id), my_s, int64_t(my_id)));
  const float up_s = __shfl_up_sync(0xffffffffu, my_s, 1);
  const int up_id = __shfl_up_sync(0xffffffffu, my_id, 1);
  // `before` holds on a suffix of the list: the new entry lands at its first lane, the rest shift.
  const unsigned at = __ballot_sync(0xffffffffu, before);
  const int first = __ffs(at) - 1;
  if (before) {
    my_s = lane == first ? s : up_s;
    my_id = lane == first ? id : up_id;
  }
}

// Descending bitonic sort of one float per lane across the warp.
__device__ __forceinline__ float warp_sort_descending(float v, int lane) {
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, j);
      const bool keep_max = ((lane & j) == 0) == ((lane & k) == 0 || k == 32);
      v = keep_max ? fmaxf(v, o) : fminf(v, o);
    }
  return v;
}

constexpr int kSegmentLoads = 8;  // float4 loads per lane in flight: 1024 candidates a segment

// The best `len` (<= 32) of candidates 0..count-1 (count > len): lane i < len ends with rank i.
// Candidates come in segments of 1024. Within a segment, the len-th largest of the 32 lane maxima is
// a lower bound on the segment's len-th best score (len lanes each hold a candidate at least that
// large), so only candidates at or above it, and ranking before the list's last entry, can enter.
__device__ __forceinline__ void select_ballot(const float* row, int64_t count, int len, int lane,
                                              float& my_s, int& my_id) {
  my_s = -INFINITY;
  my_id = 0x7fffffff;
  int filled = 0;
  float th_s = -INFINITY;
  int th_id = 0x7fffffff;
  for (int64_t base = 0; base < count; base += kSegmentLoads * 128) {
    float vals[kSegmentLoads][4];
#pragma unroll
    for (int i = 0; i < kSegmentLoads; ++i) {
      const int64_t first_id = base + i * 128 + lane * 4;
      float4 v = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      if (first_id < count) v = *reinterpret_cast<const float4*>(row + first_id);
      vals[i][0] = v.x;
      vals[i][1] = v.y;
      vals[i][2] = v.z;
      vals[i][3] = v.w;
    }
    float lane_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kSegmentLoads; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (base + i * 128 + lane * 4 + e < count) lane_max = fmaxf(lane_max, vals[i][e]);
    const float bound = __shfl_sync(0xffffffffu, warp_sort_descending(lane_max, lane), len - 1);
#pragma unroll
    for (int i = 0; i < kSegmentLoads; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t id = base + i * 128 + lane * 4 + e;
        const bool pass = id < count && !(vals[i][e] < bound) &&
                          (filled < len || rules::ranks_before(vals[i][e], id, th_s, int64_t(th_id)));
        unsigned todo = __ballot_sync(0xffffffffu, pass);
        while (todo) {
          const int src = __ffs(todo) - 1;
          todo &= todo - 1;
          const float s = __shfl_sync(0xffffffffu, vals[i][e], src);
          const int cid = int(base) + i * 128 + src * 4 + e;
          // The threshold may have risen since the ballot.
          if (filled == len && !rules::ranks_before(s, int64_t(cid), th_s, int64_t(th_id))) continue;
          list_insert(s, cid, my_s, my_id, lane, len, filled);
          filled = filled < len ? filled + 1 : len;
          th_s = __shfl_sync(0xffffffffu, my_s, len - 1);
          th_id = __shfl_sync(0xffffffffu, my_id, len - 1);
        }
      }
  }
}

__device__ __forceinline__ void warp_logsumexp_add(float x, float& m, float& s) {
  // Combines this lane's (m, s) with value x (x may be -inf for "nothing").
  const float m_new = fmaxf(m, x);
  if (m_new == -INFINITY) return;
  s = s * __expf(m - m_new) + __expf(x - m_new);
  m = m_new;
}

__device__ __forceinline__ float warp_logsumexp(float m, float s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, off);
    const float so = __shfl_xor_sync(0xffffffffu, s, off);
    const float m_new = fmaxf(m, mo);
    if (m_new != -INFINITY) {
      s = s * __expf(m - m_new) + so * __expf(mo - m_new);
      m = m_new;
    }
  }
  return m + logf(s);
}

// One (group, query) row of the select: where its candidates are and where its picks go.
struct SelectRow {
  int64_t local;  // the row's local block (forced into slot n); candidates are 0 .. local - 1
  int n;          // non-local picks
  const float* scores;
  const float* lses;  // or null
  int32_t* out;       // k slots
  float* selected_lse;  // or null
};

__device__ __forceinline__ SelectRow select_row(const SelectArgs& a, int64_t row) {
  const int g = int(row / a.total_q);
  const int64_t q = row - int64_t(g) * a.total_q;
  // Sequence of packed query q: the last b with cu_q[b] <= q.
  int lo = 0, hi = a.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.cu_q[mid] <= q) lo = mid; else hi = mid - 1;
  }
  const int64_t lq = a.cu_q[lo + 1] - a.cu_q[lo], lk = a.k_lens ? a.k_lens[lo] : a.cu_k[lo + 1] - a.cu_k[lo];
  const int64_t p = rules::query_position(lq, lk, q - a.cu_q[lo]);
  SelectRow r;
  r.local = rules::local_block(p, a.block_size);
  if (r.local >= a.ld) r.local = a.ld - 1;  // only with a wrong max_seqlen_k hint: stay in bounds
  r.n = rules::num_nonlocal_selected(r.local, a.k);
  r.scores = a.scores + row * a.ld;
  r.lses = a.lses ? a.lses + row * a.ld : nullptr;
  r.out = a.topk + int64_t(g) * a.topk_s0 + q * a.topk_s1;
  r.selected_lse = a.lses ? a.selected_lse + int64_t(g) * a.lse_s0 + q * a.lse_s1 : nullptr;
  return r;
}

// The list path's output (n <= kListLanes): lane i < n holds the pick of rank i; then the local
// block, unused slots, and the selected LSE over the picks and the local block.
__device__ __forceinline__ void finish_list(const SelectArgs& a, const SelectRow& r, int my_id, int lane) {
  for (int slot = lane; slot < a.k; slot += 32)
    r.out[slot] = slot < r.n ? my_id : slot == r.n ? int32_t(r.local) : rules::kUnusedSlot;
  if (r.lses) {
    float lse_m = -INFINITY, lse_s = 0.f;
    if (lane < r.n) warp_logsumexp_add(r.lses[my_id], lse_m, lse_s);
    if (lane == 0) warp_logsumexp_add(r.lses[r.local], lse_m, lse_s);
    const float lse = warp_logsumexp(lse_m, lse_s);
    if (lane == 0) *r.selected_lse = lse;
  }
}

__global__ void __launch_bounds__(kSelectWarps * 32, 3) select_topk_kernel(const SelectArgs a) {
  wait_for_prior_grid_then_release_next();
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kSelectWarps + (threadIdx.x >> 5);
  if (row >= int64_t(a.num_kv_heads) * a.total_q) return;
  const SelectRow r = select_row(a, row);
  const int64_t local = r.local;
  const int n = r.n;
  const float* srow = r.scores;
  const float* lrow = r.lses;
  int32_t* out = r.out;

  if (n <= kListLanes) {
    float my_s = -INFINITY;
    int my_id = lane;  // n == local: every candidate is chosen, lane i takes block i
    if (n > 0 && n < local) select_ballot(srow, local, n, lane, my_s, my_id);
    finish_list(a, r, my_id, lane);
    return;
  }
  // k - 1 > 32: n rounds, each the warp's best among the candidates ranking after the last pick.
  float lse_m = -INFINITY, lse_s = 0.f;
  float prev_s = INFINITY;
  int64_t prev_id = -1;
  for (int rd = 0; rd < n; ++rd) {
    float best_s = -INFINITY;
    int64_t best_id = -1;
    for (int64_t j = lane; j < local; j += 32) {
      const float s = srow[j];
      const bool after = rd == 0 || rules::ranks_before(prev_s, prev_id, s, j);
      if (after && (best_id < 0 || rules::ranks_before(s, j, best_s, best_id))) {
        best_s = s;
        best_id = j;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float os = __shfl_xor_sync(0xffffffffu, best_s, off);
      const int64_t oid = __shfl_xor_sync(0xffffffffu, best_id, off);
      if (oid >= 0 && (best_id < 0 || rules::ranks_before(os, oid, best_s, best_id))) {
        best_s = os;
        best_id = oid;
      }
    }
    if (lane == 0) out[rd] = int32_t(best_id);
    if (lrow && lane == 0) warp_logsumexp_add(lrow[best_id], lse_m, lse_s);
    prev_s = best_s;
    prev_id = best_id;
  }
  for (int slot = n + lane; slot < a.k; slot += 32)
    out[slot] = slot == n ? int32_t(local) : rules::kUnusedSlot;
  if (lrow) {
    if (lane == 0) warp_logsumexp_add(lrow[local], lse_m, lse_s);
    const float lse = warp_logsumexp(lse_m, lse_s);
    if (lane == 0) *r.selected_lse = lse;
  }
}

// Ascending bitonic sort of (id, score) pairs by id across the warp (empty lanes: id INT_MAX).
__device__ __forceinline__ void warp_sort_by_id(int& id, float& s, int lane) {
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1)
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const int oid = __shfl_xor_sync(0xffffffffu, id, j);
      const float os = __shfl_xor_sync(0xffffffffu, s, j);
      const bool ascending = (lane & k) == 0 || k == 32;
      const bool keep_min = ((lane & j) == 0) == ascending;
      if (keep_min ? oid < id : oid > id) {
        id = oid;
        s = os;
      }
    }
}

// Rows that are few and long (decode at long context: batch 1 at 1M is 4 rows of 8192 blocks, which
// one warp each took 36 us on the H100): one CTA a row, each of its kWarps warps picks the best n of
// a contiguous part of the candidates, then warp 0 picks the best n of those. Exact: the row's best n
// are among the best n of the part each falls in. The parts' picks are laid out in id order, so
// select_ballot's ties (by position) break by id as in select_topk_kernel, which lists the same picks
// in the same order. List path only (k - 1 <= kListLanes; paged_run.cu checks).
template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1) select_topk_split_kernel(const SelectArgs a) {
  wait_for_prior_grid_then_release_next();
  __shared__ __align__(16) float pick_s[kWarps * kListLanes + 4];  // + 4: select_ballot's float4 tail
  __shared__ int pick_id[kWarps * kListLanes];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (int64_t(blockIdx.x) >= int64_t(a.num_kv_heads) * a.total_q) return;
  const SelectRow r = select_row(a, blockIdx.x);
  const int64_t local = r.local;
  const int n = r.n;
  if (n == 0 || n >= local) {  // nothing to choose between (as select_topk_kernel)
    if (warp == 0) finish_list(a, r, lane, lane);
    return;
  }
  // Part w: [w * per, (w + 1) * per), per a multiple of 4 (select_ballot's float4 loads stay aligned);
  // it passes on min(n, its candidates) picks.
  const int64_t per = (local + 4 * kWarps - 1) / (4 * kWarps) * 4;
  auto part_begin = [&](int w) { return min(local, w * per); };
  auto picks_before = [&](int w) {  // picks of parts 0 .. w - 1
    int64_t picks = 0;
    for (int v = 0; v < w; ++v) picks += min(int64_t(n), part_begin(v + 1) - part_begin(v));
    return picks;
  };
  const int64_t lo = part_begin(warp), count = part_begin(warp + 1) - lo;
  float my_s = -INFINITY;  // lanes past the part's picks keep these
  int my_id = 0x7fffffff;
  if (count > n) {
    select_ballot(r.scores + lo, count, n, lane, my_s, my_id);
    if (lane < n) my_id += int(lo);
  } else if (lane < count) {
    my_s = r.scores[lo + lane];
    my_id = int(lo + lane);
  }
  warp_sort_by_id(my_id, my_s, lane);
  // This part's picks after those of the parts before it: positions follow ids.
  const int64_t at = picks_before(warp);
  if (lane < min(int64_t(n), count)) {
    pick_s[at + lane] = my_s;
    pick_id[at + lane] = my_id;
  }
  __syncthreads();
  if (warp != 0) return;
  const int64_t total = picks_before(kWarps);
  int pick = lane;  // total == n: every part's picks are chosen
  if (total > n) select_ballot(pick_s, total, n, lane, my_s, pick);
  finish_list(a, r, lane < n ? pick_id[pick] : 0, lane);
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
