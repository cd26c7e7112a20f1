// CUDA attention backward (sparse over topk, dense causal) against the CPU backend on the same fresh
// random inputs: ragged batches around block edges, chunked-prefill and decode suffixes, sequences
// shorter than k blocks, GQA ratios 1..128, D = 64 and 128, bf16 and f16, dQ from partials and from
// tile unions; outputs poisoned before each call; deterministic mode bitwise equal across runs.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "cuda/device_tensor.h"
#include "kernel_env.h"
#include "cuda/training_cuda_testing.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::Case;
using testing::DeviceTensor;
using testing::TestProblem;

struct Grads {
  HostTensor dq, dk, dv;
};

Grads make_grads(TestProblem& p) {
  const int64_t tq = p.total_q(), tk = p.total_k();
  Grads g{HostTensor(p.dtype, {tq, p.cfg.num_q_heads, p.cfg.head_dim}),
          HostTensor(p.dtype, {tk, p.cfg.num_kv_heads, p.cfg.head_dim}),
          HostTensor(p.dtype, {tk, p.cfg.num_kv_heads, p.cfg.head_dim})};
  g.dq.poison();
  g.dk.poison();
  g.dv.poison();
  return g;
}

Grads run_cuda(TestProblem& p, HostTensor* topk, HostTensor& out, HostTensor& lse, HostTensor& dout,
               bool deterministic) {
  Grads g = make_grads(p);
  HostTensor topk_dummy(DType::i32, {1});
  DeviceTensor dq_in(p.q), dk_in(p.k), dv_in(p.v), dout_d(dout), out_d(out), lse_d(lse),
      topk_d(topk ? *topk : topk_dummy), cq(p.cu_q), ck(p.cu_k), gq(g.dq), gk(g.dk), gv(g.dv);
  Varlen vl;
  vl.cu_seqlens_q = cq.view();
  vl.cu_seqlens_k = ck.view();
  Context ctx;
  ctx.deterministic = deterministic;
  if (topk)
    sparse_attention_backward(p.cfg, vl, dq_in.view(), dk_in.view(), dv_in.view(), topk_d.view(), out_d.view(),
                              lse_d.view(), dout_d.view(), gq.view(), gk.view(), gv.view(), ctx);
  else
    dense_attention_backward(p.cfg, vl, dq_in.view(), dk_in.view(), dv_in.view(), out_d.view(), lse_d.view(),
                             dout_d.view(), gq.view(), gk.view(), gv.view(), ctx);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  gq.download();
  gk.download();
  gv.download();
  return g;
}

Grads run_cpu(TestProblem& p, HostTensor* topk, HostTensor& out, HostTensor& lse, HostTensor& dout) {
  Grads g = make_grads(p);
  if (topk)
    sparse_attention_backward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), topk->view(), out.view(),
                              lse.view(), dout.view(), g.dq.view(), g.dk.view(), g.dv.view());
  else
    dense_attention_backward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), out.view(), lse.view(),
                             dout.view(), g.dq.view(), g.dk.view(), g.dv.view());
  return g;
}

void check_one(TestProblem& p, HostTensor* topk, uint64_t seed) {
  HostTensor out, lse;
  testing::cpu_forward(p, topk, out, lse);
  HostTensor dout(p.dtype, {p.total_q(), p.cfg.num_q_heads, p.cfg.head_dim});
  std::mt19937_64 rng(seed);
  dout.fill_normal(rng);
  Grads ref = run_cpu(p, topk, out, lse, dout);
  Grads got = run_cuda(p, topk, out, lse, dout, /*deterministic=*/true);
  EXPECT_LT(relative_error(got.dq.to_double(), ref.dq.to_double()), 2e-2) << "dq";
  EXPECT_LT(relative_error(got.dk.to_double(), ref.dk.to_double()), 2e-2) << "dk";
  EXPECT_LT(relative_error(got.dv.to_double(), ref.dv.to_double()), 2e-2) << "dv";
  Grads again = run_cuda(p, topk, out, lse, dout, /*deterministic=*/true);
  EXPECT_TRUE(testing::same_bytes(got.dq, again.dq)) << "dq not reproducible";
  EXPECT_TRUE(testing::same_bytes(got.dk, again.dk)) << "dk not reproducible";
  EXPECT_TRUE(testing::same_bytes(got.dv, again.dv)) << "dv not reproducible";
  Grads fast = run_cuda(p, topk, out, lse, dout, /*deterministic=*/false);
  EXPECT_LT(relative_error(fast.dk.to_double(), ref.dk.to_double()), 2e-2) << "dk (default mode)";
}

