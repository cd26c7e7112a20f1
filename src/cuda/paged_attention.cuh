// CUDA paged main branch (decode and chunked prefill). One CTA = one request x one query tile x the
// G heads of one group (rows = queries x G, at most kMaxRows, packed so every K/V page read serves
// all of them) x one key split. The CTA's blocks are the union of the blocks its queries selected
// (all blocks up to the last query's local block in dense mode), in ascending order; split s takes
// the s-th equal share of that list. Each page is read 32 keys at a time with 16-byte loads into
// shared memory (FP8 pages dequantised with the (page, group) scale), scored with FFMA (a warp per
// row, a lane per key, online softmax in registers and warp shuffles) and accumulated into O held in
// registers (a thread per (row set, 4 columns)). With one split the CTA writes out/lse; with more it
// writes unnormalised partials (o, max, sum; log2 domain) that merge_kernel combines by LSE.
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

constexpr int kAttnKeys = 32;  // keys per shared-memory chunk: one per lane
constexpr int kScoreRows = 4;  // rows a warp scores per pass over a K chunk (register blocking)

struct AttentionArgs {
  const void* q;  // [total_q, Hq, D] of T
  int64_t q_s0, q_s1;
  const unsigned char *k, *v;  // [num_pages, B, Hkv, D], T or FP8; strides in bytes
  int64_t k_s0, k_s1, k_s2, v_s0, v_s1, v_s2;
  bool k_fp8, v_fp8;
  const float *k_scale, *v_scale;
  int64_t ks_s0, ks_s1, vs_s0, vs_s1;
  const int32_t* cu_q;
  const int32_t* kv_lens;
  const int32_t* page_table;
  int64_t pt_s0, pt_s1, num_pages;
  const int32_t* topk;  // [Hkv, total_q, k]; null in dense mode
  int64_t tk_s0, tk_s1;
  int topk_k;
  void* out;  // [total_q, Hq, D] of T
  int64_t o_s0, o_s1;
  float* lse;
  int64_t l_s0, l_s1;
  float* part_o;   // [splits, total_q, Hq, D]
  float* part_ml;  // m then l: [2, splits, total_q, Hq]
  int64_t max_blocks;
  PlanBounds bounds;  // total_q: rows of q / out / lse / topk
  // Entries of the shared block mask and list: max_blocks when sparse, 0 in dense mode (which has
  // neither). The same number sized the shared memory (attention_smem_bytes), so the staging
  // buffer behind them starts where the host counted it.
  int64_t list_cap;
  // mma kernel: entries of its block list and staged page ids (and FP8 scales): the blocks one tile
  // can attend to, at most tile queries x k (sparse; 0 in dense mode).
  int64_t union_cap;
  int hkv, G, Hq, block_size;
  float qscale;  // softmax scale x log2(e)
  int tile_q, tiles, splits;
  int row_cap;  // rows of the largest tile of this plan (<= kMaxRows): sizes the row arrays
  int stage_esize;  // bytes per element of the staging slots: the larger of the K and V caches'
  // mma kernel, sparse: 1 when the split's page ids (and FP8 scales) are staged in shared memory up
  // front; 0 when that would not fit (very long requests): each chunk reads the page table then.
  int stage_pages;
};

template <int D>
constexpr int cols4() { return D / 4; }  // float4 column groups of a row
template <int D>
constexpr int rows_per_thread() { return kMaxRows / (kThreads / cols4<D>()); }

template <int D>
inline std::size_t attention_smem_bytes(int row_cap, int64_t max_blocks, int stage_esize) {
  return sizeof(float) * (std::size_t(row_cap) * (D + 4) + 2 * std::size_t(kAttnKeys) * (D + 4) +
                          std::size_t(row_cap) * kAttnKeys + 3 * std::size_t(row_cap)) +
         2 * sizeof(uint32_t) * std::size_t(max_blocks) + 16 +
         2 * std::size_t(kAttnKeys) * D * std::size_t(stage_esize) + 16;  // raw K/V staging
}

