// CPU KL alignment (msa::kl_alignment) against the float64 oracle: loss, dqi and dki for sparse
// selections and dense warmup, dense == k-infinity sparse, finite differences with the teacher held
// fixed, detach (inputs untouched), determinism and rejection of bad topk ids.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "msa/error.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::TestProblem;

DType stats_of(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

// A problem with its oracle selection and the main-branch lse for that selection (or dense).
struct KlSetup {
  TestProblem p;
  std::vector<int32_t> topk_ids;
  HostTensor topk, lse;
  bool dense;

  KlSetup(const Config& cfg, const std::vector<int32_t>& lq, const std::vector<int32_t>& lk, DType dt,
          uint64_t seed, bool dense_mode)
      : p(cfg, lq, lk, dt, seed), dense(dense_mode) {
    std::vector<double> slse, out, lse_ref;
    reference::index_topk(cfg, p.lens, p.qi.to_double(), p.ki.to_double(), topk_ids, slse);
    topk = HostTensor(DType::i32, {cfg.num_kv_heads, p.total_q(), cfg.topk});
    for (size_t i = 0; i < topk_ids.size(); ++i) topk.set(int64_t(i), topk_ids[i]);
    reference::attention_forward(cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                                 dense ? nullptr : topk_ids.data(), out, lse_ref);
    lse = HostTensor(stats_of(dt), {p.total_q(), cfg.num_q_heads});
    for (size_t i = 0; i < lse_ref.size(); ++i) lse.set(int64_t(i), lse_ref[i]);
  }
};

struct KlResult {
  HostTensor loss, dqi, dki;
};

KlResult run_kl(KlSetup& s, float coeff, const TensorView& topk, Context ctx = {}) {
  TestProblem& p = s.p;
  KlResult r{HostTensor(stats_of(p.dtype), {1}), HostTensor(p.dtype, p.qi.shape()),
             HostTensor(p.dtype, p.ki.shape())};
  r.loss.poison();
  r.dqi.poison();
  r.dki.poison();
  kl_alignment(p.cfg, p.varlen, p.q.view(), p.k.view(), s.lse.view(), p.qi.view(), p.ki.view(), topk,
               coeff, r.loss.view(), r.dqi.view(), r.dki.view(), ctx);
  return r;
}
KlResult run_kl(KlSetup& s, float coeff = 1.f) {
  return run_kl(s, coeff, s.dense ? TensorView{} : s.topk.view());
}

double bound_for(DType dt) { return dt == DType::f64 ? 1e-10 : (dt == DType::f32 ? 1e-5 : 1e-2); }

void compare_with_oracle(KlSetup& s, float coeff) {
  TestProblem& p = s.p;
  std::vector<double> dqi_ref, dki_ref;
  const double loss_ref =
      reference::kl_alignment(p.cfg, p.lens, p.q.to_double(), p.k.to_double(), p.qi.to_double(),
                              p.ki.to_double(), s.dense ? nullptr : s.topk_ids.data(), coeff,
                              dqi_ref, dki_ref);
  KlResult r = run_kl(s, coeff);
  const double bound = bound_for(p.dtype);
  EXPECT_LT(relative_error({r.loss.get(0)}, {loss_ref}), bound) << r.loss.get(0) << " vs " << loss_ref;
  EXPECT_LT(relative_error(r.dqi.to_double(), dqi_ref), bound);
  EXPECT_LT(relative_error(r.dki.to_double(), dki_ref), bound);
  EXPECT_GT(loss_ref, 0);
}

const std::vector<int32_t> kRagged = {1, 7, 8, 9, 20, 45};

TEST(KlAlignment, SparseMatchesOracleAcrossDtypesAndGqa) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64})
    for (int g : {1, 4, 16}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " G " + std::to_string(g));
      Config cfg{2 * g, 2, 16, 32, 8, 3};
      KlSetup s(cfg, kRagged, kRagged, dt, 100 + g, false);
      compare_with_oracle(s, 0.7f);
    }
}