void check_case(const Case& c, uint64_t seed) {
  const Config cfg = testing::attention_config(c.hq, c.hkv, c.d, c.block, c.k);
  TestProblem p(cfg, c.lq, c.lk, c.dtype, seed);
  std::mt19937_64 rng(seed * 7 + 1);
  HostTensor topk = testing::random_topk_tensor(cfg, p.lens, rng);
  {
    SCOPED_TRACE("sparse");
    check_one(p, &topk, seed + 100);
  }
  {
    SCOPED_TRACE("dense");
    check_one(p, nullptr, seed + 200);
  }
}

class AttentionBackwardCuda : public ::testing::Test {
 protected:
  void SetUp() override { MSA_SKIP_WITHOUT_GPU(); }
};

TEST_F(AttentionBackwardCuda, RaggedBlockEdgesGqa16) {
  check_case({64, 4, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 31);
}

TEST_F(AttentionBackwardCuda, ChunkedPrefillAndDecodeGqa16Block128) {
  check_case({16, 1, 128, 128, 4, {1, 16, 7, 130, 129}, {700, 529, 128, 300, 129}, DType::bf16}, 32);
}

TEST_F(AttentionBackwardCuda, Gqa4HeadDim64) {
  check_case({32, 8, 64, 64, 4, {127, 3, 200}, {127, 400, 333}, DType::bf16}, 33);
}

TEST_F(AttentionBackwardCuda, Gqa8Float16) {
  check_case({8, 1, 128, 64, 5, {130, 9, 64}, {450, 260, 64}, DType::f16}, 34);
}

TEST_F(AttentionBackwardCuda, Gqa1ShortSequencesBelowK) {
  check_case({4, 4, 64, 64, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 35);
}

TEST_F(AttentionBackwardCuda, Gqa3OddGroups) {
  check_case({6, 2, 64, 64, 2, {50, 7}, {190, 7}, DType::bf16}, 36);
}

// A group wider than a 64-row tile: each gathered query takes two tiles.
TEST_F(AttentionBackwardCuda, Gqa128WiderThanTile) {
  check_case({128, 1, 64, 128, 3, {70, 5}, {300, 5}, DType::bf16}, 37);
}

// The query-major dQ kernels, which large problems (and dense mode) use instead of dQ partials:
// MSA_ATTENTION_DQ=tiles takes the TMA kernel on sm_90 where its 128-row tiles apply (G dividing 64
// or a multiple of it; else the mma.sync kernel), =mma the mma.sync kernel. Cases: GQA 16, 1, 8, 128
// and 3 (no TMA tiles), D 64 and 128, blocks of 64 and 128 keys (two 64-key chunks a block), and a
// case with more tiles than SMs, so persistent CTAs reuse their tile slots and stages. Without dQ
// partials dK/dV run on the wgmma kernel on sm_90 (MSA_ATTENTION_DKDV=mma: the mma.sync one); both
// here (dense mode in every other test takes the wgmma kernel too).
TEST_F(AttentionBackwardCuda, DqFromTileUnions) {
  for (const char* kernel : {"tiles", "mma", "tiles+dkdv-mma"}) {
    SCOPED_TRACE(kernel);
    const bool dkdv_mma = std::string(kernel) == "tiles+dkdv-mma";
    testing::ScopedKernelEnv env("MSA_ATTENTION_DQ", dkdv_mma ? "tiles" : kernel);
    testing::ScopedKernelEnv dkdv_env("MSA_ATTENTION_DKDV", dkdv_mma ? "mma" : "wgmma");
    check_case({64, 4, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 38);
    check_case({32, 8, 64, 128, 4, {127, 3, 200}, {127, 400, 333}, DType::f16}, 39);
    check_case({4, 4, 64, 64, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 40);
    check_case({16, 2, 128, 128, 3, {9, 140, 257}, {300, 140, 600}, DType::f16}, 41);
    check_case({128, 1, 64, 128, 3, {70, 5}, {300, 5}, DType::bf16}, 42);
    check_case({6, 2, 64, 64, 2, {50, 7}, {190, 7}, DType::bf16}, 43);
  }
}

TEST_F(AttentionBackwardCuda, DqTilesMoreThanSms) {
  testing::ScopedKernelEnv env("MSA_ATTENTION_DQ", "tiles");
  check_case({64, 4, 128, 128, 4, {1200, 37}, {1300, 37}, DType::bf16}, 44);
}

}  // namespace
}  // namespace msa
