// The wgmma CUDA attention forward (compiled in with MSA_EXPERIMENTAL_WGMMA_ATTENTION; selected here
// explicitly with MSA_ATTENTION_KERNEL=wgmma, on sm_90 only) against the float64 oracle: the cases of the
// mma.sync kernel's tests, plus several 64-row tiles per sequence at GQA 1 and 2 and 192-key blocks
// (three 64-key chunks each), so the 3-slot K/V rings wrap many times (dense runs walk every block). On a mismatch each check prints the relative error, the first
// element out of tolerance as (token, head, d) with got / expected, and how many are out, so a device
// log localises the fault (bench/attention_wgmma_probe.cu then checks the two products alone).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/attention_cuda_testing.h"
#include "cuda/kernel_env.h"
#include "cuda/device_tensor.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::attention_config;
using testing::Case;
using testing::random_topk;
using testing::Result;
using testing::run_cuda;
using testing::ScopedKernelEnv;
using testing::TestProblem;

// Where `got` first leaves `ref` by more than 1e-2 of ref's largest magnitude (or is not finite),
// as a readable index into a [tokens, heads, inner] tensor (inner = 1 for lse).
std::string first_mismatch(const std::vector<double>& got, const std::vector<double>& ref, int64_t heads,
                           int64_t inner) {
  double scale = 0;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::fabs(r));
  const double tol = 1e-2 * (scale > 0 ? scale : 1.0);
  int64_t bad = 0, first = -1;
  double max_err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(got[i] - ref[i]);
    const bool ok = std::isfinite(got[i]) ? err <= tol : got[i] == ref[i];
    if (std::isfinite(err)) max_err = std::max(max_err, err);
    if (!ok && bad++ == 0) first = int64_t(i);
  }
  std::ostringstream s;
  s << bad << " of " << ref.size() << " elements off by more than " << tol << " (max abs err " << max_err << ")";
  if (first >= 0) {
    const int64_t token = first / (heads * inner), head = first / inner % heads, d = first % inner;
    s << "; first at token " << token << " head " << head;
    if (inner > 1) s << " d " << d;
    s << ": got " << got[first] << " expected " << ref[first];
  }
  return s.str();
}

void expect_matches_oracle_diagnosed(TestProblem& p, const std::vector<int32_t>* topk, const Result& r) {
  std::vector<double> out_ref, lse_ref;
  reference::attention_forward(p.cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                               topk ? topk->data() : nullptr, out_ref, lse_ref);
  const std::vector<double> out = r.out.to_double(), lse = r.lse.to_double();
  const int64_t hq = p.cfg.num_q_heads;
  const char* what = topk ? "sparse" : "dense";
  EXPECT_LT(relative_error(out, out_ref), 1e-2)
      << what << " out: " << first_mismatch(out, out_ref, hq, p.cfg.head_dim);
  EXPECT_LT(relative_error(lse, lse_ref), 1e-2) << what << " lse: " << first_mismatch(lse, lse_ref, hq, 1);
}

void check_case_diagnosed(const Case& c, uint64_t seed) {
  const Config cfg = attention_config(c.hq, c.hkv, c.d, c.block, c.k);
  TestProblem p(cfg, c.lq, c.lk, c.dtype, seed);
  std::mt19937_64 rng(seed * 7 + 1);
  std::vector<int32_t> topk = random_topk(cfg, p.lens, rng);
  expect_matches_oracle_diagnosed(p, &topk, run_cuda(p, &topk));
  expect_matches_oracle_diagnosed(p, nullptr, run_cuda(p, nullptr));
}

class AttentionForwardWgmmaCuda : public ::testing::Test {
 protected:
  void SetUp() override {
#if !defined(MSA_EXPERIMENTAL_WGMMA_ATTENTION)
    GTEST_SKIP() << "the wgmma forward is compiled in only with -DMSA_EXPERIMENTAL_WGMMA_ATTENTION=ON";
#endif
    MSA_SKIP_WITHOUT_GPU();
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (major != 9 || minor != 0) GTEST_SKIP() << "the wgmma forward runs on sm_90 only";
    kernel_.emplace("MSA_ATTENTION_KERNEL", "wgmma");
  }

 private:
  std::optional<ScopedKernelEnv> kernel_;
};

TEST_F(AttentionForwardWgmmaCuda, RaggedBlockEdgesGqa16) {
  check_case_diagnosed({64, 4, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 11);
}

TEST_F(AttentionForwardWgmmaCuda, ChunkedPrefillAndDecodeGqa16Block128) {
  check_case_diagnosed({16, 1, 128, 128, 4, {1, 16, 7, 130, 129}, {700, 529, 128, 300, 129}, DType::bf16}, 12);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa4HeadDim64) {
  check_case_diagnosed({32, 8, 64, 64, 4, {127, 3, 200}, {127, 400, 333}, DType::bf16}, 13);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa8Float16) {
  check_case_diagnosed({8, 1, 128, 64, 5, {130, 9, 64}, {450, 260, 64}, DType::f16}, 14);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa1ShortSequencesBelowK) {
  check_case_diagnosed({4, 4, 64, 64, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 15);
}

// GQA 1: 64 queries per tile (the whole 64-bit query mask of a block), several tiles per sequence.
TEST_F(AttentionForwardWgmmaCuda, Gqa1TwoMaskWordsHeadDim128) {
  check_case_diagnosed({2, 2, 128, 64, 3, {300, 129}, {700, 200}, DType::bf16}, 21);
}

// GQA 2 with three 64-key chunks per block and several 64-row tiles per sequence.
TEST_F(AttentionForwardWgmmaCuda, Gqa2Block192Float16) {
  check_case_diagnosed({4, 2, 128, 192, 3, {200, 65}, {900, 65}, DType::f16}, 22);
}

TEST_F(AttentionForwardWgmmaCuda, Gqa3UnalignedRowsAndCallerMaxSeqlen) {
  Config cfg = attention_config(6, 2, 64, 64, 2);
  TestProblem p(cfg, {50, 7}, {190, 7}, DType::bf16, 16);
  std::mt19937_64 rng(99);
  std::vector<int32_t> topk = random_topk(cfg, p.lens, rng);
  expect_matches_oracle_diagnosed(p, &topk, run_cuda(p, &topk, /*max_seqlen_q=*/50));
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
  expect_matches_oracle_diagnosed(p, &clean, run_cuda(p, &bad));
}

}  // namespace
}  // namespace msa