TEST(KlAlignment, DenseWarmupMatchesOracle) {
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    SCOPED_TRACE(dtype_name(dt));
    Config cfg{8, 2, 16, 24, 8, 2};
    KlSetup s(cfg, kRagged, kRagged, dt, 200, true);
    compare_with_oracle(s, 1.f);
  }
}

TEST(KlAlignment, ChunkedPrefillAndDecode) {
  Config cfg{16, 4, 16, 32, 8, 3};
  KlSetup sparse(cfg, {3, 16, 1, 5}, {100, 77, 64, 9}, DType::f32, 300, false);
  compare_with_oracle(sparse, 2.f);
  KlSetup dense(cfg, {3, 16, 1, 5}, {100, 77, 64, 9}, DType::f32, 301, true);
  compare_with_oracle(dense, 2.f);
}

TEST(KlAlignment, DenseIsTheKInfinitySparseCase) {
  // topk holding every block (ids 0..local ascending, the local block in slot n) reads the same keys
  // in the same order as dense mode, so the results are bitwise identical.
  for (DType dt : {DType::f32, DType::bf16}) {
    Config cfg{8, 2, 16, 32, 8, 16};  // 16 blocks of 8 cover 128 keys
    KlSetup s(cfg, {50, 2, 9}, {120, 70, 9}, dt, 400, true);
    const int64_t tq = s.p.total_q();
    HostTensor all(DType::i32, {2, tq, 16});
    for (int g = 0; g < 2; ++g)
      for (int64_t row = 0; row < tq; ++row) {
        const int64_t local = reference::locate_query(s.p.lens, row).position / 8;
        for (int slot = 0; slot < 16; ++slot)
          all.set((g * tq + row) * 16 + slot, slot <= local ? slot : -1);
      }
    KlResult dense = run_kl(s, 1.f, TensorView{});
    KlResult sparse = run_kl(s, 1.f, all.view());
    ASSERT_EQ(dense.loss.get(0), sparse.loss.get(0));
    const size_t e = dtype_size(dt);
    ASSERT_EQ(std::memcmp(dense.dqi.data(), sparse.dqi.data(), size_t(dense.dqi.numel()) * e), 0);
    ASSERT_EQ(std::memcmp(dense.dki.data(), sparse.dki.data(), size_t(dense.dki.numel()) * e), 0);
    // The index branch's own selection for k >= blocks covers the same keys (in another order).
    KlResult picked = run_kl(s, 1.f, s.topk.view());
    EXPECT_LT(relative_error({picked.loss.get(0)}, {dense.loss.get(0)}), 1e-5);
    EXPECT_LT(relative_error(picked.dqi.to_double(), dense.dqi.to_double()), 1e-2);
  }
}

// With the teacher fixed (lse given, P independent of qi/ki), the gradients are exactly those of the
// loss as a function of qi and ki: central differences in float64 must agree.
TEST(KlAlignment, FiniteDifferencesFloat64) {
  for (bool dense : {false, true}) {
    SCOPED_TRACE(dense ? "dense" : "sparse");
    Config cfg{8, 2, 8, 8, 4, 3};
    KlSetup s(cfg, {13, 6}, {13, 21}, DType::f64, 500 + dense, dense);
    const float coeff = 1.5f;
    KlResult base = run_kl(s, coeff);
    std::mt19937_64 rng(7);
    const double eps = 1e-6;
    for (HostTensor* x : {&s.p.qi, &s.p.ki}) {
      const HostTensor& grad = x == &s.p.qi ? base.dqi : base.dki;
      std::uniform_int_distribution<int64_t> pick(0, x->numel() - 1);
      for (int trial = 0; trial < 12; ++trial) {
        const int64_t e = pick(rng);
        const double v = x->get(e);
        x->set(e, v + eps);
        const double up = run_kl(s, coeff).loss.get(0);
        x->set(e, v - eps);
        const double down = run_kl(s, coeff).loss.get(0);
        x->set(e, v);
        const double fd = (up - down) / (2 * eps);
        EXPECT_NEAR(grad.get(e), fd, 1e-7 + 1e-6 * std::fabs(fd)) << "element " << e;
      }
    }
  }
}

