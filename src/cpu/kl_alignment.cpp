// CPU KL alignment of the index branch (SPEC.md "Index branch training: KL alignment").
//
// For each (query, group) the key set is the visible tokens of the selected blocks (every visible token
// when topk is undefined: dense warmup). Pass 1 scores the student s(t) = iscale <qi, ki[t]> into a
// per-thread row buffer and takes its logsumexp. Pass 2 recomputes the teacher P(t) from q, k and the
// given main-branch lse (never stored beyond one key), accumulates the loss, dqi, and this thread's
// partial dki. Work is split statically over (query, group) and the per-thread dki partials are summed
// in thread order, so results are bitwise reproducible for a given thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"
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

struct KlLayout {
  std::size_t q_heads = 0, qi_row = 0, k_row = 0, ki_row = 0, teacher = 0, dqi_acc = 0, student = 0;
  std::size_t per_thread = 0, partials = 0, shared = 0;

  KlLayout(const Problem& p, std::size_t acc_bytes, int threads) {
    const int G = p.cfg.group_size(), D = p.cfg.head_dim, Di = p.cfg.index_head_dim;
    ScratchPlan plan;
    auto add_acc = [&](int64_t n) {
      const std::size_t at = align_up(plan.bytes);
      plan.bytes = align_up(at + std::size_t(n) * acc_bytes);
      return at;
    };
    q_heads = add_acc(int64_t(G) * D);
    qi_row = add_acc(Di);
    k_row = add_acc(D);
    ki_row = add_acc(Di);
    teacher = add_acc(G);
    dqi_acc = add_acc(Di);
    student = add_acc(std::max(1, p.varlen.max_seqlen_k));
    per_thread = align_up(plan.bytes);
    partials = align_up(std::size_t(p.total_k) * Di * acc_bytes);
    shared = partials * std::size_t(threads);
  }
};

std::size_t acc_bytes_of(DType dtype) { return dtype == DType::f64 ? sizeof(double) : sizeof(float); }

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

