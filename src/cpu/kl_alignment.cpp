// CPU KL alignment of the index branch (SPEC.md "Index branch training: KL alignment").
//
// Engine: the work decomposition of the main branch (attention_tile.h). A work item is a tile of
// queries of one sequence and one group; its plan lists the union of the tile's key blocks (selected
// blocks, or every visible block for dense warmup), each with the tile queries that read it. Pass 1
// walks the plan once: each ki block is converted once and scored against the block's index queries
// with the shared dot-tile kernel; the student scores are kept per (block, query) and give every
// query's student logsumexp. Pass 2 walks the plan again: each k block and ki block is converted once,
// the G teacher score rows of every (query, head) reading the block come from the same dot-tile
// kernel, then the per-key terms (teacher P averaged over heads, student Q, loss) and the gradient
// coefficients norm * (Q - P); dqi and this thread's partial dki are updated with the shared axpy-tile
// kernel. Items are assigned to threads statically and the dki partials are summed in thread order,
// so results are bitwise reproducible for a given thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cpu/attention_tile.h"
#include "cpu/cpu_ops.h"
#include "cpu/element.h"
#include "cpu/index_simd.h"
#include "cpu/index_workspace.h"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cpu {

namespace {

using attn::Carver;
using attn::Geometry;
using attn::kRows;

// Per-thread scratch: one carving serves both the size query (null base) and the run.
template <class A>
struct KlScratch {
  A *q, *qi, *lse, *kbuf, *kibuf, *student, *teacher, *grad, *pq, *dqi, *smax, *slse;
  const A **krows, **kirows, **arows, **qirows;
  A** outs;
  int64_t* pos;
  attn::TilePlan plan;

