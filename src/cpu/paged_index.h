// CPU paged index branch (SPEC.md "Index branch") in two stages:
//  1. score_blocks: one work item = a query tile of one request x a range of its blocks; every
//     (query, group) row of the tile shares one pass over each ki page of the range (converted and
//     transposed once per 64-key chunk, scored by the index branch's register-blocked micro-kernel),
//     max-pooled per block over the row's visible keys into the plan's block-score region; bf16
//     queries on a CPU with AMX go through the index's key-major tile kernel instead
//     (score_blocks_amx), over bf16 pages in place or FP8 pages widened to bf16 a chunk at a time.
//  2. select_row: per (query, group) the local block plus the k-1 best earlier blocks, written in the
//     layout rules.h defines, with the same ordering as the contiguous index branch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/amx.h"
#include "cpu/element.h"
#include "cpu/index_simd.h"
#include "cpu/index_workspace.h"
#include "cpu/paged_fp8.h"
#include "cpu/paged_layout.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cpu {
namespace paged {

constexpr int kKeyChunk = 64;  // keys scored per step; a multiple of simd::kNR<float>

// Per-thread scratch of the index stages; with `amx`, also the bf16 rows of the tile-unit path.
struct IndexScratch {
  bool amx = false;
  std::size_t qpanel = 0, keys_t = 0, scores = 0, position = 0, candidates = 0, qtiles = 0,
              qpacked = 0, staged = 0, run_max = 0, bytes = 0;
  IndexScratch(int64_t max_rows, int di, int64_t max_blocks, bool with_amx) : amx(with_amx) {
    const int64_t rows_padded = (max_rows + simd::kMR - 1) / simd::kMR * simd::kMR;
    const int64_t rows_tiles = amx::packed_keys(max_rows);  // score tiles come in runs of 64 rows
    ScratchPlan p;
    qpanel = p.add<float>(rows_padded * di);
    keys_t = p.add<float>(int64_t(di) * kKeyChunk);
    // The tile-unit kernel's products are 32 keys x 32 rows.
    scores = p.add<float>(std::max<int64_t>(rows_padded * kKeyChunk, amx ? 32 * 32 : 0));
    position = p.add<int64_t>(std::max(max_rows, amx ? rows_tiles : 0));
    candidates = p.add<int32_t>(max_blocks);
    if (amx) {
      qtiles = p.add<uint16_t>(rows_tiles * amx::packed_dim(di));
      qpacked = p.add<uint16_t>(rows_tiles * amx::packed_dim(di));
      staged = p.add<uint16_t>(int64_t(kKeyChunk) * amx::packed_dim(di));
      run_max = p.add<float>(rows_tiles);
    }
    bytes = p.bytes;
  }
};

// Whether every page of the work item's blocks has a finite positive ki scale: then a block's maximum
// of unscaled scores times the scale is the maximum of the scaled scores.
inline bool ki_scales_positive(const PagedIndexWork& w, const TensorView& ki_scale, const TensorView& page_table) {
  for (int64_t j = w.block_begin; j < w.block_end; ++j) {
    const float sc = page_scale(ki_scale, page_of(page_table, w.request, j));
    if (!(std::isfinite(sc) && sc > 0.f)) return false;
  }
  return true;
}

// The tile-unit path of score_blocks (bf16 queries, blocks a multiple of 64 keys): the index's
// key-major kernel over each page (amx.h, index_chunk_max_key_major). bf16 rows are read in place;
// FP8 rows are widened exactly to bf16 codes a chunk at a time and the page scale (positive:
// ki_scales_positive) multiplies each block's maximum.
inline void score_blocks_amx(const PagedPlan& plan, const PagedIndexWork& w, const TensorView& qi,
                             const TensorView& ki_cache, const TensorView& ki_scale,
                             const TensorView& page_table, unsigned char* ws, unsigned char* mine,
                             const IndexScratch& lay) {
  const int hkv = plan.cfg.num_kv_heads, di = plan.cfg.index_head_dim, B = plan.cfg.block_size;
  const int dk = amx::packed_dim(di);
  uint16_t* qtiles = reinterpret_cast<uint16_t*>(mine + lay.qtiles);
  uint16_t* qpacked = reinterpret_cast<uint16_t*>(mine + lay.qpacked);
  uint16_t* staged = reinterpret_cast<uint16_t*>(mine + lay.staged);
  float* scores = reinterpret_cast<float*>(mine + lay.scores);
  float* run_max = reinterpret_cast<float*>(mine + lay.run_max);
  int64_t* position = reinterpret_cast<int64_t*>(mine + lay.position);
  const SequenceSpan s = request_span(plan, w.request);
  const int64_t nblk_req = rules::num_blocks(s.k_len, B);
  float* bscore = block_scores(ws, plan, w.request);
  const float iscale = plan.cfg.index_softmax_scale();

  const int64_t rows = int64_t(w.q_end - w.q_begin) * hkv, rows_tiles = amx::packed_keys(rows);
  for (int64_t r = 0; r < rows_tiles; ++r) {
    const uint16_t* src = r < rows ? row3<const uint16_t>(qi, s.q_begin + w.q_begin + r / hkv, r % hkv)
                                   : nullptr;
    for (int d = 0; d < dk; ++d) qtiles[r * dk + d] = src && d < di ? src[d] : uint16_t(0);
    if (r < rows) position[r] = s.query_position(w.q_begin + r / hkv);
  }
  amx::pack_key_major_rows(qtiles, rows, di, position, qpacked);
  const int64_t p_max = position[rows - 1];
  amx::ThreadTiles tile_unit;
  const bool fp8 = is_fp8(ki_cache);
  for (int64_t j = w.block_begin; j < w.block_end; ++j) {
    const int32_t page = page_of(page_table, w.request, j);
    const int64_t kbeg = rules::block_begin(j, B);
    const int64_t kend = std::min<int64_t>(kbeg + B, p_max + 1);
    std::fill(run_max, run_max + rows_tiles, -INFINITY);
    for (int64_t c0 = kbeg; c0 < kend; c0 += kKeyChunk) {
      const int nk = int(std::min<int64_t>(kKeyChunk, kend - c0));
      int64_t stride = ki_cache.stride[1];
      const uint16_t* keys;
      if (fp8) {
        amx::widen_fp8_chunk(ki_row<const uint8_t>(ki_cache, page, c0 - kbeg), stride, nk, di, staged);
        keys = staged;
        stride = dk;
      } else {
        // A page holds B slots, so a chunk's 64 rows are there even past the cached length (loaded,
        // but masked out); a head dim that is not a multiple of 32 is staged.
        keys = amx::key_chunk(ki_row<const uint16_t>(ki_cache, page, c0 - kbeg), &stride, nk, di, di == dk,
                              staged);
      }
      amx::index_chunk_max_key_major(keys, stride, di, nk, c0, qpacked, rows, position, scores,
                                     run_max);
    }
    // iscale > 0 (and the FP8 page scale > 0) and rounding is monotone: the max of the scaled scores
    // is the scaled max.
    const float scale = fp8 ? iscale * page_scale(ki_scale, page) : iscale;
    for (int64_t r = 0; r < rows; ++r) bscore[(w.q_begin * hkv + r) * nblk_req + j] = run_max[r] * scale;
  }
}

template <class T>
void score_blocks(const PagedPlan& plan, const PagedIndexWork& w, const TensorView& qi,
                  const TensorView& ki_cache, const TensorView& ki_scale,
                  const TensorView& page_table, unsigned char* ws,
                  unsigned char* mine, const IndexScratch& lay) {
  constexpr int MR = simd::kMR, NR = simd::kNR<float>;
  const int hkv = plan.cfg.num_kv_heads, di = plan.cfg.index_head_dim, B = plan.cfg.block_size;
  if constexpr (std::is_same_v<T, bf16>)
    if (lay.amx && B % kKeyChunk == 0 && (!is_fp8(ki_cache) || ki_scales_positive(w, ki_scale, page_table)))
      return score_blocks_amx(plan, w, qi, ki_cache, ki_scale, page_table, ws, mine, lay);
  float* qpanel = reinterpret_cast<float*>(mine + lay.qpanel);
  float* keys_t = reinterpret_cast<float*>(mine + lay.keys_t);
  float* scores = reinterpret_cast<float*>(mine + lay.scores);
  int64_t* position = reinterpret_cast<int64_t*>(mine + lay.position);
  const SequenceSpan s = request_span(plan, w.request);
  const int64_t nblk_req = rules::num_blocks(s.k_len, B);
  float* bscore = block_scores(ws, plan, w.request);
  const float iscale = plan.cfg.index_softmax_scale();

  // Rows (query, group), ordered by position; packed (pre-scaled) as panels [d][MR].
  const int64_t rows = int64_t(w.q_end - w.q_begin) * hkv;
  const int64_t panels = (rows + MR - 1) / MR;
  for (int64_t r = 0; r < panels * MR; ++r) {
    float* dst = qpanel + (r / MR) * di * MR + r % MR;
    if (r < rows) {
      const T* src = row3<const T>(qi, s.q_begin + w.q_begin + r / hkv, r % hkv);
      for (int d = 0; d < di; ++d) dst[d * MR] = to_float(src[d]) * iscale;
      position[r] = s.query_position(w.q_begin + r / hkv);
    } else {
      for (int d = 0; d < di; ++d) dst[d * MR] = 0.f;
    }
  }
  const int64_t p_max = position[rows - 1];
  auto score_row = [&](int64_t r) { return bscore + (w.q_begin * hkv + r) * nblk_req; };

  for (int64_t j = w.block_begin; j < w.block_end; ++j) {
    for (int64_t r = 0; r < rows; ++r) score_row(r)[j] = -INFINITY;
    const int32_t page = page_of(page_table, w.request, j);
    const int64_t kbeg = rules::block_begin(j, B);
    const int64_t kend = std::min<int64_t>(kbeg + B, p_max + 1);
    for (int64_t c0 = kbeg; c0 < kend; c0 += kKeyChunk) {
      const int nk = int(std::min<int64_t>(kKeyChunk, kend - c0));
      const int ncols = (nk + NR - 1) / NR * NR;
      if (is_fp8(ki_cache)) {
        const float* table = fp8_table().data();
        const float sc = page_scale(ki_scale, page);
        for (int t = 0; t < nk; ++t) {
          const uint8_t* src = ki_row<const uint8_t>(ki_cache, page, c0 - kbeg + t);
          for (int d = 0; d < di; ++d) keys_t[d * kKeyChunk + t] = table[src[d]] * sc;
        }
      } else {
        for (int t = 0; t < nk; ++t) {
          const T* src = ki_row<const T>(ki_cache, page, c0 - kbeg + t);
          for (int d = 0; d < di; ++d) keys_t[d * kKeyChunk + t] = to_float(src[d]);
        }
      }
      for (int d = 0; d < di && nk < ncols; ++d)
        std::fill(keys_t + d * kKeyChunk + nk, keys_t + d * kKeyChunk + ncols, 0.f);
      // Panels whose last row cannot see c0 are skipped.
      int64_t first_panel = 0;
      while (position[std::min(rows - 1, first_panel * MR + MR - 1)] < c0) ++first_panel;
      for (int n0 = 0; n0 < ncols; n0 += NR)
        for (int64_t pn = first_panel; pn < panels; ++pn)
          simd::score_micro_kernel<float>(qpanel + pn * di * MR, keys_t + n0, kKeyChunk, di,
                                          scores + pn * MR * kKeyChunk + n0, kKeyChunk);
      for (int64_t r = first_panel * MR; r < rows; ++r) {
        const int64_t end = std::min<int64_t>(c0 + nk, position[r] + 1);
        if (end <= c0) continue;
        float& bm = score_row(r)[j];
        bm = std::max(bm, simd::segment_max<float>(scores + r * kKeyChunk, int(end - c0)));
      }
    }
  }
}

// Selection of query `i` of request `r`, group g, from the block scores (logical ids into topk).
inline void select_row(const PagedPlan& plan, int r, int64_t i, int g, unsigned char* ws,
                       int32_t* cand, const TensorView& topk) {
  const int B = plan.cfg.block_size, K = plan.cfg.topk, hkv = plan.cfg.num_kv_heads;
  const SequenceSpan s = request_span(plan, r);
  const int64_t nblk_req = rules::num_blocks(s.k_len, B);
  float* bm = block_scores(ws, plan, r) + (i * hkv + g) * nblk_req;
  const int64_t local = rules::local_block(s.query_position(i), B);
  const int n = rules::num_nonlocal_selected(local, K);
  // A NaN score has no rank; treat it as the lowest so the ordering stays strict and weak.
  for (int64_t j = 0; j < local; ++j) {
    if (std::isnan(bm[j])) bm[j] = -INFINITY;
    cand[j] = int32_t(j);
  }
  auto before = [bm](int32_t a, int32_t b) { return rules::ranks_before(bm[a], a, bm[b], b); };
  if (n < local) std::nth_element(cand, cand + n, cand + local, before);
  std::sort(cand, cand + n, before);
  int32_t* out = row3<int32_t>(topk, g, s.q_begin + i);
  for (int k = 0; k < n; ++k) out[k] = cand[k];
  out[n] = int32_t(local);
  for (int k = n + 1; k < K; ++k) out[k] = rules::kUnusedSlot;
}

}  // namespace paged
}  // namespace cpu
}  // namespace detail
}  // namespace msa
