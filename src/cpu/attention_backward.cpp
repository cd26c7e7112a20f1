// CPU main-branch backward (SPEC.md "Main branch"): dq, dk, dv for the fixed selection (or dense when
// topk is undefined), with the same tiles and block plans as the forward (attention_tile.h).
//
// Per tile: q (pre-scaled by scale * log2 e), dout and delta = rowsum(dout * out) are loaded once.
// Per block of the plan: P = exp2(S - lse * log2 e) and dS = P * (dout V^T - delta) for every
// participating row, then dq_acc += dS K (rows are the tile's own), and dk/dv += dS^T q, P^T dout
// into the thread's own f32 partial buffers. Determinism: tiles go to threads by a static
// round-robin schedule and the partial buffers are summed in thread order, so results are bitwise
// identical run to run for a given thread count (deterministic or not: the default pays the same).
// Cost: threads x total_k x Hkv x D accumulators for each of dk and dv (zeroed, then reduced).
#include <algorithm>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/backend.h"
#include "cpu/attention_tile.h"
#include "cpu/cpu_ops.h"
#include "cpu/element.h"

namespace msa {
namespace detail {
namespace cpu {

namespace {

using attn::Carver;
using attn::Geometry;
using attn::kLn2;
using attn::kLog2e;
using attn::kRows;

template <class A>
struct BackwardScratch {
  A *q, *dout, *dq, *lse2, *delta, *kbuf, *vbuf, *p, *ds;
  const A **krows, **vrows, **qrows, **drows;
  int64_t* pos;
  int32_t* rows;
  attn::TilePlan plan;

