// Self-consistency of the float64 oracle, on which every other test leans.
#include <gtest/gtest.h>

#include "problem_fixture.h"

namespace msa {
namespace {

using testing::TestProblem;

TEST(Oracle, SparseEqualsDenseWhenTopkCoversEveryBlock) {
  Config cfg{4, 2, 16, 8, 8, 64};  // 64 blocks of 8 cover 512 keys
  TestProblem p(cfg, {37, 5}, {301, 200}, DType::f64, 1);
  std::vector<int32_t> topk;
  std::vector<double> slse, out_s, lse_s, out_d, lse_d;
  reference::index_topk(cfg, p.lens, p.qi.to_double(), p.ki.to_double(), topk, slse);
  reference::attention_forward(cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                               topk.data(), out_s, lse_s);
  reference::attention_forward(cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                               nullptr, out_d, lse_d);
  EXPECT_LT(relative_error(out_s, out_d), 1e-12);
  EXPECT_LT(relative_error(lse_s, lse_d), 1e-12);
}

TEST(Oracle, TopkRowHasLocalBlockLastAndPadding) {
  Config cfg{2, 1, 8, 8, 4, 5};
  TestProblem p(cfg, {30}, {30}, DType::f64, 2);
  for (int64_t row = 0; row < 30; ++row) {
    auto r = reference::index_row(cfg, p.lens, p.qi.to_double().data(), p.ki.to_double().data(),
                                  row, 0);
    const int64_t local = row / 4;
    const int n = int(std::min<int64_t>(local, 4));
    EXPECT_EQ(r.topk[n], local);
    for (int s = n + 1; s < 5; ++s) EXPECT_EQ(r.topk[s], -1);
    for (int s = 0; s < n; ++s) EXPECT_LT(r.topk[s], local);
  }
}

}  // namespace
}  // namespace msa
