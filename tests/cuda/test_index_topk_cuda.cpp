// CUDA index branch vs the float64 oracle (src/reference), on fresh random data: the selected set per
// (group, query) up to near-ties, the local block in its slot, -1 padding, and the selected LSE.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "common/host_tensor.h"
#include "cuda/device_tensor.h"
#include "cuda/index_cuda_testing.h"
#include "kernel_env.h"
#include "msa/error.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "reference/oracle.h"

namespace msa {
namespace testing {
namespace {

// These cases pin the mma.sync stage 1 (the wgmma one, the default, has its own test file).
class IndexTopkCuda : public ::testing::Test {
 protected:
  void SetUp() override { kernel_.emplace("MSA_INDEX_KERNEL", "mma"); }

 private:
  std::optional<ScopedKernelEnv> kernel_;
};

TEST_F(IndexTopkCuda, RaggedPrefillChunkedDecodeBf16Hkv4) {
  MSA_SKIP_WITHOUT_GPU();
  run_ragged_prefill_chunked_decode_case(101);
}

TEST_F(IndexTopkCuda, F16Hkv1TemperatureWithHostBounds) {
  MSA_SKIP_WITHOUT_GPU();
  run_f16_hkv1_temperature_host_bounds_case(202);
}

TEST_F(IndexTopkCuda, Bf16Hkv8Di64NoLseCallerWorkspace) {
  MSA_SKIP_WITHOUT_GPU();
  run_bf16_hkv8_di64_no_lse_caller_workspace_case(303);
}

TEST_F(IndexTopkCuda, OverTwoThousandBlocks) {
  MSA_SKIP_WITHOUT_GPU();
  run_over_two_thousand_blocks_case(404);
}

TEST_F(IndexTopkCuda, SmallBlocksPaddedAndScalarHeadDims) {
  MSA_SKIP_WITHOUT_GPU();
  run_small_blocks_padded_and_scalar_head_dims_case(505);
}

TEST_F(IndexTopkCuda, BlocksWiderThanOneChunkAndLargeK) {
  MSA_SKIP_WITHOUT_GPU();
  run_blocks_wider_than_one_chunk_and_large_k_case(606);
}

TEST_F(IndexTopkCuda, StridedRows) {
  MSA_SKIP_WITHOUT_GPU();
  run_strided_rows_case(707);
}

TEST_F(IndexTopkCuda, Float32IsRejectedNamingQi) {
  MSA_SKIP_WITHOUT_GPU();
  Config cfg = index_config(1, 16, 8, 2);
  HostTensor qi(DType::f32, {4, 1, 16}), ki(DType::f32, {4, 16}), topk(DType::i32, {1, 4, 2});
  HostTensor cu(DType::i32, {2});
  cu.set(0, 0);
  cu.set(1, 4);
  DeviceTensor d_qi(qi), d_ki(ki), d_topk(topk), d_cu(cu);
  Varlen varlen;
  varlen.cu_seqlens_q = d_cu.view();
  varlen.cu_seqlens_k = d_cu.view();
  try {
    index_topk(cfg, varlen, d_qi.view(), d_ki.view(), d_topk.view(), TensorView{});
    FAIL() << "float32 was accepted";
  } catch (const ArgumentError& e) {
    EXPECT_EQ(e.argument(), "qi");
  }
}

}  // namespace
}  // namespace testing
}  // namespace msa
