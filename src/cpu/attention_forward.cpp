// CPU main-branch forward (SPEC.md "Main branch"): flash-style attention over the key blocks each
// (query, group) selected, or over all visible blocks when topk is undefined (dense = k infinity).
//
// One work item is a tile of queries x the G heads of one group (attention_tile.h). Its query rows
// are converted to f32 (pre-scaled by scale * log2 e so the softmax runs on exp2) once; then for each
// block of the tile's plan the K/V rows are converted once (or read in place for f32), and every
// (query, head) row that selected the block runs in micro-tiles of kRows: scores = Q K^T, causal mask
// inside the local block, online softmax update, O += P V. Accumulation is in f32 (f64 for f64
// inputs). Items write disjoint output rows, so results do not depend on the thread schedule.
#include <algorithm>
#include <omp.h>

#include <cmath>
#include <limits>

#include "core/backend.h"
#include "cpu/amx.h"
#include "cpu/attention_amx.h"
#include "cpu/attention_tile.h"
#include "cpu/cpu_ops.h"
#include "cpu/element.h"

namespace msa {
namespace detail {
namespace cpu {

namespace {

constexpr double kAmxMinOccupancy = 6;  // rows per (tile, block) pair below which AMX does not pay

using attn::Carver;
using attn::Geometry;
using attn::kLog2e;
using attn::kRows;

// Per-thread scratch of the forward pass.
template <class A>
struct ForwardScratch {
  A *q, *o, *m, *l, *kbuf, *vbuf, *scores;
  const A **krows, **vrows;
  int64_t* pos;
  int32_t* rows;
  attn::TilePlan plan;