// A tile that met a page id outside the cache (the device cannot throw as the CPU does) overwrites
// what it wrote with NaN: out and lse with one split; with several, its partial's (max, sum) become
// (+inf, NaN), so merge_kernel weights it exp2(inf - inf) and the merged row is NaN too. The index
// ranks such blocks first (kBadPageScore), so a bad page table shows in the rows that use it instead
// of being skipped. Called by every thread after the tile's writes, only when bad_page is set.
template <class T, int D>
__device__ void poison_tile(const AttentionArgs& a, int split, int64_t qfirst, int g, int rows) {
  __syncthreads();  // other threads wrote these rows
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    const int64_t qrow = qfirst + i / a.G;
    const int head = g * a.G + i % a.G;
    if (a.splits == 1) {
      T* o = static_cast<T*>(a.out) + qrow * a.o_s0 + int64_t(head) * a.o_s1;
      for (int d = 0; d < D; ++d) o[d] = from_float<T>(NAN);
      a.lse[qrow * a.l_s0 + int64_t(head) * a.l_s1] = NAN;
    } else {
      const int64_t prow = (int64_t(split) * a.bounds.total_q + qrow) * a.Hq + head;
      a.part_ml[prow] = INFINITY;
      a.part_ml[int64_t(a.splits) * a.bounds.total_q * a.Hq + prow] = NAN;
    }
  }
}

