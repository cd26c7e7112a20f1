// CUDA attention forward (sparse over topk, dense causal) against the float64 oracle, on fresh random
// data: ragged batches around block edges, chunked-prefill and decode suffixes, GQA ratios 1..16,
// D = 64 and 128, bf16 and f16, several 64-row tiles per sequence, 192-key blocks (three 64-key chunks,
// so the wgmma kernel's 3-slot K/V rings wrap), strided rows, malformed ids, rejected arguments.
// Every case runs on each kernel (MSA_ATTENTION_KERNEL mma, the query-major tile-union kernel, the
// default for groups wider than 4 heads; gathered, key-major with a merge, sparse only, the default
// for groups of at most 4, dense falls to mma; wgmma: compiled in with
// MSA_EXPERIMENTAL_WGMMA_ATTENTION, sm_90 only; and tma, the warp-specialised TMA kernel, sm_90
// only); a failure names the first element out of tolerance
// (bench/attention_wgmma_probe.cu then checks the wgmma products alone).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention_cuda_testing.h"
#include "cuda/device_tensor.h"
#include "kernel_env.h"
#include "msa/error.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::DeviceTensor;
using testing::TestProblem;

using testing::attention_config;
using testing::Case;
using testing::check_case;
using testing::expect_matches_oracle;
using testing::random_topk;
using testing::Result;
using testing::run_cuda;
using testing::ScopedKernelEnv;

class AttentionForwardCuda : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    MSA_SKIP_WITHOUT_GPU();
    const std::string kernel = GetParam();
    if (kernel == "wgmma" || kernel == "tma") {
#if !defined(MSA_EXPERIMENTAL_WGMMA_ATTENTION)
      if (kernel == "wgmma")
        GTEST_SKIP() << "the wgmma forward is compiled in only with -DMSA_EXPERIMENTAL_WGMMA_ATTENTION=ON";
#endif
      int dev = 0, major = 0, minor = 0;
      cudaGetDevice(&dev);
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
      if (major != 9 || minor != 0) GTEST_SKIP() << "the " << kernel << " forward runs on sm_90 only";
    }
    kernel_.emplace("MSA_ATTENTION_KERNEL", GetParam());
  }

 private:
  std::optional<ScopedKernelEnv> kernel_;
};