  KlScratch(Carver& c, const Geometry& geo, int Dip) {
    q = c.take<A>(int64_t(geo.rows) * geo.Dp);        // (query, head) rows, times scale
    qi = c.take<A>(int64_t(geo.tile_q) * Dip);        // index query rows, times iscale
    lse = c.take<A>(geo.rows);
    kbuf = c.take<A>(int64_t(geo.B) * geo.Dp);
    kibuf = c.take<A>(int64_t(geo.B) * Dip);
    student = c.take<A>(geo.max_pairs() * geo.Bs);   // per (block, query) of the plan
    teacher = c.take<A>(int64_t(geo.rows) * geo.Bs);  // per (query, head) reading the block
    grad = c.take<A>(int64_t(geo.tile_q) * geo.Bs);   // per query reading the block
    pq = c.take<A>(geo.Bs);                           // teacher P of one (query, block)
    dqi = c.take<A>(int64_t(geo.tile_q) * Dip);
    smax = c.take<A>(geo.tile_q);
    slse = c.take<A>(geo.tile_q);
    krows = c.take<const A*>(geo.B);
    kirows = c.take<const A*>(geo.B);
    arows = c.take<const A*>(geo.rows);
    qirows = c.take<const A*>(geo.tile_q);
    outs = c.take<A*>(kRows);
    pos = c.take<int64_t>(geo.tile_q);
    plan = attn::take_plan(c, geo);
  }
};

// Index head dim padded like Geometry::Dp, so the vector kernels need no tail.
template <class A>
int padded_index_dim(const Problem& p) {
  return int(attn::round_up(p.cfg.index_head_dim, attn::column_step<A>()));
}

// Per-thread bytes: the larger of the dense and sparse plans, so one size serves both modes.
template <class A>
std::size_t per_thread_bytes(const Problem& p) {
  std::size_t bytes = 0;
  for (bool dense : {true, false}) {
    Carver c;
    KlScratch<A> s(c, Geometry(p, dense, attn::column_step<A>()), padded_index_dim<A>(p));
    bytes = std::max(bytes, c.used());
  }
  return bytes;
}

template <class A>
std::size_t partials_bytes(const Problem& p) {
  return align_up(std::size_t(p.total_k) * std::size_t(padded_index_dim<A>(p)) * sizeof(A));
}

template <class A>
std::size_t total_bytes(const Problem& p, int threads) {
  return scratch_total(per_thread_bytes<A>(p), threads, partials_bytes<A>(p) * std::size_t(threads));
}

// Ids are read here, so they are checked here: -1 or a block 0..local, each at most once.
void check_topk_ids(const Problem& p, const TensorView& topk) {
  const int K = p.cfg.topk, B = p.cfg.block_size;
  std::vector<int32_t> ids(static_cast<size_t>(K));
  for (int b = 0; b < p.batch; ++b) {
    const SequenceSpan s = sequence_span(p.varlen, b);
    for (int64_t i = 0; i < s.q_len; ++i) {
      const int64_t pos = s.query_position(i), local = rules::local_block(pos, B);
      for (int g = 0; g < p.cfg.num_kv_heads; ++g) {
        const int32_t* row = row3<const int32_t>(topk, g, s.q_begin + i);
        const std::string where = "topk[" + std::to_string(g) + "][" + std::to_string(s.q_begin + i) + "]";
        for (int k = 0; k < K; ++k)
          MSA_CHECK_ARG(row[k] >= -1 && row[k] <= local, "topk",
                        where + "[" + std::to_string(k) + "] = " + std::to_string(row[k]) +
                            " is neither -1 nor a block 0.." + std::to_string(local) +
                            " visible to the query at position " + std::to_string(pos));
        ids.assign(row, row + K);
        std::sort(ids.begin(), ids.end());
        for (int k = 1; k < K; ++k)
          MSA_CHECK_ARG(ids[k] == -1 || ids[k] != ids[k - 1], "topk",
                        where + " selects block " + std::to_string(ids[k]) + " more than once");
      }
    }
  }
}

// Rows of ki block j (nkeys rows) as accumulator rows: in place when already so, else converted.
template <class T, class A>
void index_key_rows(const TensorView& ki, const SequenceSpan& s, int64_t j, int B, int nkeys, int Di,
                    int Dip, A* buf, const A** rows) {
  const int64_t first = s.k_begin + rules::block_begin(j, B);
  for (int i = 0; i < nkeys; ++i) {
    const T* src = row2<const T>(ki, first + i);
    if constexpr (std::is_same_v<T, A>) {
      if (Dip == Di) {
        rows[i] = src;
        continue;
      }
    }
    A* dst = buf + int64_t(i) * Dip;
    attn::load_row<T, A>(src, Di, A(1), dst, Dip);
    rows[i] = dst;
  }
}

struct KlParams {
  double norm = 0;  // coeff / (Hkv * total_q)
  int Di = 0, Dip = 0;
};

// One tile: returns its loss contribution (before norm); writes dqi rows and adds to dki_part.
template <class T>
double run_tile(const Problem& p, const Geometry& geo, const KlParams& kp, const attn::TileItem& it,
                const TensorView& q, const TensorView& k, const TensorView& lse, const TensorView& qi,
                const TensorView& ki, const TensorView& topk, const TensorView& dqi,
                acc_t<T>* dki_part, KlScratch<acc_t<T>>& w) {
  using A = acc_t<T>;
  using V = simd::vec_t<A>;
  constexpr int L = simd::lanes<A>;
  const int G = geo.G, D = geo.D, Dp = geo.Dp, Di = kp.Di, Dip = kp.Dip, Bs = geo.Bs, B = geo.B;
  const A scale = A(p.cfg.softmax_scale()), iscale = A(p.cfg.index_softmax_scale());
  const A norm = A(kp.norm), inv_g = A(1) / A(G);
  const SequenceSpan s = sequence_span(p.varlen, it.seq);

  for (int c = 0; c < it.nq; ++c) {
    const int64_t row = s.q_begin + it.q0 + c;
    w.pos[c] = s.query_position(it.q0 + c);
    const A* lrow = row2<const A>(lse, row) + it.group * G;
    for (int h = 0; h < G; ++h) {
      attn::load_row<T, A>(row3<const T>(q, row, it.group * G + h), D, scale,
                           w.q + int64_t(c * G + h) * Dp, Dp);
      w.lse[c * G + h] = lrow[h];
    }
    attn::load_row<T, A>(row3<const T>(qi, row, it.group), Di, iscale, w.qi + int64_t(c) * Dip, Dip);
    std::fill(w.dqi + int64_t(c) * Dip, w.dqi + int64_t(c + 1) * Dip, A(0));
    w.smax[c] = -std::numeric_limits<A>::infinity();
    w.slse[c] = 0;
  }
  attn::plan_tile(geo, s, it, topk, w.plan);
  const attn::TilePlan& plan = w.plan;

  // Pass 1: student scores of every (block, query) pair, then each query's student logsumexp.
  for (int bi = 0; bi < plan.nblocks; ++bi) {
    const int64_t j = plan.block[bi];
    const int32_t* parts = plan.query + plan.offset[bi];
    const int nparts = plan.offset[bi + 1] - plan.offset[bi];
    // Participants ascend, so the last one sees the most keys of the block.
    const int nkeys = attn::visible_in_block(geo, j, w.pos[parts[nparts - 1]]);
    index_key_rows<T, A>(ki, s, j, B, nkeys, Di, Dip, w.kibuf, w.kirows);
    for (int c = 0; c < nparts; ++c) w.qirows[c] = w.qi + int64_t(parts[c]) * Dip;
    A* out = w.student + int64_t(plan.offset[bi]) * Bs;
    for (int c0 = 0; c0 < nparts; c0 += kRows)
      attn::dot_tile<A>(w.qirows + c0, std::min(kRows, nparts - c0), w.kirows, nkeys, Dip,
                        out + int64_t(c0) * Bs, Bs);
    for (int c = 0; c < nparts; ++c) {
      const int vis = attn::visible_in_block(geo, j, w.pos[parts[c]]);
      w.smax[parts[c]] = std::max(w.smax[parts[c]], simd::segment_max<A>(out + int64_t(c) * Bs, vis));
    }
  }
  for (int bi = 0; bi < plan.nblocks; ++bi) {
    const int64_t j = plan.block[bi];
    for (int pi = plan.offset[bi]; pi < plan.offset[bi + 1]; ++pi) {
      const int c = plan.query[pi];
      const int vis = attn::visible_in_block(geo, j, w.pos[c]);
      w.slse[c] += simd::segment_sum_exp<A>(w.student + int64_t(pi) * Bs, vis, w.smax[c], A(1));
    }
  }
  for (int c = 0; c < it.nq; ++c)
    if (w.slse[c] > 0) w.slse[c] = w.smax[c] + std::log(w.slse[c]);

  // Pass 2: teacher, loss and gradients.
  double loss = 0;
  A* P = w.pq;
  for (int bi = 0; bi < plan.nblocks; ++bi) {
    const int64_t j = plan.block[bi];
    const int32_t* parts = plan.query + plan.offset[bi];
    const int nparts = plan.offset[bi + 1] - plan.offset[bi];
    const int nkeys = attn::visible_in_block(geo, j, w.pos[parts[nparts - 1]]);
    attn::block_rows<T, A>(geo, k, s, it.group, j, nkeys, w.kbuf, w.krows);
    index_key_rows<T, A>(ki, s, j, B, nkeys, Di, Dip, w.kibuf, w.kirows);

    const int nrows = nparts * G;
    for (int r = 0; r < nrows; ++r) w.arows[r] = w.q + int64_t(parts[r / G] * G + r % G) * Dp;
    for (int r0 = 0; r0 < nrows; r0 += kRows)
      attn::dot_tile<A>(w.arows + r0, std::min(kRows, nrows - r0), w.krows, nkeys, Dp,
                        w.teacher + int64_t(r0) * Bs, Bs);

    for (int c = 0; c < nparts; ++c) {
      const int qc = parts[c];
      const int vis = attn::visible_in_block(geo, j, w.pos[qc]);
      const A* st = w.student + int64_t(plan.offset[bi] + c) * Bs;
      const A* tr = w.teacher + int64_t(c) * G * Bs;
      const V slse = simd::broadcast(w.slse[qc]);
      A* gr = w.grad + int64_t(c) * Bs;
      // Whole vectors up to vis; Bs (a multiple of 8) bounds them, lanes past vis are not used.
      for (int t = 0; t < vis; t += L) {
        V acc{};
        for (int h = 0; h < G; ++h)
          acc += simd::vexp(simd::load(tr + int64_t(h) * Bs + t) - simd::broadcast(w.lse[qc * G + h]));
        const V pv = acc * inv_g;
        simd::store(P + t, pv);
        simd::store(gr + t, (simd::vexp(simd::load(st + t) - slse) - pv) * norm);
      }
      for (int t = vis; t < nkeys; ++t) gr[t] = 0;
      // Loss terms in double; four independent sums keep the adds off one dependency chain.
      double part[4] = {0, 0, 0, 0};
      for (int t = 0; t < vis; ++t)
        if (P[t] > 0) part[t & 3] += double(P[t] * (std::log(P[t]) - (st[t] - w.slse[qc])));
      loss += (part[0] + part[1]) + (part[2] + part[3]);
    }

    // dqi[query] += sum over keys grad * ki (iscale applied at the end).
    for (int c0 = 0; c0 < nparts; c0 += kRows) {
      const int nr = std::min(kRows, nparts - c0);
      for (int i = 0; i < nr; ++i) w.outs[i] = w.dqi + int64_t(parts[c0 + i]) * Dip;
      attn::axpy_tile<A>(w.outs, nr, w.grad + int64_t(c0) * Bs, Bs, 1, w.kirows, nkeys, Dip);
    }
    // dki[key] += sum over queries grad * (iscale qi).
    for (int c = 0; c < nparts; ++c) w.qirows[c] = w.qi + int64_t(parts[c]) * Dip;
    const int64_t first = s.k_begin + rules::block_begin(j, B);
    for (int t0 = 0; t0 < nkeys; t0 += kRows) {
      const int nr = std::min(kRows, nkeys - t0);
      for (int i = 0; i < nr; ++i) w.outs[i] = dki_part + (first + t0 + i) * Dip;
      attn::axpy_tile<A>(w.outs, nr, w.grad + t0, 1, Bs, w.qirows, nparts, Dip);
    }
  }

  for (int c = 0; c < it.nq; ++c) {
    // A query without keys (an all -1 top-k row) was never accumulated into: its dqi stays 0.
    attn::store_row<T, A>(w.dqi + int64_t(c) * Dip, iscale, row3<T>(dqi, s.q_begin + it.q0 + c, it.group),
                          Di);
  }
  return loss;
}

template <class T>
void kl_impl(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& lse,
             const TensorView& qi, const TensorView& ki, const TensorView& topk, float coeff,
             const TensorView& loss, const TensorView& dqi, const TensorView& dki,
             const Context& ctx) {
  using A = acc_t<T>;
  const Geometry geo(p, !topk.defined(), attn::column_step<A>());
  KlParams kp;
  kp.Di = p.cfg.index_head_dim;
  kp.Dip = padded_index_dim<A>(p);
  kp.norm = p.total_q > 0 ? double(coeff) / (double(p.cfg.num_kv_heads) * double(p.total_q)) : 0.0;
  const int threads = thread_count(ctx.num_threads);
  const std::vector<attn::TileItem> items = attn::make_items(p, geo);

  const std::size_t per_thread = per_thread_bytes<A>(p), partials = partials_bytes<A>(p);
  Scratch scratch(ctx.workspace, total_bytes<A>(p, threads));
  unsigned char* partial_base = scratch.base() + align_up(per_thread) * std::size_t(threads);
  std::vector<double> thread_loss(size_t(threads), 0.0);
  const int64_t dki_elems = p.total_k * kp.Dip;

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    unsigned char* mine = scratch.base() + std::size_t(tid) * align_up(per_thread);
    // Zeroed once: vector loops read (and discard) lanes past the visible keys of a block.
    std::memset(mine, 0, per_thread);
    Carver c(mine);
    KlScratch<A> w(c, geo, kp.Dip);
    A* dki_part = reinterpret_cast<A*>(partial_base + std::size_t(tid) * partials);
    std::fill(dki_part, dki_part + dki_elems, A(0));
    double my_loss = 0;

    // Static assignment in a fixed order: which thread's partial holds which term never changes.
#pragma omp for schedule(static, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i)
      my_loss += run_tile<T>(p, geo, kp, items[size_t(i)], q, k, lse, qi, ki, topk, dqi, dki_part, w);
    thread_loss[size_t(tid)] = my_loss;

    // Sum the dki partials in thread order (fixed, so the result is reproducible).
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.total_k; ++t) {
      T* out = row2<T>(dki, t);
      for (int d = 0; d < kp.Di; ++d) {
        A sum = 0;
        for (int th = 0; th < threads; ++th)
          sum += reinterpret_cast<const A*>(partial_base + std::size_t(th) * partials)[t * kp.Dip + d];
        out[d] = store_as<T, A>(sum);
      }
    }
  }
  double total = 0;
  for (double l : thread_loss) total += l;
  *static_cast<A*>(loss.data) = A(total * kp.norm);
}

}  // namespace

std::size_t kl_alignment_workspace_bytes(const Problem& p, int num_threads) {
  const int threads = thread_count(num_threads);
  return acc_bytes_of(p.dtype) == sizeof(double) ? total_bytes<double>(p, threads)
                                                 : total_bytes<float>(p, threads);
}

void kl_alignment(const Problem& p, const TensorView& q, const TensorView& k,
                  const TensorView& lse, const TensorView& qi, const TensorView& ki,
                  const TensorView& topk, float coeff, const TensorView& loss,
                  const TensorView& dqi, const TensorView& dki, const Context& ctx) {
  if (topk.defined()) check_topk_ids(p, topk);
  MSA_CPU_DISPATCH_FLOAT(p.dtype, [&] {
    kl_impl<scalar_t>(p, q, k, lse, qi, ki, topk, coeff, loss, dqi, dki, ctx);
  });
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