TEST(KlAlignment, DetachedInputsAreNeverWritten) {
  Config cfg{8, 2, 16, 32, 8, 3};
  KlSetup s(cfg, kRagged, kRagged, DType::bf16, 600, false);
  auto bytes = [](HostTensor& t) {
    const unsigned char* b = static_cast<const unsigned char*>(t.data());
    return std::vector<unsigned char>(b, b + t.numel() * int64_t(dtype_size(t.dtype())));
  };
  std::vector<HostTensor*> inputs = {&s.p.q, &s.p.k, &s.p.v, &s.lse, &s.p.qi, &s.p.ki, &s.topk};
  std::vector<std::vector<unsigned char>> before;
  for (HostTensor* t : inputs) before.push_back(bytes(*t));
  run_kl(s, 1.f);
  for (size_t i = 0; i < inputs.size(); ++i) EXPECT_EQ(bytes(*inputs[i]), before[i]) << "input " << i;
}

TEST(KlAlignment, ReproducibleWithWorkspaceAndThreads) {
  Config cfg{8, 2, 16, 32, 8, 3};
  KlSetup s(cfg, {100, 7}, {150, 90}, DType::f32, 700, false);
  for (int threads : {1, 2, 3}) {
    const std::size_t need = workspace_bytes(Op::kl_alignment, cfg, s.p.varlen, s.p.total_q(),
                                             s.p.total_k(), Device::cpu(), threads);
    std::vector<unsigned char> ws(need + 3, 0xff);
    Context ctx;
    ctx.num_threads = threads;
    ctx.workspace = {ws.data() + 3, need};
    KlResult a = run_kl(s, 1.f, s.topk.view(), ctx);
    Context own;
    own.num_threads = threads;
    KlResult b = run_kl(s, 1.f, s.topk.view(), own);
    ASSERT_EQ(a.loss.get(0), b.loss.get(0));
    ASSERT_EQ(std::memcmp(a.dqi.data(), b.dqi.data(), size_t(a.dqi.numel()) * 4), 0);
    ASSERT_EQ(std::memcmp(a.dki.data(), b.dki.data(), size_t(a.dki.numel()) * 4), 0);
    ctx.workspace.bytes = need - 1;
    EXPECT_THROW(run_kl(s, 1.f, s.topk.view(), ctx), ArgumentError);
  }
}

TEST(KlAlignment, BadTopkIdsAreRejected) {
  Config cfg{4, 2, 16, 16, 8, 3};
  KlSetup s(cfg, {20}, {20}, DType::f32, 800, false);
  const int64_t tq = s.p.total_q();
  // Query row 19 sits at position 19, local block 2; row 3 at position 3, local block 0.
  struct Bad {
    int64_t at;
    int32_t value;
    const char* what;
  };
  for (Bad bad : {Bad{(1 * tq + 19) * 3 + 0, -2, "below -1"},
                  Bad{(0 * tq + 3) * 3 + 1, 1, "beyond the local block"},
                  Bad{(0 * tq + 19) * 3 + 0, 3, "beyond the sequence"}}) {
    SCOPED_TRACE(bad.what);
    HostTensor topk = s.topk;
    topk.set(bad.at, bad.value);
    try {
      run_kl(s, 1.f, topk.view());
      ADD_FAILURE() << "no error";
    } catch (const ArgumentError& e) {
      EXPECT_EQ(e.argument(), "topk") << e.what();
    }
  }
  HostTensor dup = s.topk;  // row 19: [a, b, 2] -> [2, b, 2]
  dup.set((0 * tq + 19) * 3 + 0, 2);
  try {
    run_kl(s, 1.f, dup.view());
    ADD_FAILURE() << "duplicate id accepted";
  } catch (const ArgumentError& e) {
    EXPECT_EQ(e.argument(), "topk");
    EXPECT_NE(std::string(e.what()).find("more than once"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace msa
