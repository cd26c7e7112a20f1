// The experimental wgmma CUDA attention forward (MSA_EXPERIMENTAL_WGMMA_ATTENTION, then
// MSA_ATTENTION_KERNEL=wgmma) against the float64 oracle: the
// cases of the mma.sync kernel's tests, plus tiles that fill both warpgroups and a second word of the
// per-block query mask (GQA 1 with more than 64 queries per 128-row tile).
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention_cuda_testing.h"
#include "cuda/device_tensor.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::attention_config;
using testing::Case;
using testing::check_case;
using testing::expect_matches_oracle;
using testing::random_topk;
using testing::run_cuda;
using testing::TestProblem;

constexpr const char* kKernelVar = "MSA_ATTENTION_KERNEL";

class AttentionForwardWgmmaCuda : public ::testing::Test {
 protected:
  void SetUp() override {
#if !defined(MSA_EXPERIMENTAL_WGMMA_ATTENTION)
    GTEST_SKIP() << "the wgmma forward is experimental (wrong on an H100); build with "
                    "-DMSA_EXPERIMENTAL_WGMMA_ATTENTION=ON to test it";
#endif
    MSA_SKIP_WITHOUT_GPU();
    const char* prev = std::getenv(kKernelVar);
    had_prev_ = prev != nullptr;
    if (had_prev_) prev_ = prev;
    setenv(kKernelVar, "wgmma", 1);
  }
  void TearDown() override {
    if (had_prev_)
      setenv(kKernelVar, prev_.c_str(), 1);
    else
      unsetenv(kKernelVar);
  }

 private:
  bool had_prev_ = false;
  std::string prev_;
};

TEST_F(AttentionForwardWgmmaCuda, RaggedBlockEdgesGqa16) {
  check_case({64, 4, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 11);
}

TEST_F(AttentionForwardWgmmaCuda, ChunkedPrefillAndDecodeGqa16Block128) {
  check_case({16, 1, 128, 128, 4, {1, 16, 7, 130, 129}, {700, 529, 128, 300, 129}, DType::bf16}, 12);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa4HeadDim64) {
  check_case({32, 8, 64, 64, 4, {127, 3, 200}, {127, 400, 333}, DType::bf16}, 13);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa8Float16) {
  check_case({8, 1, 128, 64, 5, {130, 9, 64}, {450, 260, 64}, DType::f16}, 14);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa1ShortSequencesBelowK) {
  check_case({4, 4, 64, 64, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 15);
}

// GQA 1: a 128-row tile holds 128 queries, so the query mask of a block spans two 64-bit words.
TEST_F(AttentionForwardWgmmaCuda, Gqa1TwoMaskWordsHeadDim128) {
  check_case({2, 2, 128, 64, 3, {300, 129}, {700, 200}, DType::bf16}, 21);
}

// GQA 2 with three 64-key sub-tiles per block and several 128-row tiles per sequence.
TEST_F(AttentionForwardWgmmaCuda, Gqa2Block192Float16) {
  check_case({4, 2, 128, 192, 3, {200, 65}, {900, 65}, DType::f16}, 22);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa3UnalignedRowsAndCallerMaxSeqlen) {
  Config cfg = attention_config(6, 2, 64, 64, 2);
  TestProblem p(cfg, {50, 7}, {190, 7}, DType::bf16, 16);
  std::mt19937_64 rng(99);
  std::vector<int32_t> topk = random_topk(cfg, p.lens, rng);
  expect_matches_oracle(p, &topk, run_cuda(p, &topk, /*max_seqlen_q=*/50));
}

// Ids outside [0, local] (other than -1) are skipped: the result is that of the row without them.
TEST_F(AttentionForwardWgmmaCuda, MalformedIdsAreSkipped) {
  Config cfg = attention_config(8, 2, 64, 64, 4);
  TestProblem p(cfg, {90}, {300}, DType::bf16, 18);
  std::mt19937_64 rng(3);
  std::vector<int32_t> clean = random_topk(cfg, p.lens, rng);
  std::vector<int32_t> bad = clean;
  const int32_t junk[] = {-7, 1 << 30, 5, -2147483647 - 1, 100000};
  for (size_t i = 0; i < bad.size(); ++i)
    if (bad[i] == rules::kUnusedSlot) bad[i] = junk[i % 5];
  expect_matches_oracle(p, &clean, run_cuda(p, &bad));
}

}  // namespace
}  // namespace msa
