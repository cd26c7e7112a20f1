// The CUDA kernels' alignment rule for vector accesses (cuda/rows_aligned.h: paged run and append,
// the attention, index and KL kernels): pointer and outer byte strides must be multiples of the
// access; dimensions of extent 1 do not count (torch's DLPack export gives them stride 1, e.g. q of a
// batch-1 single-token decode).
// Host only: runs without a GPU.
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/rows_aligned.h"

namespace msa {
namespace {

using detail::cuda::rows_aligned;

alignas(64) unsigned char storage[1 << 16];

TensorView view(int64_t offset_bytes, DType dtype, std::initializer_list<int64_t> shape,
                std::initializer_list<int64_t> stride) {
  TensorView t;
  t.data = storage + offset_bytes;
  t.dtype = dtype;
  t.ndim = int(shape.size());
  int d = 0;
  for (int64_t s : shape) t.shape[d++] = s;
  d = 0;
  for (int64_t s : stride) t.stride[d++] = s;
  return t;
}

TEST(RowsAligned, ExtentOneDimensionsDoNotCount) {
  // q [1, 8, 128] bf16 as torch exports it: stride 1 on the batch-1 dimension.
  EXPECT_TRUE(rows_aligned(view(0, DType::bf16, {1, 8, 128}, {1, 128, 1}), 16));
  // The same stride on a dimension of extent 2 is a real misalignment.
  EXPECT_FALSE(rows_aligned(view(0, DType::bf16, {2, 8, 128}, {1, 128, 1}), 16));
  // Hkv = 1: the head dimension's stride is free.
  EXPECT_TRUE(rows_aligned(view(0, DType::bf16, {4, 128, 1, 64}, {128 * 64, 64, 3, 1}), 16));
}

TEST(RowsAligned, PointerAndStridesInBytes) {
  EXPECT_TRUE(rows_aligned(view(16, DType::bf16, {4, 128, 2, 64}, {128 * 2 * 64, 2 * 64, 64, 1}), 16));
  EXPECT_FALSE(rows_aligned(view(8, DType::bf16, {4, 128, 2, 64}, {128 * 2 * 64, 2 * 64, 64, 1}), 16));
  // Head-major FP8 pages (dims 1 and 2 swapped in the strides), D = 64: 16-byte aligned.
  EXPECT_TRUE(rows_aligned(view(0, DType::fp8_e4m3, {4, 128, 2, 64}, {2 * 128 * 64, 64, 128 * 64, 1}), 16));
  // FP8 rows 8 bytes apart pass an 8-byte access but not the 16-byte copies of K / V pages.
  const TensorView rows8 = view(0, DType::fp8_e4m3, {4, 16, 8}, {16 * 8, 8, 1});
  EXPECT_TRUE(rows_aligned(rows8, 8));
  EXPECT_FALSE(rows_aligned(rows8, 16));
  EXPECT_FALSE(rows_aligned(view(8, DType::fp8_e4m3, {4, 128, 2, 64}, {128 * 2 * 64, 2 * 64, 64, 1}), 16));
  // f32: 8 elements are 32 bytes.
  EXPECT_FALSE(rows_aligned(view(0, DType::f32, {3, 4, 12}, {48, 12, 1}), 32));
  EXPECT_TRUE(rows_aligned(view(0, DType::f32, {3, 4, 16}, {64, 16, 1}), 32));
  // Element pairs of a 16-bit output (4 bytes): odd element strides fail.
  EXPECT_TRUE(rows_aligned(view(4, DType::bf16, {3, 2, 64}, {128, 64, 1}), 4));
  EXPECT_FALSE(rows_aligned(view(4, DType::bf16, {3, 2, 63}, {126, 63, 1}), 4));
  EXPECT_TRUE(rows_aligned(TensorView{}, 16));  // undefined: nothing to load
}

}  // namespace
}  // namespace msa
