// CPU paged main branch (SPEC.md "Main branch"). One work item = a query tile x the G heads of one
// group of one request, and one key split of the union of the blocks its queries selected (all
// visible blocks in dense mode). The tile plan, geometry and micro-kernels are the contiguous
// forward's (attention_tile.h, attention_simd.h); only the K/V rows come from pages. A single split
// writes out/lse; several leave unnormalised (o, max, sum) partials that merge_splits combines by LSE.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/amx.h"
#include "cpu/attention_simd.h"
#include "cpu/attention_tile.h"
#include "cpu/paged_fp8.h"
#include "cpu/paged_layout.h"

namespace msa {
namespace detail {
namespace cpu {
namespace paged {

using attn::kLn2;
using attn::kLog2e;

// The contiguous forward's geometry for the longest request of the plan.
inline attn::Geometry attention_geometry(const PagedPlan& plan) {
  Problem p;
  p.cfg = plan.cfg;
  p.varlen.max_seqlen_k = plan.max_kv_len;
  return attn::Geometry(p, plan.options.dense, attn::column_step<float>());
}

struct AttentionScratch {
  float *q, *o, *m, *l, *kbuf, *vbuf, *scores;
  const float **krows, **vrows;
  int64_t* pos;
  int32_t* rows;
  attn::TilePlan plan;
  bool fp8_vector;  // FP8 K / V rows through amx::dequantise_fp8_rows (decided once per run and thread)

