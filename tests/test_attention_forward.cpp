// CPU main-branch forward (sparse and dense) against the float64 oracle.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "attention_testing.h"
#include "kernel_env.h"

namespace msa {
namespace {

using testing::expect_forward_matches_oracle;
using testing::oracle_topk;
using testing::run_forward;
using testing::TestProblem;

// (Hq, Hkv, dtype)
class AttentionForward : public ::testing::TestWithParam<std::tuple<int, int, DType>> {
 protected:
  Config config(int block = 8, int k = 3, int d = 16) const {
    Config c;
    c.num_q_heads = std::get<0>(GetParam());
    c.num_kv_heads = std::get<1>(GetParam());
    c.head_dim = d;
    c.index_head_dim = 8;
    c.block_size = block;
    c.topk = k;
    return c;
  }
  DType dtype() const { return std::get<2>(GetParam()); }
};

// Lengths 1, B-1, B, B+1, below k*B, and long enough (70 keys = 9 blocks) for k = 3 to be sparse.
TEST_P(AttentionForward, RaggedPrefillSparseAndDense) {
  const Config cfg = config();
  TestProblem p(cfg, {1, 7, 8, 9, 20, 70}, {1, 7, 8, 9, 20, 70}, dtype(), 11);
  HostTensor topk = oracle_topk(p);
  expect_forward_matches_oracle(p, &topk);
  expect_forward_matches_oracle(p, nullptr);
}

// Chunked prefill (Lq < Lk) and decode with 1..16 queries over a long cached prefix; a sequence
// with no query in the batch.
TEST_P(AttentionForward, QuerySuffixes) {
  const Config cfg = config();
  TestProblem p(cfg, {13, 1, 0, 2, 5, 16, 40}, {61, 90, 20, 33, 77, 100, 57}, dtype(), 12);
  HostTensor topk = oracle_topk(p);
  expect_forward_matches_oracle(p, &topk);
  expect_forward_matches_oracle(p, nullptr);
}

INSTANTIATE_TEST_SUITE_P(
    GqaAndDtypes, AttentionForward,
    ::testing::Values(std::make_tuple(2, 2, DType::f32), std::make_tuple(8, 2, DType::f32),
                      std::make_tuple(16, 1, DType::f32), std::make_tuple(8, 2, DType::bf16),
                      std::make_tuple(8, 2, DType::f16), std::make_tuple(4, 4, DType::bf16),
                      std::make_tuple(16, 1, DType::f16), std::make_tuple(8, 2, DType::f64),
                      std::make_tuple(16, 1, DType::f64)));

// Head dims that are not a multiple of the vector width go through padded rows.
TEST(AttentionForwardShapes, OddHeadDimAndLargeBlocks) {
  for (int d : {12, 40}) {
    Config cfg{8, 2, d, 8, 32, 2};
    TestProblem p(cfg, {31, 32, 33, 100}, {31, 32, 33, 150}, DType::f32, 20 + d);
    HostTensor topk = oracle_topk(p);
    expect_forward_matches_oracle(p, &topk);
    expect_forward_matches_oracle(p, nullptr);
  }
}

// Hand-made rows: -1 holes anywhere, ids in any order, rows without their local block.
TEST(AttentionForwardShapes, HandMadeTopkRows) {
  Config cfg{4, 2, 16, 8, 8, 4};
  TestProblem p(cfg, {40}, {40}, DType::f32, 21);
  HostTensor topk(DType::i32, {2, 40, 4});
  std::mt19937_64 rng(5);
  for (int g = 0; g < 2; ++g)
    for (int64_t row = 0; row < 40; ++row) {
      const int local = int(row / 8);
      std::vector<int32_t> ids(local + 1);
      for (int j = 0; j <= local; ++j) ids[j] = j;
      std::shuffle(ids.begin(), ids.end(), rng);
      ids.resize(std::min<size_t>(ids.size(), 3));  // at most 3 ids: the local block may be left out
      while (ids.size() < 4) ids.insert(ids.begin() + (rng() % (ids.size() + 1)), -1);
      for (int s = 0; s < 4; ++s) topk.set((g * 40 + row) * 4 + s, ids[s]);
    }
  expect_forward_matches_oracle(p, &topk);
}

// A query whose row holds no valid id sees no key: out = 0, lse = -inf.
TEST(AttentionForwardShapes, EmptyRowGivesZeroAndMinusInfinity) {
  Config cfg{2, 1, 16, 8, 8, 2};
  TestProblem p(cfg, {20}, {20}, DType::f32, 22);
  HostTensor topk = oracle_topk(p);
  for (int s = 0; s < 2; ++s) topk.set(int64_t(13) * 2 + s, -1);
  const testing::ForwardResult r = run_forward(p, &topk);
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(r.lse.get(13 * 2 + h), -std::numeric_limits<double>::infinity());
    for (int d = 0; d < 16; ++d) EXPECT_EQ(r.out.get((13 * 2 + h) * 16 + d), 0.0);
  }
  EXPECT_TRUE(std::isfinite(r.lse.get(12 * 2)));
}

// With k covering every visible block, MSA is dense attention.
TEST(AttentionForwardShapes, SparseEqualsDenseWhenTopkCoversEveryBlock) {
  Config cfg{8, 2, 32, 8, 8, 16};  // 16 blocks of 8 cover 128 keys
  TestProblem p(cfg, {100, 3, 60}, {100, 128, 90}, DType::f32, 23);
  HostTensor topk = oracle_topk(p);
  const testing::ForwardResult s = run_forward(p, &topk);
  const testing::ForwardResult d = run_forward(p, nullptr);
  EXPECT_LT(relative_error(s.out.to_double(), d.out.to_double()), 1e-6);
  EXPECT_LT(relative_error(s.lse.to_double(), d.lse.to_double()), 1e-6);
}

// q, k and v as views into one packed qkv buffer [total, Hq + 2 Hkv, D]; blocks of 32 with bf16
// take the AMX path where the CPU has it (forced: MSA_CPU_AMX=all).
TEST(AttentionForwardShapes, StridedQkvViews) {
  testing::ScopedKernelEnv amx("MSA_CPU_AMX", "all");
  for (DType dt : {DType::f32, DType::bf16}) {
    for (int block : {8, 32}) {
      Config cfg{8, 2, 16, 8, block, 3};
      TestProblem p(cfg, {150, 9}, {150, 9}, dt, 24 + block);
      const int64_t total = 159, heads = 12, D = 16;
      HostTensor qkv(dt, {total, heads, D});
      for (int64_t t = 0; t < total; ++t)
        for (int64_t d = 0; d < D; ++d) {
          for (int h = 0; h < 8; ++h) qkv.set((t * heads + h) * D + d, p.q.get((t * 8 + h) * D + d));
          for (int h = 0; h < 2; ++h) {
            qkv.set((t * heads + 8 + h) * D + d, p.k.get((t * 2 + h) * D + d));
            qkv.set((t * heads + 10 + h) * D + d, p.v.get((t * 2 + h) * D + d));
          }
        }
      auto slice = [&](int h0, int nh) {
        TensorView v = qkv.view();
        v.data = static_cast<char*>(v.data) + h0 * D * dtype_size(dt);
        v.shape[1] = nh;
        return v;
      };
      HostTensor topk = oracle_topk(p);
      for (bool sparse : {true, false}) {
        testing::ForwardResult ref = run_forward(p, sparse ? &topk : nullptr);
        HostTensor out(dt, {total, 8, D}), lse(DType::f32, {total, 8});
        out.poison();
        lse.poison();
        if (sparse)
          sparse_attention_forward(cfg, p.varlen, slice(0, 8), slice(8, 2), slice(10, 2), topk.view(),
                                   out.view(), lse.view());
        else
          dense_attention_forward(cfg, p.varlen, slice(0, 8), slice(8, 2), slice(10, 2), out.view(),
                                  lse.view());
        EXPECT_TRUE(testing::bitwise_equal(out, ref.out));
        EXPECT_TRUE(testing::bitwise_equal(lse, ref.lse));
      }
    }
  }
}

// Items write disjoint rows: any thread count gives the same bits.
TEST(AttentionForwardShapes, ThreadCountDoesNotChangeResults) {
  Config cfg{8, 2, 16, 8, 8, 3};
  TestProblem p(cfg, {70, 33}, {90, 33}, DType::bf16, 25);
  HostTensor topk = oracle_topk(p);
  for (HostTensor* t : {&topk, static_cast<HostTensor*>(nullptr)}) {
    Context one, three;
    one.num_threads = 1;
    three.num_threads = 3;
    const testing::ForwardResult a = run_forward(p, t, one), b = run_forward(p, t, three);
    EXPECT_TRUE(testing::bitwise_equal(a.out, b.out));
    EXPECT_TRUE(testing::bitwise_equal(a.lse, b.lse));
  }
}

// A caller's workspace of workspace_bytes() is enough, for sparse and dense.
TEST(AttentionForwardShapes, CallerWorkspace) {
  testing::for_each_caller_workspace_case(Op::sparse_forward, Op::dense_forward, 26,
                                          expect_forward_matches_oracle);
}

TEST(AttentionForwardShapes, BadTopkIdsNameTopk) {
  Config cfg{4, 2, 16, 8, 8, 3};
  TestProblem p(cfg, {30}, {30}, DType::f32, 27);
  const HostTensor good = oracle_topk(p);
  // (group, row, slot, value): below -1, after the local block (row 9 has local block 1), repeated.
  const int bad[][4] = {{0, 20, 0, -2}, {1, 9, 0, 2}, {0, 29, 1, -1000}};
  for (const auto& b : bad) {
    HostTensor topk = good;
    topk.set((int64_t(b[0]) * 30 + b[1]) * 3 + b[2], b[3]);
    try {
      run_forward(p, &topk);
      ADD_FAILURE() << "no error for id " << b[3];
    } catch (const ArgumentError& e) {
      EXPECT_EQ(e.argument(), "topk") << e.what();
    }
  }
  HostTensor dup = good;  // row 25 (local block 3): ids {0, 0, 3}
  dup.set(25 * 3 + 0, 0);
  dup.set(25 * 3 + 1, 0);
  dup.set(25 * 3 + 2, 3);
  EXPECT_THROW(run_forward(p, &dup), ArgumentError);
}

}  // namespace
}  // namespace msa