// Combines the splits of one (query, head) row by their LSE (one warp; `row` = query * Hq + head).
// Lane s % 32 holds split s's m and l, and the O rows of kMergeRound splits are loaded before any is
// used, so the loads of m, l and the first round go out together: about one L2 round trip a row up
// to kMergeRound splits (a dependent loop over the splits cost ~0.7 us a split; batch 1 at 128K has
// 16). A split with l == 0 contributes nothing (its O is read but selected away); a poisoned one
// (m = +inf, l = NaN) makes the row NaN.
constexpr int kMergeRound = 8;
template <class T, int D>
__device__ __forceinline__ void merge_row(const AttentionArgs& a, int64_t row, int lane) {
  static_assert(kMaxSplits <= 64, "two splits per lane");
  const int64_t qrow = row / a.Hq;
  const int head = int(row - qrow * a.Hq);
  const int64_t stride = a.bounds.total_q * a.Hq;
  const int splits = a.splits;
  const float* pm = a.part_ml;
  const float* pl = a.part_ml + int64_t(splits) * stride;
  float x[kMergeRound][D / 32];  // the O rows of a round of splits
  auto load_round = [&](int s0) {
#pragma unroll
    for (int u = 0; u < kMergeRound; ++u) {
      const bool in = s0 + u < splits;  // past the last split: no load (2 splits read 2 rows, not 8)
      const float* po = a.part_o + ((in ? s0 + u : 0) * stride + row) * D;
#pragma unroll
      for (int e = 0; e < D / 32; ++e) x[u][e] = in ? po[lane + 32 * e] : 0.f;
    }
  };
  load_round(0);  // before m and l are combined: its loads need neither
  float m_s[2], l_s[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int s = lane + 32 * i;
    m_s[i] = s < splits ? pm[s * stride + row] : -INFINITY;
    l_s[i] = s < splits ? pl[s * stride + row] : 0.f;
  }
  float mmax = fmaxf(m_s[0], m_s[1]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mmax = fmaxf(mmax, __shfl_xor_sync(0xffffffffu, mmax, off));
  float w_s[2], sum = 0.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const bool take = mmax != -INFINITY && l_s[i] != 0.f;
    w_s[i] = take ? exp2f(m_s[i] - mmax) : 0.f;
    if (take) sum += l_s[i] * w_s[i];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  float o[D / 32];
#pragma unroll
  for (int e = 0; e < D / 32; ++e) o[e] = 0.f;
  for (int s0 = 0; s0 < splits; s0 += kMergeRound) {
    if (s0 > 0) load_round(s0);
#pragma unroll
    for (int u = 0; u < kMergeRound; ++u) {
      const int s = s0 + u;
      const float w = __shfl_sync(0xffffffffu, s < 32 ? w_s[0] : w_s[1], s & 31);
      const float l = __shfl_sync(0xffffffffu, s < 32 ? l_s[0] : l_s[1], s & 31);
      const bool take = s < splits && l != 0.f && mmax != -INFINITY;
#pragma unroll
      for (int e = 0; e < D / 32; ++e) o[e] = take ? fmaf(w, x[u][e], o[e]) : o[e];  // a select, not a product
    }
  }
  const float inv = sum == 0.f ? 0.f : 1.f / sum;
  T* out = static_cast<T*>(a.out) + qrow * a.o_s0 + int64_t(head) * a.o_s1;
#pragma unroll
  for (int e = 0; e < D / 32; ++e) out[lane + 32 * e] = from_float<T>(o[e] * inv);
  constexpr float kLn2 = 0.693147180559945309f;
  if (lane == 0)
    a.lse[qrow * a.l_s0 + int64_t(head) * a.l_s1] = sum == 0.f ? -INFINITY : (mmax + log2f(sum)) * kLn2;
}

// Ascending compaction of the mask's non-empty entries into list (and their number into *list_len),
// each warp a contiguous range of whole ballots: count, then place after the warps before it (one
// warp scanning them all took ~1.3k cycles at 128K, 8x that at 1M, on every CTA's path to its first
// copy). Not inlined: inlined, it pushed the FFMA attention kernel past its register budget (spill).
static __device__ __noinline__ void compact_blocks(const uint32_t* mask, int32_t* list, int* list_len, int nb) {
  constexpr int kWarps = kThreads / 32;
  __shared__ int warp_count[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per = (nb + 32 * kWarps - 1) / (32 * kWarps) * 32;
  const int lo = warp * per, hi = min(nb, lo + per);
  int n = 0;
  for (int j0 = lo; j0 < hi; j0 += 32)
    n += __popc(__ballot_sync(0xffffffffu, j0 + lane < hi && mask[j0 + lane] != 0u));
  if (lane == 0) warp_count[warp] = n;
  __syncthreads();
  n = 0;
  for (int w = 0; w < warp; ++w) n += warp_count[w];
  for (int j0 = lo; j0 < hi; j0 += 32) {
    const int j = j0 + lane;
    const bool on = j < hi && mask[j] != 0u;
    const unsigned bal = __ballot_sync(0xffffffffu, on);
    if (on) list[n + __popc(bal & ((1u << lane) - 1u))] = j;
    n += __popc(bal);
  }
  if (warp == kWarps - 1 && lane == 0) *list_len = n;
}

// The tile's blocks: the union of its queries' selections, each block with the bits of the
// queries that selected it (mask[j]), listed ascending (list); dense mode: every block up to nb,
// visible by position alone (neither array is used). Returns their number. Called by every thread
// of the CTA (it synchronises); both attention kernels take their blocks from here.
__device__ __forceinline__ int64_t tile_blocks(const AttentionArgs& a, uint32_t* mask, int32_t* list,
                                               int* list_len, int r, int g, int64_t qbase, int q0, int nq,
                                               int64_t nb) {
  const int t = threadIdx.x;
  const bool dense = a.topk == nullptr;
  if (!dense) {
    for (int64_t j = t; j < nb; j += kThreads) mask[j] = 0u;
    __syncthreads();
    for (int i = t; i < nq * a.topk_k; i += kThreads) {
      const int qi = i / a.topk_k, slot = i - qi * a.topk_k;
      const int32_t j = a.topk[int64_t(g) * a.tk_s0 + (qbase + q0 + qi) * a.tk_s1 + slot];
      if (j >= 0 && j < nb) {
        atomicOr(&mask[j], 1u << qi);
        // The block's page id is the next load on the CTA's path to its first K/V copy: start it
        // towards L2 now, so its DRAM latency overlaps the compaction below.
        asm volatile("prefetch.global.L2 [%0];" ::"l"(a.page_table + int64_t(r) * a.pt_s0 + int64_t(j) * a.pt_s1));
      }
    }
    __syncthreads();
    compact_blocks(mask, list, list_len, int(nb));
  }
  __syncthreads();
  return dense ? nb : *list_len;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) attention_kernel(const AttentionArgs a) {
  wait_for_prior_grid_then_release_next();
  constexpr int DP = D + 4, C4 = cols4<D>(), RPT = rows_per_thread<D>(), RSTEP = kThreads / C4;
  extern __shared__ float4 smem4[];
  const int cap = a.row_cap;
  float* qs = reinterpret_cast<float*>(smem4);  // [cap][DP], pre-scaled
  float* ks = qs + cap * DP;                    // [kAttnKeys][DP]
  float* vs = ks + kAttnKeys * DP;              // [kAttnKeys][DP]
  float* ps = vs + kAttnKeys * DP;              // [cap][kAttnKeys] probabilities
  float* row_m = ps + cap * kAttnKeys;          // running max (log2 domain)
  float* row_l = row_m + cap;                   // running sum
  float* row_alpha = row_l + cap;               // rescale of the last chunk
  uint32_t* mask = reinterpret_cast<uint32_t*>(row_alpha + cap);  // [list_cap] query bits
  int32_t* list = reinterpret_cast<int32_t*>(mask + a.list_cap);       // [list_cap] union
  // Raw K then V rows of a chunk as they are in the cache, [2][kAttnKeys][D / 8] slots of
  // 8 x stage_esize bytes: every load of the chunk is in flight at once (cp.async).
  unsigned char* stage = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(list + a.list_cap) + 15) & ~uintptr_t(15));
  const int slot_bytes = 8 * a.stage_esize;
  __shared__ int list_len;
  __shared__ int bad_page;  // a page id outside the cache was met (poison_tile)
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;

  int64_t id = blockIdx.x;
  const int split = int(id % a.splits);
  id /= a.splits;
  const int g = int(id % a.hkv);
  id /= a.hkv;
  const QueryTile qt = query_tile(id, a.tiles, a.tile_q, a.cu_q, a.kv_lens, a.bounds);
  if (qt.nq == 0) return;
  const int r = qt.r, q_len = qt.q_len, q0 = qt.q0, nq = qt.nq;
  const int64_t qbase = qt.qbase, kv = qt.kv;
  const int B = a.block_size, G = a.G;
  const int rows = nq * G;  // row = query * G + head in group
  const int64_t p_first = rules::query_position(q_len, kv, q0);
  const int64_t p_last = rules::query_position(q_len, kv, q0 + nq - 1);
  const int64_t nb = min(rules::local_block(p_last, B) + 1, a.max_blocks);
  if (t == 0) bad_page = 0;  // published by tile_blocks' barriers

  for (int i = t; i < rows * (D / 8); i += kThreads) {
    const int row = i / (D / 8), v = i - row * (D / 8);
    const T* src = static_cast<const T*>(a.q) + (qbase + q0 + row / G) * a.q_s0 +
                   int64_t(g * G + row % G) * a.q_s1 + v * 8;
    float x[8];
    load8<T>(src, x);
#pragma unroll
    for (int e = 0; e < 8; ++e) qs[row * DP + v * 8 + e] = x[e] * a.qscale;
  }
  if (t < cap) {
    row_m[t] = -INFINITY;
    row_l[t] = 0.f;
  }

  const bool dense = a.topk == nullptr;
  const int64_t count = tile_blocks(a, mask, list, &list_len, qt.r, g, qbase, q0, nq, nb);
  const int64_t b0 = count * split / a.splits, b1 = count * (split + 1) / a.splits;

  float acc[RPT][4];
#pragma unroll
  for (int i = 0; i < RPT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const int c4 = t % C4, rbase = t / C4;

  for (int64_t bi = b0; bi < b1; ++bi) {
    const int64_t j = dense ? bi : list[bi];
    const uint32_t qmask = dense ? 0xffffffffu : mask[j];
    const int64_t page = a.page_table[r * a.pt_s0 + j * a.pt_s1];
    if (page < 0 || page >= a.num_pages) {  // an id outside the cache is not read
      if (t == 0) bad_page = 1;             // (the same id in every thread)
      continue;
    }
    const float ksc = a.k_fp8 ? a.k_scale[page * a.ks_s0 + g * a.ks_s1] : 1.f;
    const float vsc = a.v_fp8 ? a.v_scale[page * a.vs_s0 + g * a.vs_s1] : 1.f;
    const int64_t kbeg = rules::block_begin(j, B);
    const int kend = int(min(int64_t(B), p_last + 1 - kbeg));  // keys past the last query: unread
    for (int c0 = 0; c0 < kend; c0 += kAttnKeys) {
      const int nk = min(kAttnKeys, kend - c0);
      // Each thread copies its vectors of the chunk (all in flight together), waits for its own
      // copies, then converts exactly those vectors to f32 rows; the barrier publishes them.
      const int kes = a.k_fp8 ? 1 : int(sizeof(T)), ves = a.v_fp8 ? 1 : int(sizeof(T));
      for (int i = t; i < 2 * nk * (D / 8); i += kThreads) {
        const bool is_v = i >= nk * (D / 8);
        const int ii = is_v ? i - nk * (D / 8) : i;
        const int key = ii / (D / 8), v = ii - key * (D / 8);
        const unsigned char* src =
            is_v ? a.v + page * a.v_s0 + (c0 + key) * a.v_s1 + g * a.v_s2 + int64_t(v) * 8 * ves
                 : a.k + page * a.k_s0 + (c0 + key) * a.k_s1 + g * a.k_s2 + int64_t(v) * 8 * kes;
        cp_async_vec8(stage + int64_t((is_v ? kAttnKeys : 0) + key) * (D / 8) * slot_bytes +
                          int64_t(v) * slot_bytes,
                      src, is_v ? ves : kes);
      }
      cp_async_wait_all();
      for (int i = t; i < 2 * nk * (D / 8); i += kThreads) {
        const bool is_v = i >= nk * (D / 8);
        const int ii = is_v ? i - nk * (D / 8) : i;
        const int key = ii / (D / 8), v = ii - key * (D / 8);
        const unsigned char* raw =
            stage + int64_t((is_v ? kAttnKeys : 0) + key) * (D / 8) * slot_bytes + int64_t(v) * slot_bytes;
        float x[8];
        if (is_v ? a.v_fp8 : a.k_fp8)
          load8_fp8(raw, is_v ? vsc : ksc, x);
        else
          load8<T>(reinterpret_cast<const T*>(raw), x);
        float* dst = (is_v ? vs : ks) + key * DP + v * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = x[e];
      }
      __syncthreads();
      // Scores and online softmax: a lane per key; a warp takes up to kScoreRows rows per pass
      // (rows warp, warp + 4, ...; fewer when there are few rows, so every warp has one), and each
      // K element it reads from shared memory serves all of them.
      constexpr int kWarps = kThreads / 32;
      const int rpw = min(kScoreRows, (rows + kWarps - 1) / kWarps);
      const int64_t key_pos = kbeg + c0 + lane;
      const float4* kk = reinterpret_cast<const float4*>(ks + lane * DP);
      for (int rb = warp; rb < rows; rb += rpw * kWarps) {
        int rr[kScoreRows];
        float dot[kScoreRows];
#pragma unroll
        for (int j = 0; j < kScoreRows; ++j) {
          rr[j] = min(rb + j * kWarps, rows - 1);  // rows past the end repeat the last one
          dot[j] = 0.f;
        }
        if (lane < nk) {
#pragma unroll 4
          for (int d = 0; d < D / 4; ++d) {
            const float4 y = kk[d];
#pragma unroll
            for (int j = 0; j < kScoreRows; ++j) {
              if (j < rpw) {  // warp-uniform
                const float4 x = reinterpret_cast<const float4*>(qs + rr[j] * DP)[d];
                dot[j] = fmaf(x.x, y.x, dot[j]);
                dot[j] = fmaf(x.y, y.y, dot[j]);
                dot[j] = fmaf(x.z, y.z, dot[j]);
                dot[j] = fmaf(x.w, y.w, dot[j]);
              }
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kScoreRows; ++j) {
          const int row = rb + j * kWarps;
          if (j >= rpw || row >= rows) continue;  // warp-uniform
          const int qi = row / G;
          const bool vis = lane < nk && ((qmask >> qi) & 1u) && rules::causally_visible(key_pos, p_first + qi);
          const float sc = vis ? dot[j] : -INFINITY;
          float cmax = sc;
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, off));
          const float m_old = row_m[row];
          const float m_new = fmaxf(m_old, cmax);
          const float pr = m_new == -INFINITY ? 0.f : exp2f(sc - m_new);
          float sum = pr;
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          ps[row * kAttnKeys + lane] = pr;
          __syncwarp();
          if (lane == 0) {
            const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_old - m_new);
            row_l[row] = row_l[row] * alpha + sum;
            row_m[row] = m_new;
            row_alpha[row] = alpha;
          }
        }
      }
      __syncthreads();
      // O += P V: a thread's rows share each V element it loads.
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int row = min(rbase + i * RSTEP, rows - 1);
        const float alpha = row_alpha[row];
        acc[i][0] *= alpha;
        acc[i][1] *= alpha;
        acc[i][2] *= alpha;
        acc[i][3] *= alpha;
      }
      for (int c = 0; c < nk; ++c) {
        const float4 vv = reinterpret_cast<const float4*>(vs + c * DP)[c4];
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          if (rbase + i * RSTEP < rows) {
            const float pc = ps[(rbase + i * RSTEP) * kAttnKeys + c];
            acc[i][0] = fmaf(pc, vv.x, acc[i][0]);
            acc[i][1] = fmaf(pc, vv.y, acc[i][1]);
            acc[i][2] = fmaf(pc, vv.z, acc[i][2]);
            acc[i][3] = fmaf(pc, vv.w, acc[i][3]);
          }
        }
      }
      __syncthreads();
    }
  }

  // Results: out/lse directly with one split, else this split's partial rows.
  constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int row = rbase + i * RSTEP;
    if (row >= rows) break;
    const int64_t qrow = qbase + q0 + row / G;
    const int head = g * G + row % G;
    if (a.splits == 1) {
      const float l = row_l[row], inv = l == 0.f ? 0.f : 1.f / l;
      T* o = static_cast<T*>(a.out) + qrow * a.o_s0 + int64_t(head) * a.o_s1 + c4 * 4;
      o[0] = from_float<T>(acc[i][0] * inv);
      o[1] = from_float<T>(acc[i][1] * inv);
      o[2] = from_float<T>(acc[i][2] * inv);
      o[3] = from_float<T>(acc[i][3] * inv);
      if (c4 == 0)
        a.lse[qrow * a.l_s0 + int64_t(head) * a.l_s1] =
            l == 0.f ? -INFINITY : (row_m[row] + log2f(l)) * kLn2;
    } else {
      const int64_t prow = (int64_t(split) * a.bounds.total_q + qrow) * a.Hq + head;
      reinterpret_cast<float4*>(a.part_o + prow * D)[c4] =
          make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      if (c4 == 0) {
        a.part_ml[prow] = row_m[row];
        a.part_ml[int64_t(a.splits) * a.bounds.total_q * a.Hq + prow] = row_l[row];
      }
    }
  }
  __syncthreads();  // thread 0 may have set bad_page after the last barrier
  if (bad_page) poison_tile<T, D>(a, split, qbase + q0, g, rows);
}

// The LSE merge as its own kernel after the attention: one warp per row.
template <class T, int D>
__global__ void __launch_bounds__(kThreads) merge_kernel(const AttentionArgs a) {
  wait_for_prior_grid_then_release_next();
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= a.bounds.total_q * a.Hq) return;
  merge_row<T, D>(a, row, threadIdx.x & 31);
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