  AttentionScratch(attn::Carver& c, const attn::Geometry& geo) : fp8_vector(amx::usable()) {
    q = c.take<float>(int64_t(geo.rows) * geo.Dp);
    o = c.take<float>(int64_t(geo.rows) * geo.Dp);
    m = c.take<float>(geo.rows);
    l = c.take<float>(geo.rows);
    kbuf = c.take<float>(int64_t(geo.B) * geo.Dp);
    vbuf = c.take<float>(int64_t(geo.B) * geo.Dp);
    scores = c.take<float>(int64_t(attn::kRows) * geo.Bs);
    krows = c.take<const float*>(geo.B);
    vrows = c.take<const float*>(geo.B);
    pos = c.take<int64_t>(geo.tile_q);
    rows = c.take<int32_t>(geo.rows);
    plan = attn::take_plan(c, geo);
  }
};

// Rows of a K or V page as f32 rows: in place for f32 pages with unpadded rows, else converted
// (FP8 pages: dequantised with the (page, group) scale).
template <class T>
inline void page_rows(const attn::Geometry& geo, const TensorView& cache, const TensorView& scale,
                      int32_t page, int group, int nkeys, bool fp8_vector, float* buf, const float** rows) {
  if (is_fp8(cache)) {
    const float sc = page_scale(scale, page, group);
    if (fp8_vector)  // a page's rows of one group are cache.stride[1] bytes apart
      amx::dequantise_fp8_rows(kv_row<const uint8_t>(cache, page, 0, group), cache.stride[1], nkeys, geo.D, sc, buf,
                               geo.Dp);
    for (int i = 0; i < nkeys; ++i) {
      float* dst = buf + int64_t(i) * geo.Dp;
      if (!fp8_vector) dequantise_row(kv_row<const uint8_t>(cache, page, i, group), geo.D, sc, dst, geo.Dp);
      rows[i] = dst;
    }
    return;
  }
  for (int i = 0; i < nkeys; ++i) {
    const T* src = kv_row<const T>(cache, page, i, group);
    if constexpr (std::is_same_v<T, float>) {
      if (geo.Dp == geo.D) {
        rows[i] = src;
        continue;
      }
    }
    float* dst = buf + int64_t(i) * geo.Dp;
    attn::load_row<T, float>(src, geo.D, 1.f, dst, geo.Dp);
    rows[i] = dst;
  }
}

// Partial rows of a split: o [rows][Dp], then m [rows], then l [rows] (m and l in the log2 domain).
inline int64_t partial_floats(const attn::Geometry& geo, int rows) {
  return int64_t(rows) * (geo.Dp + 2);
}

template <class T>
void attend_tile(const PagedPlan& plan, const attn::Geometry& geo, const PagedAttentionWork& w,
                 const TensorView& q, const PagedKVCache& cache, const TensorView& page_table,
                 const TensorView& topk, const TensorView& out, const TensorView& lse,
                 unsigned char* ws, AttentionScratch& sc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int G = geo.G, Dp = geo.Dp, D = geo.D;
  const SequenceSpan s = request_span(plan, w.request);
  const attn::TileItem it{w.request, w.q_begin, w.q_end - w.q_begin, w.group};
  const float qscale = float(double(plan.cfg.softmax_scale()) * kLog2e);

  for (int qi = 0; qi < it.nq; ++qi) {
    sc.pos[qi] = s.query_position(it.q0 + qi);
    for (int h = 0; h < G; ++h) {
      const int r = qi * G + h;
      attn::load_row<T, float>(row3<const T>(q, s.q_begin + it.q0 + qi, it.group * G + h), D,
                               qscale, sc.q + int64_t(r) * Dp, Dp);
      std::fill(sc.o + int64_t(r) * Dp, sc.o + int64_t(r + 1) * Dp, 0.f);
      sc.m[r] = kNegInf;
      sc.l[r] = 0;
    }
  }

  attn::plan_tile(geo, s, it, topk, sc.plan);
  const int b0 = int(int64_t(sc.plan.nblocks) * w.split / w.splits);
  const int b1 = int(int64_t(sc.plan.nblocks) * (w.split + 1) / w.splits);
  for (int bi = b0; bi < b1; ++bi) {
    const int64_t j = sc.plan.block[bi];
    const int32_t* parts = sc.plan.query + sc.plan.offset[bi];
    const int nparts = sc.plan.offset[bi + 1] - sc.plan.offset[bi];
    const int nkeys = attn::visible_in_block(geo, j, sc.pos[parts[nparts - 1]]);
    const int npad = int(attn::round_up(nkeys, attn::kScorePad));
    const int32_t page = page_of(page_table, w.request, j);
    page_rows<T>(geo, cache.k, cache.k_scale, page, it.group, nkeys, sc.fp8_vector, sc.kbuf, sc.krows);
    page_rows<T>(geo, cache.v, cache.v_scale, page, it.group, nkeys, sc.fp8_vector, sc.vbuf, sc.vrows);

    int nrows = 0;
    for (int pi = 0; pi < nparts; ++pi)
      for (int h = 0; h < G; ++h) sc.rows[nrows++] = parts[pi] * G + h;
    for (int r0 = 0; r0 < nrows; r0 += attn::kRows) {
      const int nr = std::min(attn::kRows, nrows - r0);
      const float* qrows[attn::kRows];
      float* orows[attn::kRows];
      for (int i = 0; i < nr; ++i) {
        qrows[i] = sc.q + int64_t(sc.rows[r0 + i]) * Dp;
        orows[i] = sc.o + int64_t(sc.rows[r0 + i]) * Dp;
      }
      attn::dot_tile<float>(qrows, nr, sc.krows, nkeys, Dp, sc.scores, geo.Bs);
      for (int i = 0; i < nr; ++i) {
        const int r = sc.rows[r0 + i];
        float* srow = sc.scores + int64_t(i) * geo.Bs;
        const int vis = attn::visible_in_block(geo, j, sc.pos[r / G]);
        for (int t = vis; t < npad; ++t) srow[t] = kNegInf;
        const float m_new = std::max(sc.m[r], attn::row_max<float>(srow, npad));
        const float alpha = std::exp2(sc.m[r] - m_new);
        sc.l[r] = sc.l[r] * alpha + attn::exp2_shift_sum<float>(srow, npad, m_new);
        sc.m[r] = m_new;
        if (alpha != 1.f)
          for (int d = 0; d < Dp; ++d) orows[i][d] *= alpha;
      }
      attn::axpy_tile<float>(orows, nr, sc.scores, geo.Bs, 1, sc.vrows, nkeys, Dp);
    }
  }

  const int rows = it.nq * G;
  if (w.splits > 1) {
    float* part = partials(ws, plan, w.partial_offset);
    std::copy(sc.o, sc.o + int64_t(rows) * Dp, part);
    std::copy(sc.m, sc.m + rows, part + int64_t(rows) * Dp);
    std::copy(sc.l, sc.l + rows, part + int64_t(rows) * Dp + rows);
    return;
  }
  for (int qi = 0; qi < it.nq; ++qi) {
    const int64_t row = s.q_begin + it.q0 + qi;
    float* lrow = row2<float>(lse, row);
    for (int h = 0; h < G; ++h) {
      const int r = qi * G + h;
      const int head = it.group * G + h;
      const bool empty = sc.l[r] == 0.f;
      attn::store_row<T, float>(sc.o + int64_t(r) * Dp, empty ? 0.f : 1.f / sc.l[r],
                                row3<T>(out, row, head), D);
      lrow[head] = empty ? kNegInf : float((double(sc.m[r]) + std::log2(double(sc.l[r]))) * kLn2);
    }
  }
}

// Combines the partials of the splits of `first` (the split-0 item; its siblings follow it).
template <class T>
void merge_splits(const PagedPlan& plan, const attn::Geometry& geo, const PagedAttentionWork* first,
                  const TensorView& out, const TensorView& lse, unsigned char* ws, float* orow) {
  const int G = geo.G, Dp = geo.Dp, D = geo.D;
  const int nq = first->q_end - first->q_begin, rows = nq * G;
  const SequenceSpan s = request_span(plan, first->request);
  for (int r = 0; r < rows; ++r) {
    float mmax = -std::numeric_limits<float>::infinity();
    for (int k = 0; k < first->splits; ++k) {
      const float* part = partials(ws, plan, first[k].partial_offset);
      mmax = std::max(mmax, part[int64_t(rows) * Dp + r]);
    }
    float sum = 0;
    std::fill(orow, orow + Dp, 0.f);
    if (mmax != -std::numeric_limits<float>::infinity()) {
      for (int k = 0; k < first->splits; ++k) {
        const float* part = partials(ws, plan, first[k].partial_offset);
        const float l = part[int64_t(rows) * Dp + rows + r];
        if (l == 0.f) continue;
        const float w = std::exp2(part[int64_t(rows) * Dp + r] - mmax);
        sum += l * w;
        const float* o = part + int64_t(r) * Dp;
        for (int d = 0; d < D; ++d) orow[d] += w * o[d];
      }
    }
    const int64_t row = s.q_begin + first->q_begin + r / G;
    const int head = first->group * G + r % G;
    const bool empty = sum == 0.f;
    attn::store_row<T, float>(orow, empty ? 0.f : 1.f / sum, row3<T>(out, row, head), D);
    row2<float>(lse, row)[head] =
        empty ? -std::numeric_limits<float>::infinity()
              : float((double(mmax) + std::log2(double(sum))) * kLn2);
  }
}

}  // namespace paged
}  // namespace cpu
}  // namespace detail
}  // namespace msa