  BackwardScratch(Carver& c, const Geometry& geo) {
    q = c.take<A>(int64_t(geo.rows) * geo.Dp);
    dout = c.take<A>(int64_t(geo.rows) * geo.Dp);
    dq = c.take<A>(int64_t(geo.rows) * geo.Dp);
    lse2 = c.take<A>(geo.rows);
    delta = c.take<A>(geo.rows);
    kbuf = c.take<A>(int64_t(geo.B) * geo.Dp);
    vbuf = c.take<A>(int64_t(geo.B) * geo.Dp);
    p = c.take<A>(int64_t(geo.rows) * geo.Bs);
    ds = c.take<A>(int64_t(geo.rows) * geo.Bs);
    krows = c.take<const A*>(geo.B);
    vrows = c.take<const A*>(geo.B);
    qrows = c.take<const A*>(geo.rows);
    drows = c.take<const A*>(geo.rows);
    pos = c.take<int64_t>(geo.tile_q);
    rows = c.take<int32_t>(geo.rows);
    plan = attn::take_plan(c, geo);
  }
};

template <class A>
std::size_t per_thread_bytes(const Geometry& geo) {
  return attn::carved_bytes<BackwardScratch<A>>(geo);
}

// dk and dv partials of one thread: [total_k, Hkv, Dp] each.
template <class A>
int64_t partial_elems(const Problem& p, const Geometry& geo) {
  return p.total_k * geo.Hkv * geo.Dp;
}

template <class A>
std::size_t total_bytes(const Problem& p, const Geometry& geo, int threads) {
  const std::size_t partials = attn::Scratch::align(std::size_t(partial_elems<A>(p, geo)) * sizeof(A));
  return (per_thread_bytes<A>(geo) + 2 * partials) * threads + attn::Scratch::kAlign;
}

template <class T>
void run_tile(const Problem& p, const Geometry& geo, const attn::TileItem& it, const TensorView& q,
              const TensorView& k, const TensorView& v, const TensorView& topk,
              const TensorView& out, const TensorView& lse, const TensorView& dout,
              const TensorView& dq, BackwardScratch<acc_t<T>>& w, acc_t<T>* dk_part,
              acc_t<T>* dv_part) {
  using A = acc_t<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int G = geo.G, Dp = geo.Dp, D = geo.D, Hkv = geo.Hkv;
  const SequenceSpan s = sequence_span(p.varlen, it.seq);
  const A qscale = A(double(p.cfg.softmax_scale()) * kLog2e);

  for (int qi = 0; qi < it.nq; ++qi) {
    const int64_t row = s.q_begin + it.q0 + qi;
    w.pos[qi] = s.query_position(it.q0 + qi);
    for (int h = 0; h < G; ++h) {
      const int r = qi * G + h, head = it.group * G + h;
      A* qr = w.q + int64_t(r) * Dp;
      A* dr = w.dout + int64_t(r) * Dp;
      attn::load_row<T, A>(row3<const T>(q, row, head), D, qscale, qr, Dp);
      attn::load_row<T, A>(row3<const T>(dout, row, head), D, A(1), dr, Dp);
      const T* orow = row3<const T>(out, row, head);
      A delta = 0;
      for (int d = 0; d < D; ++d) delta += dr[d] * A(to_float(orow[d]));
      w.delta[r] = delta;
      w.lse2[r] = A(double(row2<const A>(lse, row)[head]) * kLog2e);
      std::fill(w.dq + int64_t(r) * Dp, w.dq + int64_t(r + 1) * Dp, A(0));
    }
  }

  attn::plan_tile(geo, s, it, topk, w.plan);
  for (int bi = 0; bi < w.plan.nblocks; ++bi) {
    const int64_t j = w.plan.block[bi];
    const int32_t* parts = w.plan.query + w.plan.offset[bi];
    const int nparts = w.plan.offset[bi + 1] - w.plan.offset[bi];
    const int nkeys = attn::visible_in_block(geo, j, w.pos[parts[nparts - 1]]);
    const int npad = int(attn::round_up(nkeys, attn::kScorePad));
    attn::block_rows<T, A>(geo, k, s, it.group, j, nkeys, w.kbuf, w.krows);
    attn::block_rows<T, A>(geo, v, s, it.group, j, nkeys, w.vbuf, w.vrows);

    int nrows = 0;
    for (int pi = 0; pi < nparts; ++pi)
      for (int h = 0; h < G; ++h) {
        const int r = parts[pi] * G + h;
        w.rows[nrows] = r;
        w.qrows[nrows] = w.q + int64_t(r) * Dp;
        w.drows[nrows] = w.dout + int64_t(r) * Dp;
        ++nrows;
      }

    // P and dS of every participating row (row i of the block = tile row w.rows[i]).
    for (int r0 = 0; r0 < nrows; r0 += kRows) {
      const int nr = std::min(kRows, nrows - r0);
      A* prow0 = w.p + int64_t(r0) * geo.Bs;
      A* dsrow0 = w.ds + int64_t(r0) * geo.Bs;
      attn::dot_tile<A>(w.qrows + r0, nr, w.krows, nkeys, Dp, prow0, geo.Bs);
      attn::dot_tile<A>(w.drows + r0, nr, w.vrows, nkeys, Dp, dsrow0, geo.Bs);
      A* dqrows[kRows];
      for (int i = 0; i < nr; ++i) {
        const int r = w.rows[r0 + i];
        A* prow = prow0 + int64_t(i) * geo.Bs;
        A* dsrow = dsrow0 + int64_t(i) * geo.Bs;
        const int vis = attn::visible_in_block(geo, j, w.pos[r / G]);
        for (int t = vis; t < npad; ++t) prow[t] = kNegInf;
        attn::exp2_shift_sum<A>(prow, npad, w.lse2[r]);
        for (int t = 0; t < nkeys; ++t) dsrow[t] = prow[t] * (dsrow[t] - w.delta[r]);
        dqrows[i] = w.dq + int64_t(r) * Dp;
      }
      attn::axpy_tile<A>(dqrows, nr, dsrow0, geo.Bs, 1, w.krows, nkeys, Dp);
    }

    // dv[t] += sum_i P[i][t] dout[i]; dk[t] += sum_i dS[i][t] q[i] (q pre-scaled; fixed at the end).
    const int64_t first = s.k_begin + rules::block_begin(j, geo.B);
    for (int t0 = 0; t0 < nkeys; t0 += kRows) {
      const int nt = std::min(kRows, nkeys - t0);
      A* dvrows[kRows];
      A* dkrows[kRows];
      for (int i = 0; i < nt; ++i) {
        const int64_t off = ((first + t0 + i) * Hkv + it.group) * Dp;
        dvrows[i] = dv_part + off;
        dkrows[i] = dk_part + off;
      }
      attn::axpy_tile<A>(dvrows, nt, w.p + t0, 1, geo.Bs, w.drows, nrows, Dp);
      attn::axpy_tile<A>(dkrows, nt, w.ds + t0, 1, geo.Bs, w.qrows, nrows, Dp);
    }
  }

  const A dq_scale = A(p.cfg.softmax_scale());
  for (int qi = 0; qi < it.nq; ++qi) {
    const int64_t row = s.q_begin + it.q0 + qi;
    for (int h = 0; h < G; ++h) {
      const int r = qi * G + h;
      attn::store_row<T, A>(w.dq + int64_t(r) * Dp, dq_scale, row3<T>(dq, row, it.group * G + h), D);
    }
  }
}

template <class T>
void backward_impl(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& topk, const TensorView& out, const TensorView& lse,
                   const TensorView& dout, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, const Context& ctx) {
  using A = acc_t<T>;
  const Geometry geo(p, !topk.defined(), attn::column_step<A>());
  if (topk.defined()) attn::validate_topk(p, topk);
  const std::vector<attn::TileItem> items = make_items(p, geo);
  const int threads = thread_count(ctx.num_threads);
  const std::size_t per_thread = per_thread_bytes<A>(geo);
  const int64_t pelems = partial_elems<A>(p, geo);
  const std::size_t pbytes = attn::Scratch::align(std::size_t(pelems) * sizeof(A));
  attn::Scratch scratch(ctx.workspace, total_bytes<A>(p, geo, threads));
  unsigned char* const partials = scratch.base() + per_thread * threads;
  auto dk_part = [&](int t) { return reinterpret_cast<A*>(partials + pbytes * (2 * t)); };
  auto dv_part = [&](int t) { return reinterpret_cast<A*>(partials + pbytes * (2 * t + 1)); };

  int team = 1;  // threads the runtime started; only their partials exist
#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    team = omp_get_num_threads();
    const int tid = omp_get_thread_num();
    Carver c(scratch.base() + per_thread * tid);
    BackwardScratch<A> w(c, geo);
    A* dkp = dk_part(tid);
    A* dvp = dv_part(tid);
    std::memset(dkp, 0, std::size_t(pelems) * sizeof(A));
    std::memset(dvp, 0, std::size_t(pelems) * sizeof(A));
    // Static round-robin: which thread accumulates which tile is fixed for a thread count.
#pragma omp for schedule(static, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i)
      run_tile<T>(p, geo, items[i], q, k, v, topk, out, lse, dout, dq, w, dkp, dvp);
  }

