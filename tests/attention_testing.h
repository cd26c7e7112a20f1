// Helpers of the main-branch attention tests: top-k rows from the oracle's index branch, calls of the
// public forward/backward on a TestProblem with poisoned outputs, and oracle comparisons.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "msa/error.h"
#include "msa/ops.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

inline DType stats_dtype_of(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

// Realistic top-k rows: the oracle's index branch on the problem's qi, ki.
inline HostTensor oracle_topk(const TestProblem& p) {
  std::vector<int32_t> ids;
  std::vector<double> slse;
  reference::index_topk(p.cfg, p.lens, p.qi.to_double(), p.ki.to_double(), ids, slse);
  HostTensor t(DType::i32, {p.cfg.num_kv_heads, p.total_q(), p.cfg.topk});
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, ids[size_t(i)]);
  return t;
}

inline std::vector<int32_t> ids_of(const HostTensor& topk) {
  std::vector<int32_t> ids(size_t(topk.numel()));
  for (int64_t i = 0; i < topk.numel(); ++i) ids[size_t(i)] = int32_t(topk.get(i));
  return ids;
}

struct ForwardResult {
  HostTensor out, lse;
};

// Sparse forward when topk is given, dense otherwise; outputs poisoned first.
inline ForwardResult run_forward(TestProblem& p, HostTensor* topk, const Context& ctx = {}) {
  ForwardResult r{HostTensor(p.dtype, {p.total_q(), p.cfg.num_q_heads, p.cfg.head_dim}),
                  HostTensor(stats_dtype_of(p.dtype), {p.total_q(), p.cfg.num_q_heads})};
  r.out.poison();
  r.lse.poison();
  if (topk)
    sparse_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), topk->view(),
                             r.out.view(), r.lse.view(), ctx);
  else
    dense_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), r.out.view(),
                            r.lse.view(), ctx);
  return r;
}

struct Gradients {
  HostTensor dq, dk, dv;
};

inline Gradients run_backward(TestProblem& p, HostTensor* topk, ForwardResult& fwd, HostTensor& dout,
                              const Context& ctx = {}) {
  Gradients g{HostTensor(p.dtype, p.q.shape()), HostTensor(p.dtype, p.k.shape()),
              HostTensor(p.dtype, p.v.shape())};
  g.dq.poison();
  g.dk.poison();
  g.dv.poison();
  if (topk)
    sparse_attention_backward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), topk->view(),
                              fwd.out.view(), fwd.lse.view(), dout.view(), g.dq.view(),
                              g.dk.view(), g.dv.view(), ctx);
  else
    dense_attention_backward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), fwd.out.view(),
                             fwd.lse.view(), dout.view(), g.dq.view(), g.dk.view(), g.dv.view(),
                             ctx);
  return g;
}

inline double tolerance_for(DType dt) {
  switch (dt) {
    case DType::f64: return 1e-10;
    case DType::f32: return 1e-5;
    default: return 1e-2;
  }
}

// Forward on the CPU against the float64 oracle (every query must see at least one key).
inline void expect_forward_matches_oracle(TestProblem& p, HostTensor* topk, const Context& ctx = {}) {
  const ForwardResult r = run_forward(p, topk, ctx);
  std::vector<int32_t> ids;
  if (topk) ids = ids_of(*topk);
  std::vector<double> out, lse;
  reference::attention_forward(p.cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                               topk ? ids.data() : nullptr, out, lse);
  const double tol = tolerance_for(p.dtype);
  EXPECT_LT(relative_error(r.out.to_double(), out), tol) << "out, dtype " << dtype_name(p.dtype);
  EXPECT_LT(relative_error(r.lse.to_double(), lse), tol) << "lse, dtype " << dtype_name(p.dtype);
}

// The caller's-workspace cases of an op pair: check(p, &topk or nullptr, ctx) for the sparse and the
// dense op, with 2 threads and a caller's workspace of exactly workspace_bytes(). k = 3 is below the
// blocks of a sequence (dense plans more), k = 16 above them (sparse plans more); seeds seed + k.
template <class Check>
inline void for_each_caller_workspace_case(Op sparse_op, Op dense_op, uint64_t seed, Check check) {
  for (const int k_blocks : {3, 16}) {
    Config cfg{8, 2, 16, 8, 8, k_blocks};
    TestProblem p(cfg, {40, 17}, {60, 17}, DType::f32, seed + k_blocks);
    HostTensor topk = oracle_topk(p);
    for (Op op : {sparse_op, dense_op}) {
      Context ctx;
      ctx.num_threads = 2;
      std::vector<unsigned char> ws(workspace_bytes(op, cfg, p.varlen, p.total_q(), p.total_k(),
                                                    Device::cpu(), 2));
      ctx.workspace = {ws.data(), ws.size()};
      check(p, op == sparse_op ? &topk : nullptr, ctx);
    }
  }
}

inline bool bitwise_equal(const HostTensor& a, const HostTensor& b) {
  return a.numel() == b.numel() &&
         std::memcmp(const_cast<HostTensor&>(a).data(), const_cast<HostTensor&>(b).data(),
                     size_t(a.numel()) * dtype_size(a.dtype())) == 0;
}

}  // namespace testing
}  // namespace msa