TEST_P(AttentionForwardCuda, RaggedBlockEdgesGqa16) {
  check_case({64, 4, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 11);
}

TEST_P(AttentionForwardCuda, ChunkedPrefillAndDecodeGqa16Block128) {
  check_case({16, 1, 128, 128, 4, {1, 16, 7, 130, 129}, {700, 529, 128, 300, 129}, DType::bf16}, 12);
}

TEST_P(AttentionForwardCuda, Gqa4HeadDim64) {
  check_case({32, 8, 64, 64, 4, {127, 3, 200}, {127, 400, 333}, DType::bf16}, 13);
}

TEST_P(AttentionForwardCuda, Gqa8Float16) {
  check_case({8, 1, 128, 64, 5, {130, 9, 64}, {450, 260, 64}, DType::f16}, 14);
}

TEST_P(AttentionForwardCuda, Gqa1ShortSequencesBelowK) {
  check_case({4, 4, 64, 64, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 15);
}

// GQA 1: 64 queries per tile (the whole 64-bit query mask of a block), several tiles per sequence.
TEST_P(AttentionForwardCuda, Gqa1TwoMaskWordsHeadDim128) {
  check_case({2, 2, 128, 64, 3, {300, 129}, {700, 200}, DType::bf16}, 21);
}

// GQA 2 with three 64-key chunks per block and several 64-row tiles per sequence.
TEST_P(AttentionForwardCuda, Gqa2Block192Float16) {
  check_case({4, 2, 128, 192, 3, {200, 65}, {900, 65}, DType::f16}, 22);
}

// Rows of 32 partials (16 slots x two 64-key parts: the gathered merge's vector path, both halves)
// and of 34 (17 slots: its general path).
TEST_P(AttentionForwardCuda, Gqa4Block128With32Partials) {
  check_case({8, 2, 64, 128, 16, {300, 70}, {2400, 900}, DType::bf16}, 24);
}

TEST_P(AttentionForwardCuda, Gqa4Block128With34Partials) {
  check_case({8, 2, 128, 128, 17, {200, 129}, {2500, 129}, DType::bf16}, 25);
}

// A group wider than a 64-row tile (the gathered kernel gives each query two tiles).
TEST_P(AttentionForwardCuda, Gqa128WiderThanTile) {
  check_case({128, 1, 64, 128, 3, {70, 5}, {300, 5}, DType::bf16}, 23);
}

TEST_P(AttentionForwardCuda, Gqa3UnalignedRowsAndCallerMaxSeqlen) {
  Config cfg = attention_config(6, 2, 64, 64, 2);
  TestProblem p(cfg, {50, 7}, {190, 7}, DType::bf16, 16);
  std::mt19937_64 rng(99);
  std::vector<int32_t> topk = random_topk(cfg, p.lens, rng);
  expect_matches_oracle(p, &topk, run_cuda(p, &topk, /*max_seqlen_q=*/50));
}

// q as a slice of a wider packed buffer (outer strides larger than the shape).
TEST_P(AttentionForwardCuda, StridedQueryRows) {
  Config cfg = attention_config(16, 2, 128, 64, 2);
  TestProblem p(cfg, {70, 5}, {200, 80}, DType::bf16, 17);
  const int64_t tq = p.total_q(), H = cfg.num_q_heads, D = cfg.head_dim;
  HostTensor wide(DType::bf16, {tq, 2 * H, D});
  std::mt19937_64 rng(5);
  wide.fill_normal(rng);
  for (int64_t r = 0; r < tq; ++r)
    for (int64_t i = 0; i < H * D; ++i) p.q.set(r * H * D + i, wide.get(r * 2 * H * D + D + i));
  std::vector<int32_t> topk = random_topk(cfg, p.lens, rng);
  HostTensor topk_h(DType::i32, {cfg.num_kv_heads, tq, cfg.topk});
  for (size_t i = 0; i < topk.size(); ++i) topk_h.set(int64_t(i), topk[i]);
  HostTensor out(DType::bf16, {tq, H, D}), lse(DType::f32, {tq, H});
  out.poison();
  lse.poison();
  DeviceTensor dwide(wide), dk(p.k), dv(p.v), dout(out), dlse(lse), dtopk(topk_h), dcq(p.cu_q), dck(p.cu_k);
  TensorView qv = dwide.view();
  qv.shape[1] = H;
  qv.data = static_cast<char*>(qv.data) + D * 2;  // heads 1..H of 2H: offset by one head
  Varlen vl;
  vl.cu_seqlens_q = dcq.view();
  vl.cu_seqlens_k = dck.view();
  sparse_attention_forward(cfg, vl, qv, dk.view(), dv.view(), dtopk.view(), dout.view(), dlse.view());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  dout.download();
  dlse.download();
  expect_matches_oracle(p, &topk, Result{out, lse});
}

// Ids outside [0, local] (other than -1) are skipped: the result is that of the row without them.
TEST_P(AttentionForwardCuda, MalformedIdsAreSkipped) {
  Config cfg = attention_config(8, 2, 64, 64, 4);
  TestProblem p(cfg, {90}, {300}, DType::bf16, 18);
  std::mt19937_64 rng(3);
  std::vector<int32_t> clean = random_topk(cfg, p.lens, rng);
  std::vector<int32_t> bad = clean;
  const int32_t junk[] = {-7, 1 << 30, 5, -2147483647 - 1, 100000};
  for (size_t i = 0; i < bad.size(); ++i)
    if (bad[i] == rules::kUnusedSlot) bad[i] = junk[i % 5];
  // 5 is past every local block here (keys 320.. > position 299): skipped like the others.
  Result r = run_cuda(p, &bad);
  expect_matches_oracle(p, &clean, r);
}

TEST_P(AttentionForwardCuda, RejectsUnsupportedArguments) {
  Config cfg = attention_config(4, 1, 64, 64, 2);
  {
    TestProblem p(cfg, {10}, {10}, DType::f32, 19);
    try {
      run_cuda(p, nullptr);
      ADD_FAILURE() << "f32 accepted";
    } catch (const ArgumentError& e) {
      EXPECT_EQ(e.argument(), "q");
      EXPECT_NE(std::string(e.what()).find("bfloat16"), std::string::npos);
    }
  }
  cfg.head_dim = 32;
  {
    TestProblem p(cfg, {10}, {10}, DType::bf16, 20);
    try {
      run_cuda(p, nullptr);
      ADD_FAILURE() << "head_dim 32 accepted";
    } catch (const ArgumentError& e) {
      EXPECT_EQ(e.argument(), "head_dim");
    }
  }
  cfg.head_dim = 64;
  cfg.block_size = 16;
  {
    TestProblem p(cfg, {10}, {10}, DType::bf16, 21);
    try {
      run_cuda(p, nullptr);
      ADD_FAILURE() << "block_size 16 accepted";
    } catch (const ArgumentError& e) {
      EXPECT_EQ(e.argument(), "block_size");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, AttentionForwardCuda, ::testing::Values("gathered", "mma", "wgmma", "tma"),
                         [](const ::testing::TestParamInfo<const char*>& info) { return std::string(info.param); });

}  // namespace
}  // namespace msa