  const A dk_scale = A(kLn2);  // d s / d k = scale * q = (pre-scaled q) * ln 2
  const int D = geo.D, Dp = geo.Dp;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < p.total_k; ++t)
    for (int g = 0; g < geo.Hkv; ++g) {
      const int64_t off = (t * geo.Hkv + g) * Dp;
      T* dkrow = row3<T>(dk, t, g);
      T* dvrow = row3<T>(dv, t, g);
      for (int d = 0; d < D; ++d) {
        A sk = 0, sv = 0;
        for (int th = 0; th < team; ++th) {
          sk += dk_part(th)[off + d];
          sv += dv_part(th)[off + d];
        }
        dkrow[d] = store_as<T>(sk * dk_scale);
        dvrow[d] = store_as<T>(sv);
      }
    }
}

}  // namespace

std::size_t attention_backward_workspace_bytes(const Problem& p, int num_threads) {
  const int threads = thread_count(num_threads);
  return attn::workspace_for_either_plan(p, [&](auto acc, const Geometry& geo) {
    return total_bytes<decltype(acc)>(p, geo, threads);
  });
}

void attention_backward(const Problem& p, const TensorView& q, const TensorView& k,
                        const TensorView& v, const TensorView& topk, const TensorView& out,
                        const TensorView& lse, const TensorView& dout, const TensorView& dq,
                        const TensorView& dk, const TensorView& dv, const Context& ctx) {
  MSA_CPU_DISPATCH_FLOAT(p.dtype, [&] {
    backward_impl<scalar_t>(p, q, k, v, topk, out, lse, dout, dq, dk, dv, ctx);
  });
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
