// CUDA KL alignment against the CPU backend on the same fresh random inputs (teacher lse from the CPU
// main-branch forward): sparse over topk and dense warmup, ragged batches, chunked prefill, decode,
// GQA ratios 1..16, D = 64 and 128; outputs poisoned before each call; bitwise reproducible.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "cuda/device_tensor.h"
#include "cuda/training_cuda_testing.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::DeviceTensor;
using testing::TestProblem;

struct KlOut {
  HostTensor loss, dqi, dki;
};

KlOut make_out(TestProblem& p) {
  KlOut o{HostTensor(DType::f32, {1}),
          HostTensor(p.dtype, {p.total_q(), p.cfg.num_kv_heads, p.cfg.index_head_dim}),
          HostTensor(p.dtype, {p.total_k(), p.cfg.index_head_dim})};
  o.loss.poison();
  o.dqi.poison();
  o.dki.poison();
  return o;
}

constexpr float kCoeff = 1.5f;

KlOut run_cuda(TestProblem& p, HostTensor* topk, HostTensor& lse, bool deterministic) {
  KlOut o = make_out(p);
  HostTensor topk_dummy(DType::i32, {1});
  DeviceTensor q(p.q), k(p.k), qi(p.qi), ki(p.ki), lse_d(lse), topk_d(topk ? *topk : topk_dummy), cq(p.cu_q),
      ck(p.cu_k), loss(o.loss), dqi(o.dqi), dki(o.dki);
  Varlen vl;
  vl.cu_seqlens_q = cq.view();
  vl.cu_seqlens_k = ck.view();
  Context ctx;
  ctx.deterministic = deterministic;
  kl_alignment(p.cfg, vl, q.view(), k.view(), lse_d.view(), qi.view(), ki.view(), topk ? topk_d.view() : TensorView{},
               kCoeff, loss.view(), dqi.view(), dki.view(), ctx);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  loss.download();
  dqi.download();
  dki.download();
  return o;
}

void check_one(TestProblem& p, HostTensor* topk) {
  HostTensor out, lse;
  testing::cpu_forward(p, topk, out, lse);
  KlOut ref = make_out(p);
  kl_alignment(p.cfg, p.varlen, p.q.view(), p.k.view(), lse.view(), p.qi.view(), p.ki.view(),
               topk ? topk->view() : TensorView{}, kCoeff, ref.loss.view(), ref.dqi.view(), ref.dki.view());
  KlOut got = run_cuda(p, topk, lse, /*deterministic=*/true);
  EXPECT_LT(relative_error(got.loss.to_double(), ref.loss.to_double()), 1e-2) << "loss";
  EXPECT_LT(relative_error(got.dqi.to_double(), ref.dqi.to_double()), 2e-2) << "dqi";
  EXPECT_LT(relative_error(got.dki.to_double(), ref.dki.to_double()), 2e-2) << "dki";
  KlOut again = run_cuda(p, topk, lse, /*deterministic=*/false);
  EXPECT_TRUE(testing::same_bytes(got.loss, again.loss)) << "loss not reproducible";
  EXPECT_TRUE(testing::same_bytes(got.dqi, again.dqi)) << "dqi not reproducible";
  EXPECT_TRUE(testing::same_bytes(got.dki, again.dki)) << "dki not reproducible";
}

struct Case {
  int hq, hkv, d, di, block, k;
  std::vector<int32_t> lq, lk;
  DType dtype;
};

void check_case(const Case& c, uint64_t seed) {
  Config cfg = testing::attention_config(c.hq, c.hkv, c.d, c.block, c.k);
  cfg.index_head_dim = c.di;
  TestProblem p(cfg, c.lq, c.lk, c.dtype, seed);
  std::mt19937_64 rng(seed * 5 + 3);
  HostTensor topk = testing::random_topk_tensor(cfg, p.lens, rng);
  {
    SCOPED_TRACE("sparse");
    check_one(p, &topk);
  }
  {
    SCOPED_TRACE("dense");
    check_one(p, nullptr);
  }
}

class KlAlignmentCuda : public ::testing::Test {
 protected:
  void SetUp() override { MSA_SKIP_WITHOUT_GPU(); }
};

TEST_F(KlAlignmentCuda, RaggedBlockEdgesGqa16) {
  check_case({64, 4, 128, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 41);
}

TEST_F(KlAlignmentCuda, ChunkedPrefillAndDecodeGqa16) {
  check_case({16, 1, 128, 64, 128, 4, {1, 16, 7, 130}, {700, 529, 128, 300}, DType::bf16}, 42);
}

TEST_F(KlAlignmentCuda, Gqa4HeadDim64Float16) {
  check_case({32, 8, 64, 128, 64, 4, {127, 3, 200}, {127, 400, 333}, DType::f16}, 43);
}

TEST_F(KlAlignmentCuda, Gqa1ShortSequencesBelowK) {
  check_case({4, 4, 64, 32, 16, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 44);
}

}  // namespace
}  // namespace msa
