// The wgmma stage 1 of the CUDA index branch (the default; MSA_INDEX_KERNEL=wgmma pins it) vs the float64 oracle: the same
// checks as test_index_topk_cuda.cpp, on every kernel variant (bf16 / f16, head dims padded to 64 and
// 128, 64- and 128-key chunks, with and without the block LSE, vector and scalar loads).
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "cuda/index_cuda_testing.h"

namespace msa {
namespace testing {
namespace {

class IndexTopkWgmmaCuda : public ::testing::Test {
 protected:
  void SetUp() override { setenv("MSA_INDEX_KERNEL", "wgmma", 1); }
  void TearDown() override { unsetenv("MSA_INDEX_KERNEL"); }
};

TEST_F(IndexTopkWgmmaCuda, RaggedPrefillChunkedDecodeBf16Di128) {
  MSA_SKIP_WITHOUT_GPU();
  run_ragged_prefill_chunked_decode_case(1101);
}

TEST_F(IndexTopkWgmmaCuda, F16Di128Hkv1TemperatureWithHostBounds) {
  MSA_SKIP_WITHOUT_GPU();
  run_f16_hkv1_temperature_host_bounds_case(1202);
}

TEST_F(IndexTopkWgmmaCuda, Bf16Di64Hkv8NoLseCallerWorkspace) {
  MSA_SKIP_WITHOUT_GPU();
  run_bf16_hkv8_di64_no_lse_caller_workspace_case(1303);
}

TEST_F(IndexTopkWgmmaCuda, F16Di64Hkv16Blocks64) {  // 64-key chunks, 8 queries x 16 groups per CTA
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(16, 64, 64, 8);
  tc.dtype = DType::f16;
  tc.q_lengths = {63, 65, 1, 130};
  tc.k_lengths = {63, 65, 900, 700};
  run_case(tc, 1404);
}

TEST_F(IndexTopkWgmmaCuda, F16Di128Blocks32NoLse) {  // 128-wide dims with 64-key chunks
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(4, 128, 32, 16);
  tc.dtype = DType::f16;
  tc.want_lse = false;
  tc.q_lengths = {31, 33, 200};
  tc.k_lengths = {31, 600, 800};
  run_case(tc, 1505);
}

TEST_F(IndexTopkWgmmaCuda, OverTwoThousandBlocks) {
  MSA_SKIP_WITHOUT_GPU();
  run_over_two_thousand_blocks_case(1606);
}

TEST_F(IndexTopkWgmmaCuda, SmallBlocksPaddedAndScalarHeadDims) {
  MSA_SKIP_WITHOUT_GPU();
  run_small_blocks_padded_and_scalar_head_dims_case(1707);
}

TEST_F(IndexTopkWgmmaCuda, BlocksWiderThanOneChunkAndLargeK) {
  MSA_SKIP_WITHOUT_GPU();
  run_blocks_wider_than_one_chunk_and_large_k_case(1808);
}

TEST_F(IndexTopkWgmmaCuda, StridedRows) {
  MSA_SKIP_WITHOUT_GPU();
  run_strided_rows_case(1910);
}

TEST_F(IndexTopkWgmmaCuda, HeadDimsAbove128FallBackToHmma) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(2, 192, 64, 8);
  tc.q_lengths = {70, 3};
  tc.k_lengths = {300, 500};
  run_case(tc, 2012);
}

}  // namespace
}  // namespace testing
}  // namespace msa