  ForwardScratch(Carver& c, const Geometry& geo) {
    q = c.take<A>(int64_t(geo.rows) * geo.Dp);
    o = c.take<A>(int64_t(geo.rows) * geo.Dp);
    m = c.take<A>(geo.rows);
    l = c.take<A>(geo.rows);
    kbuf = c.take<A>(int64_t(geo.B) * geo.Dp);
    vbuf = c.take<A>(int64_t(geo.B) * geo.Dp);
    scores = c.take<A>(int64_t(kRows) * geo.Bs);
    krows = c.take<const A*>(geo.B);
    vrows = c.take<const A*>(geo.B);
    pos = c.take<int64_t>(geo.tile_q);
    rows = c.take<int32_t>(geo.rows);
    plan = attn::take_plan(c, geo);
  }
};

template <class A>
std::size_t per_thread_bytes(const Geometry& geo) {
  return attn::carved_bytes<ForwardScratch<A>>(geo);
}

template <class T>
void run_tile(const Problem& p, const Geometry& geo, const attn::TileItem& it, const TensorView& q,
              const TensorView& k, const TensorView& v, const TensorView& topk,
              const TensorView& out, const TensorView& lse, ForwardScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int G = geo.G, Dp = geo.Dp, D = geo.D;
  const SequenceSpan s = sequence_span(p.varlen, it.seq);
  const A qscale = A(double(p.cfg.softmax_scale()) * kLog2e);

  for (int qi = 0; qi < it.nq; ++qi) {
    w.pos[qi] = s.query_position(it.q0 + qi);
    for (int h = 0; h < G; ++h) {
      const int r = qi * G + h;
      attn::load_row<T, A>(row3<const T>(q, s.q_begin + it.q0 + qi, it.group * G + h), D, qscale,
                           w.q + int64_t(r) * Dp, Dp);
      std::fill(w.o + int64_t(r) * Dp, w.o + int64_t(r + 1) * Dp, A(0));
      w.m[r] = kNegInf;
      w.l[r] = 0;
    }
  }

  attn::plan_tile(geo, s, it, topk, w.plan);
  for (int bi = 0; bi < w.plan.nblocks; ++bi) {
    const int64_t j = w.plan.block[bi];
    const int32_t* parts = w.plan.query + w.plan.offset[bi];
    const int nparts = w.plan.offset[bi + 1] - w.plan.offset[bi];
    // Participants ascend, so the last one sees the most keys of the block.
    const int nkeys = attn::visible_in_block(geo, j, w.pos[parts[nparts - 1]]);
    const int npad = int(attn::round_up(nkeys, attn::kScorePad));
    attn::block_rows<T, A>(geo, k, s, it.group, j, nkeys, w.kbuf, w.krows);
    attn::block_rows<T, A>(geo, v, s, it.group, j, nkeys, w.vbuf, w.vrows);

    int nrows = 0;
    for (int pi = 0; pi < nparts; ++pi)
      for (int h = 0; h < G; ++h) w.rows[nrows++] = parts[pi] * G + h;

    for (int r0 = 0; r0 < nrows; r0 += kRows) {
      const int nr = std::min(kRows, nrows - r0);
      const A* qrows[kRows];
      A* orows[kRows];
      for (int i = 0; i < nr; ++i) {
        qrows[i] = w.q + int64_t(w.rows[r0 + i]) * Dp;
        orows[i] = w.o + int64_t(w.rows[r0 + i]) * Dp;
      }
      attn::dot_tile<A>(qrows, nr, w.krows, nkeys, Dp, w.scores, geo.Bs);
      for (int i = 0; i < nr; ++i) {
        const int r = w.rows[r0 + i];
        A* srow = w.scores + int64_t(i) * geo.Bs;
        const int vis = attn::visible_in_block(geo, j, w.pos[r / G]);
        for (int t = vis; t < npad; ++t) srow[t] = kNegInf;
        const A m_new = std::max(w.m[r], attn::row_max<A>(srow, npad));
        const A alpha = std::exp2(w.m[r] - m_new);  // 0 on the first block (m = -inf)
        w.l[r] = w.l[r] * alpha + attn::exp2_shift_sum<A>(srow, npad, m_new);
        w.m[r] = m_new;
        if (alpha != A(1))
          for (int d = 0; d < Dp; ++d) orows[i][d] *= alpha;
      }
      attn::axpy_tile<A>(orows, nr, w.scores, geo.Bs, 1, w.vrows, nkeys, Dp);
    }
  }

  attn::store_tile_outputs<T, A>(geo, s, it, w.o, Dp, w.m, w.l, out, lse);
}

template <class T>
void forward_impl(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& topk, const TensorView& out, const TensorView& lse,
                  const Context& ctx) {
  using A = acc_t<T>;
  const Geometry geo(p, !topk.defined(), attn::column_step<A>());
  if (topk.defined()) attn::validate_topk(p, topk);
  const std::vector<attn::TileItem> items = make_items(p, geo);
  const int threads = thread_count(ctx.num_threads);
  const std::size_t per_thread = per_thread_bytes<A>(geo);
  attn::Scratch scratch(ctx.workspace, per_thread * threads);

#pragma omp parallel num_threads(threads)
  {
    Carver c(scratch.base() + per_thread * omp_get_thread_num());
    ForwardScratch<A> w(c, geo);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i)
      run_tile<T>(p, geo, items[i], q, k, v, topk, out, lse, w);
  }
}

}  // namespace

std::size_t attention_forward_workspace_bytes(const Problem& p, int num_threads) {
  const int threads = thread_count(num_threads);
  const std::size_t rows = attn::workspace_for_either_plan(p, [&](auto acc, const Geometry& geo) {
    return per_thread_bytes<decltype(acc)>(geo) * threads + attn::Scratch::kAlign;
  });
  // Which of the two runs depends on the selection, which sizing cannot see: room for either.
  return attention_forward_uses_amx(p)
             ? std::max(rows, attention_forward_amx_workspace_bytes(p, threads))
             : rows;
}

void attention_forward(const Problem& p, const TensorView& q, const TensorView& k,
                       const TensorView& v, const TensorView& topk, const TensorView& out,
                       const TensorView& lse, const Context& ctx) {
  // Decode-like calls (a few queries per block of a long prefix) keep the row kernels: measured at
  // 64K keys, Hq 8 / Hkv 2, i.i.d. selections, 4 rows per block-tile pair (1 query): 0.39 ms plain
  // against 1.03 ms on the tile unit, 5.3 (16 queries): 3.7 against 10.4 ms, 6.5 (256): 34.6 against
  // 31.5 ms; prefill: 5.1 s against 1.5 s.
  if (attention_forward_uses_amx(p) &&
      (amx::forced() || attention_forward_amx_occupancy(p, topk) >= kAmxMinOccupancy))
    return attention_forward_amx(p, q, k, v, topk, out, lse, ctx);
  MSA_CPU_DISPATCH_FLOAT(p.dtype, [&] { forward_impl<scalar_t>(p, q, k, v, topk, out, lse, ctx); });
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
