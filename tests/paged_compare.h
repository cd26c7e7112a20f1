// A paged step's outputs against the contiguous varlen API on the same tokens (msa::index_topk +
// msa::sparse_attention_forward, or msa::dense_attention_forward in dense mode) and the float64
// oracle: shared by the paged CPU tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "common/host_tensor.h"
#include "msa/ops.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

struct PagedOutputs {
  HostTensor out, lse, topk;
  PagedOutputs(const Config& c, int64_t tq, DType dt)
      : out(dt, {tq, c.num_q_heads, c.head_dim}),
        lse(DType::f32, {tq, c.num_q_heads}),
        topk(DType::i32, {c.num_kv_heads, tq, c.topk}) {
    out.poison();
    lse.poison();
    topk.poison();
  }
};

inline PagedOutputs run_contiguous(TestProblem& p, bool dense) {
  PagedOutputs o(p.cfg, p.total_q(), p.dtype);
  if (dense) {
    dense_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), o.out.view(),
                            o.lse.view());
  } else {
    index_topk(p.cfg, p.varlen, p.qi.view(), p.ki.view(), o.topk.view(), TensorView{});
    sparse_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), o.topk.view(),
                             o.out.view(), o.lse.view());
  }
  return o;
}

// Selection as sets per (group, query) with the local block in its slot; outputs within fp32
// rounding of the contiguous path (plus one output rounding step for 16-bit dtypes); then the
// float64 oracle on a few rows with the paged selection.
inline void expect_paged_equals_contiguous(TestProblem& p, const PagedOutputs& got, bool dense) {
  const PagedOutputs ref = run_contiguous(p, dense);
  const Config& c = p.cfg;
  const int64_t tq = p.total_q();
  if (tq == 0) return;
  if (!dense) {
    for (int g = 0; g < c.num_kv_heads; ++g)
      for (int64_t row = 0; row < tq; ++row) {
        std::vector<int32_t> a(c.topk), b(c.topk);
        for (int k = 0; k < c.topk; ++k) {
          a[k] = int32_t(got.topk.get((g * tq + row) * c.topk + k));
          b[k] = int32_t(ref.topk.get((g * tq + row) * c.topk + k));
        }
        const int n = int(std::count_if(b.begin(), b.end(), [](int32_t x) { return x >= 0; })) - 1;
        ASSERT_EQ(a[n], b[n]) << "local slot, group " << g << " row " << row;
        ASSERT_EQ(std::set<int32_t>(a.begin(), a.end()), std::set<int32_t>(b.begin(), b.end()))
            << "group " << g << " row " << row;
      }
  }
  const double tol = p.dtype == DType::f32 ? 1e-6 : 4e-3;
  EXPECT_LT(relative_error(got.out.to_double(), ref.out.to_double()), tol);
  EXPECT_LT(relative_error(got.lse.to_double(), ref.lse.to_double()), 1e-6);

  const double oracle_tol = p.dtype == DType::f32 ? 1e-5 : 1e-2;
  const std::vector<double> q = p.q.to_double(), k = p.k.to_double(), v = p.v.to_double();
  std::vector<int32_t> topk(size_t(got.topk.numel()));
  for (int64_t i = 0; i < got.topk.numel(); ++i) topk[size_t(i)] = int32_t(got.topk.get(i));
  for (int64_t row : {int64_t(0), tq / 2, tq - 1}) {
    for (int h : {0, c.num_q_heads - 1}) {
      std::vector<double> want(size_t(c.head_dim)), have(size_t(c.head_dim));
      double lse = 0;
      reference::attention_row(c, p.lens, q.data(), k.data(), v.data(), dense ? nullptr : topk.data(), row, h,
                               want.data(), &lse);
      for (int d = 0; d < c.head_dim; ++d) have[size_t(d)] = got.out.get((row * c.num_q_heads + h) * c.head_dim + d);
      EXPECT_LT(relative_error(have, want), oracle_tol) << "row " << row << " head " << h;
      EXPECT_NEAR(got.lse.get(row * c.num_q_heads + h), lse, 1e-4 * (1 + std::fabs(lse)));
    }
  }
}

}  // namespace testing
}  // namespace msa
