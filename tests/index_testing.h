// Helpers of the CPU index-branch tests: a call of the public index_topk with poisoned outputs, and
// the selection check against the float64 oracle (sets per (group, query), local block in slot n,
// -1 padding, near-tie tolerance, selected LSE).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "msa/ops.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

struct IndexResult {
  HostTensor topk, slse;
};

inline IndexResult run_index(TestProblem& p, float temperature, bool with_lse = true,
                             Context ctx = {}) {
  const int64_t tq = p.total_q();
  IndexResult r{
      HostTensor(DType::i32, {p.cfg.num_kv_heads, tq, p.cfg.topk}),
      HostTensor(p.dtype == DType::f64 ? DType::f64 : DType::f32, {p.cfg.num_kv_heads, tq})};
  r.topk.poison();
  r.slse.poison();
  index_topk(p.cfg, p.varlen, p.qi.view(), p.ki.view(), r.topk.view(),
             with_lse ? r.slse.view() : TensorView{}, temperature, ctx);
  return r;
}

// Scores of the oracle differ from the backend's only by f32 accumulation: near-ties within this
// tolerance may swap.
inline double score_tolerance(DType dt) { return dt == DType::f64 ? 1e-9 : 1e-4; }

// Checks every row; counts in `same` the rows whose selected set equals the oracle's.
inline void check_selection(TestProblem& p, const IndexResult& got, float temperature,
                            bool check_lse, int64_t& same) {
  const Config& cfg = p.cfg;
  const int64_t tq = p.total_q();
  const int K = cfg.topk;
  const std::vector<double> qi = p.qi.to_double(), ki = p.ki.to_double();
  const double tol = score_tolerance(p.dtype);
  same = 0;
  std::vector<double> lse_got, lse_ref;
  for (int g = 0; g < cfg.num_kv_heads; ++g)
    for (int64_t row = 0; row < tq; ++row) {
      const reference::IndexRow ref =
          reference::index_row(cfg, p.lens, qi.data(), ki.data(), row, g, temperature);
      const int64_t local = int64_t(ref.block_scores.size()) - 1;
      const int n = rules::num_nonlocal_selected(local, K);
      std::vector<int32_t> ids(K);
      for (int s = 0; s < K; ++s) ids[s] = int32_t(got.topk.get((int64_t(g) * tq + row) * K + s));
      SCOPED_TRACE("group " + std::to_string(g) + " row " + std::to_string(row));
      ASSERT_EQ(ids[n], local) << "local block must sit in slot n";
      for (int s = n + 1; s < K; ++s) ASSERT_EQ(ids[s], -1);
      std::set<int32_t> chosen(ids.begin(), ids.begin() + n);
      ASSERT_EQ(int(chosen.size()), n) << "duplicate ids";
      // Each chosen block ranks within tolerance of the oracle's n-th best (the last one it keeps).
      const double nth = n > 0 ? ref.block_scores[ref.topk[n - 1]] : 0;
      for (int32_t j : chosen) {
        ASSERT_GE(j, 0);
        ASSERT_LT(j, local);
        ASSERT_GE(ref.block_scores[j], nth - tol * (1 + std::fabs(nth)));
      }
      const std::set<int32_t> want(ref.topk.begin(), ref.topk.begin() + n);
      if (chosen != want) continue;
      ++same;
      if (check_lse) {
        lse_got.push_back(got.slse.get(int64_t(g) * tq + row));
        lse_ref.push_back(ref.selected_lse);
      }
    }
  if (check_lse) {
    const double bound = p.dtype == DType::f64 ? 1e-12 : (p.dtype == DType::f32 ? 1e-5 : 1e-5);
    EXPECT_LT(relative_error(lse_got, lse_ref), bound);
  }
}

struct Case {
  int hkv, di, block, topk;
  std::vector<int32_t> lq, lk;
};

// with_lse = false asks for no selected LSE (the backend may then pool without sums of exp).
inline void run_case(const Case& c, DType dt, uint64_t seed, float temperature = 1.f,
                     bool with_lse = true) {
  Config cfg{c.hkv * 4, c.hkv, 16, c.di, c.block, c.topk};
  TestProblem p(cfg, c.lq, c.lk, dt, seed);
  IndexResult r = run_index(p, temperature, with_lse);
  const int64_t rows = p.total_q() * c.hkv;
  int64_t same = 0;
  check_selection(p, r, temperature, with_lse, same);
  // Random normal data has essentially no near-ties: nearly every set must match exactly.
  EXPECT_GE(same, rows - std::max<int64_t>(1, rows / 100));
}

}  // namespace testing
}  // namespace msa
