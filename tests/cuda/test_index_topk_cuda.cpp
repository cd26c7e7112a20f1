// CUDA index branch vs the float64 oracle (src/reference), on fresh random data: the selected set per
// (group, query) up to near-ties, the local block in its slot, -1 padding, and the selected LSE.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "common/host_tensor.h"
#include "cuda/device_tensor.h"
#include "cuda/index_cuda_testing.h"
#include "msa/error.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "reference/oracle.h"

namespace msa {
namespace testing {
namespace {

TEST(IndexTopkCuda, RaggedPrefillChunkedDecodeBf16Hkv4) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(4, 128, 128, 16);
  tc.q_lengths = {1, 127, 128, 129, 700, 200, 3, 16};
  tc.k_lengths = {1, 127, 128, 129, 700, 2500, 3000, 2200};
  run_case(tc, 101);
}

TEST(IndexTopkCuda, F16Hkv1TemperatureWithHostBounds) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(1, 128, 128, 16);
  tc.dtype = DType::f16;
  tc.temperature = 0.7f;
  tc.give_bounds = true;
  tc.q_lengths = {129, 1, 300, 5};
  tc.k_lengths = {129, 1000, 2400, 2049};
  run_case(tc, 202);
}

TEST(IndexTopkCuda, Bf16Hkv8Di64NoLseCallerWorkspace) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(8, 64, 128, 16);
  tc.want_lse = false;
  tc.give_workspace = true;
  tc.q_lengths = {255, 2, 40};
  tc.k_lengths = {255, 2300, 2100};
  run_case(tc, 303);
}

TEST(IndexTopkCuda, OverTwoThousandBlocks) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(2, 128, 16, 16);
  tc.q_lengths = {8, 33};
  tc.k_lengths = {40000, 33};  // 2500 blocks of 16
  run_case(tc, 404);
}

TEST(IndexTopkCuda, SmallBlocksPaddedAndScalarHeadDims) {
  MSA_SKIP_WITHOUT_GPU();
  for (int di : {24, 20}) {  // 24: padded to the 16-wide MMA step; 20: scalar (non-16-byte) loads
    IndexCase tc;
    tc.cfg = index_config(3, di, 8, 4);
    tc.q_lengths = {7, 8, 9, 60, 4};
    tc.k_lengths = {7, 8, 9, 100, 90};
    SCOPED_TRACE("Di " + std::to_string(di));
    run_case(tc, 505 + di);
  }
}

TEST(IndexTopkCuda, BlocksWiderThanOneChunkAndLargeK) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase wide;  // B = 200: a block spans two key chunks; pooling and LSE must join them
  wide.cfg = index_config(4, 32, 200, 4);
  wide.temperature = 1.3f;
  wide.q_lengths = {1, 199, 201, 60};
  wide.k_lengths = {1, 199, 201, 1300};
  run_case(wide, 606);
  IndexCase many;  // k - 1 > 32: the round-by-round fallback selection
  many.cfg = index_config(2, 32, 8, 40);
  many.q_lengths = {300, 5};
  many.k_lengths = {300, 600};
  run_case(many, 607);
}

TEST(IndexTopkCuda, StridedRows) {
  MSA_SKIP_WITHOUT_GPU();
  IndexCase tc;
  tc.cfg = index_config(4, 128, 32, 16);
  tc.row_pad = 8;  // rows 16-byte aligned but not packed
  tc.q_lengths = {100, 1};
  tc.k_lengths = {700, 650};
  run_case(tc, 707);
  tc.row_pad = 3;  // misaligned rows: the scalar load path
  run_case(tc, 708);
}

TEST(IndexTopkCuda, Float32IsRejectedNamingQi) {
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
