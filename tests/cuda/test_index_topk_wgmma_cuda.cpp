// The wgmma stage 1 of the CUDA index branch vs the float64 oracle: the same checks as
// test_index_topk_cuda.cpp, on every kernel variant (bf16 / f16, head dims padded to 64 and 128, 64-
// and 128-key chunks, with and without the block LSE, vector and scalar loads), for the three wgmma
// kernels: MSA_INDEX_KERNEL=wgmma (the first one, which waits for each chunk's product), wgmma_pipe
// (the pipelined one) and ws (the warp-specialised TMA kernel with 256-row CTAs, the default);
// scalar-load cases fall back to the first.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "cuda/index_cuda_testing.h"
#include "kernel_env.h"

namespace msa {
namespace testing {
namespace {

class IndexTopkWgmmaCuda : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { kernel_.emplace("MSA_INDEX_KERNEL", GetParam()); }

 private:
  std::optional<ScopedKernelEnv> kernel_;
};

TEST_P(IndexTopkWgmmaCuda, RaggedPrefillChunkedDecodeBf16Di128) {
  MSA_SKIP_WITHOUT_GPU();
  run_ragged_prefill_chunked_decode_case(1101);
}

TEST_P(IndexTopkWgmmaCuda, F16Di128Hkv1TemperatureWithHostBounds) {
  MSA_SKIP_WITHOUT_GPU();
  run_f16_hkv1_temperature_host_bounds_case(1202);
}

TEST_P(IndexTopkWgmmaCuda, Bf16Di64Hkv8NoLseCallerWorkspace) {
  MSA_SKIP_WITHOUT_GPU();
  run_bf16_hkv8_di64_no_lse_caller_workspace_case(1303);
}

TEST_P(IndexTopkWgmmaCuda, F16Di64Hkv16Blocks64) {  // 64-key chunks, 8 queries x 16 groups per CTA
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(16, 64, 64, 8);
  tc.dtype = DType::f16;
  tc.q_lengths = {63, 65, 1, 130};
  tc.k_lengths = {63, 65, 900, 700};
  run_case(tc, 1404);
}

TEST_P(IndexTopkWgmmaCuda, F16Di128Blocks32NoLse) {  // 128-wide dims with 64-key chunks
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(4, 128, 32, 16);
  tc.dtype = DType::f16;
  tc.want_lse = false;
  tc.q_lengths = {31, 33, 200};
  tc.k_lengths = {31, 600, 800};
  run_case(tc, 1505);
}

TEST_P(IndexTopkWgmmaCuda, OverTwoThousandBlocks) {
  MSA_SKIP_WITHOUT_GPU();
  run_over_two_thousand_blocks_case(1606);
}

TEST_P(IndexTopkWgmmaCuda, SmallBlocksPaddedAndScalarHeadDims) {
  MSA_SKIP_WITHOUT_GPU();
  run_small_blocks_padded_and_scalar_head_dims_case(1707);
}

TEST_P(IndexTopkWgmmaCuda, BlocksWiderThanOneChunkAndLargeK) {
  MSA_SKIP_WITHOUT_GPU();
  run_blocks_wider_than_one_chunk_and_large_k_case(1808);
}

TEST_P(IndexTopkWgmmaCuda, StridedRows) {
  MSA_SKIP_WITHOUT_GPU();
  run_strided_rows_case(1910);
}

// 128-key blocks over 1 to 6 chunks per CTA and long prefills: the pipelined kernel's prologue, the
// two accumulators' alternation (odd and even chunk counts) and the refill of its four buffers.
TEST_P(IndexTopkWgmmaCuda, Blocks128PipelineDepthsAndChunkedPrefill) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(4, 128, 128, 3);
  tc.q_lengths = {1, 128, 129, 300, 520, 700, 64};
  tc.k_lengths = {1, 128, 129, 300, 520, 700, 1000};
  run_case(tc, 2113);
}

// Group counts that do not divide a CTA's rows (85 queries x 3 groups of 256 rows, 42 x 3 of 128)
// and more groups than a 128-row CTA holds at once, with ragged lengths across tile edges.
TEST_P(IndexTopkWgmmaCuda, GroupCountsThatDoNotDivideTheTile) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(3, 128, 128, 4);
  tc.q_lengths = {85, 86, 170, 255, 2};
  tc.k_lengths = {85, 400, 170, 900, 2};
  run_case(tc, 2214);
  IndexCase wide;
  wide.cfg = index_config(32, 64, 64, 4);
  wide.q_lengths = {9, 17, 1};
  wide.k_lengths = {300, 17, 64};
  run_case(wide, 2315);
}

TEST_P(IndexTopkWgmmaCuda, HeadDimsAbove128FallBackToHmma) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(2, 192, 64, 8);
  tc.q_lengths = {70, 3};
  tc.k_lengths = {300, 500};
  run_case(tc, 2012);
}

INSTANTIATE_TEST_SUITE_P(Kernels, IndexTopkWgmmaCuda, ::testing::Values("wgmma", "wgmma_pipe", "ws"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           return std::string(info.param);
                         });

}  // namespace
}  // namespace testing
}  // namespace msa
