// CPU main-branch backward (sparse and dense): against the float64 oracle, against finite
// differences, and bitwise reproducibility.
#include <gtest/gtest.h>

#include <tuple>

#include "attention_testing.h"

namespace msa {
namespace {

using testing::Gradients;
using testing::oracle_topk;
using testing::run_backward;
using testing::run_forward;
using testing::TestProblem;

void expect_backward_matches_oracle(TestProblem& p, HostTensor* topk, double tol,
                                    const Context& ctx = {}) {
  HostTensor dout(p.dtype, p.q.shape());
  std::mt19937_64 rng(p.total_q() * 7 + 3);
  dout.fill_normal(rng);
  testing::ForwardResult fwd = run_forward(p, topk, ctx);
  const Gradients g = run_backward(p, topk, fwd, dout, ctx);
  std::vector<int32_t> ids;
  if (topk) ids = testing::ids_of(*topk);
  std::vector<double> dq, dk, dv;
  reference::attention_backward(p.cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                                topk ? ids.data() : nullptr, dout.to_double(), dq, dk, dv);
  EXPECT_LT(relative_error(g.dq.to_double(), dq), tol) << "dq " << dtype_name(p.dtype);
  EXPECT_LT(relative_error(g.dk.to_double(), dk), tol) << "dk " << dtype_name(p.dtype);
  EXPECT_LT(relative_error(g.dv.to_double(), dv), tol) << "dv " << dtype_name(p.dtype);
}

// (Hq, Hkv, dtype)
class AttentionBackward : public ::testing::TestWithParam<std::tuple<int, int, DType>> {
 protected:
  Config config() const {
    return Config{std::get<0>(GetParam()), std::get<1>(GetParam()), 16, 8, 8, 3};
  }
  DType dtype() const { return std::get<2>(GetParam()); }
  double tol() const { return testing::tolerance_for(dtype()); }
};

TEST_P(AttentionBackward, RaggedPrefillSparseAndDense) {
  TestProblem p(config(), {1, 7, 8, 9, 20, 70}, {1, 7, 8, 9, 20, 70}, dtype(), 31);
  HostTensor topk = oracle_topk(p);
  expect_backward_matches_oracle(p, &topk, tol());
  expect_backward_matches_oracle(p, nullptr, tol());
}

TEST_P(AttentionBackward, QuerySuffixes) {
  TestProblem p(config(), {13, 1, 3, 16}, {61, 90, 33, 100}, dtype(), 32);
  HostTensor topk = oracle_topk(p);
  expect_backward_matches_oracle(p, &topk, tol());
  expect_backward_matches_oracle(p, nullptr, tol());
}

INSTANTIATE_TEST_SUITE_P(
    GqaAndDtypes, AttentionBackward,
    ::testing::Values(std::make_tuple(2, 2, DType::f32), std::make_tuple(8, 2, DType::f32),
                      std::make_tuple(16, 1, DType::f32), std::make_tuple(8, 2, DType::f64),
                      std::make_tuple(4, 4, DType::f64), std::make_tuple(8, 2, DType::bf16)));

TEST(AttentionBackwardShapes, OddHeadDimAndHandMadeRows) {
  Config cfg{4, 2, 12, 8, 8, 4};
  TestProblem p(cfg, {40}, {40}, DType::f32, 33);
  HostTensor topk(DType::i32, {2, 40, 4});
  std::mt19937_64 rng(6);
  for (int g = 0; g < 2; ++g)
    for (int64_t row = 0; row < 40; ++row) {
      const int local = int(row / 8);
      std::vector<int32_t> ids(local + 1);
      for (int j = 0; j <= local; ++j) ids[j] = j;
      std::shuffle(ids.begin(), ids.end(), rng);
      ids.resize(std::min<size_t>(ids.size(), 3));
      while (ids.size() < 4) ids.insert(ids.begin() + (rng() % (ids.size() + 1)), -1);
      for (int s = 0; s < 4; ++s) topk.set((g * 40 + row) * 4 + s, ids[s]);
    }
  expect_backward_matches_oracle(p, &topk, 1e-5);
}

// Central differences of L = <out, W> in float64 on a tiny sparse problem.
TEST(AttentionBackwardShapes, FiniteDifferencesFloat64) {
  Config cfg{4, 2, 4, 4, 4, 2};
  TestProblem p(cfg, {7, 3}, {11, 9}, DType::f64, 34);
  HostTensor topk = oracle_topk(p);
  HostTensor w(DType::f64, p.q.shape());
  std::mt19937_64 rng(9);
  w.fill_normal(rng);
  auto loss = [&]() {
    const testing::ForwardResult r = run_forward(p, &topk);
    double s = 0;
    for (int64_t i = 0; i < r.out.numel(); ++i) s += r.out.get(i) * w.get(i);
    return s;
  };
  testing::ForwardResult fwd = run_forward(p, &topk);
  const Gradients g = run_backward(p, &topk, fwd, w);
  const double h = 1e-6;
  for (auto [x, dx] : {std::pair{&p.q, &g.dq}, std::pair{&p.k, &g.dk}, std::pair{&p.v, &g.dv}}) {
    for (int64_t i = 0; i < x->numel(); ++i) {
      const double x0 = x->get(i);
      x->set(i, x0 + h);
      const double lp = loss();
      x->set(i, x0 - h);
      const double lm = loss();
      x->set(i, x0);
      EXPECT_NEAR(dx->get(i), (lp - lm) / (2 * h), 1e-7) << "element " << i;
    }
  }
}

// Same thread count, deterministic mode: the same bits, run after run (dk, dv accumulate across
// queries, so this is where reproducibility could break).
TEST(AttentionBackwardShapes, DeterministicAcrossRuns) {
  Config cfg{8, 2, 16, 8, 8, 3};
  TestProblem p(cfg, {90, 37}, {120, 37}, DType::f32, 35);
  HostTensor topk = oracle_topk(p);
  HostTensor dout(DType::f32, p.q.shape());
  std::mt19937_64 rng(10);
  dout.fill_normal(rng);
  for (HostTensor* t : {&topk, static_cast<HostTensor*>(nullptr)}) {
    Context ctx;
    ctx.deterministic = true;
    ctx.num_threads = 3;
    testing::ForwardResult fwd = run_forward(p, t, ctx);
    const Gradients a = run_backward(p, t, fwd, dout, ctx);
    const Gradients b = run_backward(p, t, fwd, dout, ctx);
    EXPECT_TRUE(testing::bitwise_equal(a.dq, b.dq));
    EXPECT_TRUE(testing::bitwise_equal(a.dk, b.dk));
    EXPECT_TRUE(testing::bitwise_equal(a.dv, b.dv));
  }
}

TEST(AttentionBackwardShapes, CallerWorkspace) {
  testing::for_each_caller_workspace_case(
      Op::sparse_backward, Op::dense_backward, 36,
      [](TestProblem& p, HostTensor* topk, const Context& ctx) {
        expect_backward_matches_oracle(p, topk, 1e-5, ctx);
      });
}

TEST(AttentionBackwardShapes, BadTopkIdsNameTopk) {
  Config cfg{4, 2, 16, 8, 8, 3};
  TestProblem p(cfg, {30}, {30}, DType::f32, 37);
  HostTensor topk = oracle_topk(p);
  testing::ForwardResult fwd = run_forward(p, &topk);
  HostTensor dout(DType::f32, p.q.shape());
  std::mt19937_64 rng(11);
  dout.fill_normal(rng);
  topk.set((int64_t(1) * 30 + 5) * 3, 1);  // row 5 has local block 0
  try {
    run_backward(p, &topk, fwd, dout);
    ADD_FAILURE() << "no error";
  } catch (const ArgumentError& e) {
    EXPECT_EQ(e.argument(), "topk") << e.what();
  }
}

}  // namespace
}  // namespace msa