template <class T>
void kl_impl(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& lse,
             const TensorView& qi, const TensorView& ki, const TensorView& topk, float coeff,
             const TensorView& loss, const TensorView& dqi, const TensorView& dki,
             const Context& ctx) {
  using A = acc_t<T>;
  const int G = p.cfg.group_size(), D = p.cfg.head_dim, Di = p.cfg.index_head_dim;
  const int hkv = p.cfg.num_kv_heads, B = p.cfg.block_size, K = p.cfg.topk;
  const A scale = A(p.cfg.softmax_scale()), iscale = A(p.cfg.index_softmax_scale());
  const A norm = p.total_q > 0 ? A(double(coeff) / (double(hkv) * double(p.total_q))) : A(0);
  const bool dense = !topk.defined();
  const int threads = thread_count(ctx.num_threads);
  const int32_t* cu_q = p.varlen.host_cu_seqlens_q;

  const KlLayout lay(p, sizeof(A), threads);
  Scratch scratch(ctx.workspace, scratch_total(lay.per_thread, threads, lay.shared));
  unsigned char* partial_base = scratch.base() + lay.per_thread * std::size_t(threads);
  std::vector<double> thread_loss(size_t(threads), 0.0);
  const int64_t items = p.total_q * hkv;

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    unsigned char* mine = scratch.base() + std::size_t(tid) * lay.per_thread;
    A* qh = reinterpret_cast<A*>(mine + lay.q_heads);
    A* qirow = reinterpret_cast<A*>(mine + lay.qi_row);
    A* krow = reinterpret_cast<A*>(mine + lay.k_row);
    A* kirow = reinterpret_cast<A*>(mine + lay.ki_row);
    A* teacher = reinterpret_cast<A*>(mine + lay.teacher);
    A* dqi_acc = reinterpret_cast<A*>(mine + lay.dqi_acc);
    A* student = reinterpret_cast<A*>(mine + lay.student);
    A* dki_part = reinterpret_cast<A*>(partial_base + std::size_t(tid) * lay.partials);
    std::fill(dki_part, dki_part + p.total_k * Di, A(0));
    double my_loss = 0;

#pragma omp for schedule(static, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qrow = item / hkv;
      const int g = int(item % hkv);
      const int b = int(std::upper_bound(cu_q, cu_q + p.batch + 1, int32_t(qrow)) - cu_q) - 1;
      const SequenceSpan s = sequence_span(p.varlen, b);
      const int64_t pos = s.query_position(qrow - s.q_begin);
      const int64_t local = rules::local_block(pos, B);
      const int32_t* ids = dense ? nullptr : row3<const int32_t>(topk, g, qrow);
      const int nslots = dense ? int(local + 1) : K;
      // Calls f(t) for every key (sequence-relative) of the (query, group)'s key set.
      auto for_each_key = [&](auto&& f) {
        for (int slot = 0; slot < nslots; ++slot) {
          const int64_t j = dense ? slot : ids[slot];
          if (j == rules::kUnusedSlot) continue;
          const int64_t end = rules::visible_block_end(j, B, pos);
          for (int64_t t = rules::block_begin(j, B); t < end; ++t) f(t);
        }
      };

      // Pass 1: student logits and their logsumexp.
      simd::convert_row(row3<const T>(qi, qrow, g), qirow, Di, iscale);
      int64_t n = 0;
      A m = A(-INFINITY);
      for_each_key([&](int64_t t) {
        simd::convert_row(row2<const T>(ki, s.k_begin + t), kirow, Di);
        const A st = simd::dot<A>(qirow, kirow, Di);
        student[n++] = st;
        m = std::max(m, st);
      });
      T* dqi_out = row3<T>(dqi, qrow, g);
      if (n == 0) {
        for (int d = 0; d < Di; ++d) dqi_out[d] = store_as<T, A>(A(0));
        continue;
      }
      const A student_lse = m + std::log(simd::segment_sum_exp<A>(student, int(n), m, A(1)));

      // Pass 2: teacher, loss and gradients. qirow is rescaled to the raw qi for dki.
      for (int h = 0; h < G; ++h)
        simd::convert_row(row3<const T>(q, qrow, g * G + h), qh + int64_t(h) * D, D, scale);
      const A* lse_row = row2<const A>(lse, qrow) + g * G;
      simd::convert_row(row3<const T>(qi, qrow, g), qirow, Di);
      std::fill(dqi_acc, dqi_acc + Di, A(0));
      int64_t i = 0;
      for_each_key([&](int64_t t) {
        simd::convert_row(row3<const T>(k, s.k_begin + t, g), krow, D);
        for (int h = 0; h < G; ++h) teacher[h] = simd::dot<A>(qh + int64_t(h) * D, krow, D) - lse_row[h];
        const A P = simd::segment_sum_exp<A>(teacher, G, A(0), A(1)) / A(G);
        const A log_q = student[i++] - student_lse;
        if (P > 0) my_loss += double(P * (std::log(P) - log_q));
        const A grad = norm * (std::exp(log_q) - P);
        simd::convert_row(row2<const T>(ki, s.k_begin + t), kirow, Di);
        A* dk = dki_part + (s.k_begin + t) * Di;
        const A gs = grad * iscale;
        for (int d = 0; d < Di; ++d) {
          dqi_acc[d] += grad * kirow[d];
          dk[d] += gs * qirow[d];
        }
      });
      for (int d = 0; d < Di; ++d) dqi_out[d] = store_as<T, A>(iscale * dqi_acc[d]);
    }
    thread_loss[size_t(tid)] = my_loss;

    // Sum the dki partials in thread order (fixed, so the result is reproducible).
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.total_k; ++t) {
      T* out = row2<T>(dki, t);
      for (int d = 0; d < Di; ++d) {
        A sum = 0;
        for (int th = 0; th < threads; ++th)
          sum += reinterpret_cast<const A*>(partial_base + std::size_t(th) * lay.partials)[t * Di + d];
        out[d] = store_as<T, A>(sum);
      }
    }
  }
  double total = 0;
  for (double l : thread_loss) total += l;
  *static_cast<A*>(loss.data) = A(total * double(norm));
}

}  // namespace

std::size_t kl_alignment_workspace_bytes(const Problem& p, int num_threads) {
  const int threads = thread_count(num_threads);
  const KlLayout lay(p, acc_bytes_of(p.dtype), threads);
  return scratch_total(lay.per_thread, threads, lay.shared);
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
