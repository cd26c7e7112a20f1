// The wgmma stage 1 of the CUDA index branch (MSA_INDEX_KERNEL=wgmma) vs the float64 oracle: the same
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
  IndexCase tc;
  tc.cfg = index_config(4, 128, 128, 16);
  tc.q_lengths = {1, 127, 128, 129, 700, 200, 3, 16};
  tc.k_lengths = {1, 127, 128, 129, 700, 2500, 3000, 2200};
  run_case(tc, 1101);
}

TEST_F(IndexTopkWgmmaCuda, F16Di128Hkv1TemperatureWithHostBounds) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(1, 128, 128, 16);
  tc.dtype = DType::f16;
  tc.temperature = 0.7f;
  tc.give_bounds = true;
  tc.q_lengths = {129, 1, 300, 5};
  tc.k_lengths = {129, 1000, 2400, 2049};
  run_case(tc, 1202);
}

TEST_F(IndexTopkWgmmaCuda, Bf16Di64Hkv8NoLseCallerWorkspace) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(8, 64, 128, 16);
  tc.want_lse = false;
  tc.give_workspace = true;
  tc.q_lengths = {255, 2, 40};
  tc.k_lengths = {255, 2300, 2100};
  run_case(tc, 1303);
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
  IndexCase tc;
  tc.cfg = index_config(2, 128, 16, 16);
  tc.q_lengths = {8, 33};
  tc.k_lengths = {40000, 33};  // 2500 blocks of 16
  run_case(tc, 1606);
}

TEST_F(IndexTopkWgmmaCuda, SmallBlocksPaddedAndScalarHeadDims) {
  MSA_SKIP_WITHOUT_GPU();
  for (int di : {24, 20}) {  // 24: zero-padded to 64; 20: scalar (non-16-byte) loads
    IndexCase tc;
    tc.cfg = index_config(3, di, 8, 4);
    tc.q_lengths = {7, 8, 9, 60, 4};
    tc.k_lengths = {7, 8, 9, 100, 90};
    SCOPED_TRACE("Di " + std::to_string(di));
    run_case(tc, 1707 + di);
  }
}

TEST_F(IndexTopkWgmmaCuda, BlocksWiderThanOneChunkAndLargeK) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase wide;  // B = 200: a block spans two key chunks; pooling and LSE must join them
  wide.cfg = index_config(4, 32, 200, 4);
  wide.temperature = 1.3f;
  wide.q_lengths = {1, 199, 201, 60};
  wide.k_lengths = {1, 199, 201, 1300};
  run_case(wide, 1808);
  IndexCase many;
  many.cfg = index_config(2, 32, 8, 40);
  many.q_lengths = {300, 5};
  many.k_lengths = {300, 600};
  run_case(many, 1809);
}

TEST_F(IndexTopkWgmmaCuda, StridedRows) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(4, 128, 32, 16);
  tc.row_pad = 8;  // rows 16-byte aligned but not packed
  tc.q_lengths = {100, 1};
  tc.k_lengths = {700, 650};
  run_case(tc, 1910);
  tc.row_pad = 3;  // misaligned rows: the scalar load path
  run_case(tc, 1911);
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
