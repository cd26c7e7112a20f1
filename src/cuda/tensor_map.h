// TMA tensor maps (CUtensorMap) of the library's packed [rows, heads, dim] 16-bit tensors, encoded
// through the driver entry point that the runtime hands out, so the library links no libcuda.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "msa/tensor.h"

namespace msa {
namespace detail {
namespace cuda {

// The type of cuda.h's declaration (cudaTypedefs.h cannot be used here: CUTLASS includes it inside
// its own namespace, and its include guard then hides it from everyone else).
using TensorMapEncodeTiled = decltype(&cuTensorMapEncodeTiled);

inline TensorMapEncodeTiled tensor_map_encoder() {
  static const TensorMapEncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<TensorMapEncodeTiled>(f);
  }();
  return fn;
}

// A 3-D map of the bf16/f16 tensor `t` [rows, heads, dim] (innermost contiguous) whose box is
// `box_elems` elements of dim x `box_heads` heads x `box_rows` rows, written to shared memory with
// the 128-byte swizzle (rows of the box in (row, head) order); rows past the tensor read as zeros. False when the driver refuses the layout
// (strides that are not multiples of 16 bytes, too many rows, no entry point): the caller then
// takes a kernel that needs no map.
inline bool encode_rows_map(CUtensorMap* map, const TensorView& t, int box_elems, int box_heads, int box_rows) {
  const TensorMapEncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr || (t.dtype != DType::bf16 && t.dtype != DType::f16)) return false;
  const int64_t rows = t.shape[0], heads = t.shape[1], dim = t.shape[2];
  const int64_t bytes = 2;
  // A single head's stride is never stepped over; give it a legal value.
  const int64_t head_stride = heads == 1 ? std::max<int64_t>(t.stride[1], dim) : t.stride[1];
  const cuuint64_t global_dim[3] = {cuuint64_t(dim), cuuint64_t(heads), cuuint64_t(rows)};
  const cuuint64_t global_strides[2] = {cuuint64_t(head_stride * bytes), cuuint64_t(t.stride[0] * bytes)};
  const cuuint32_t box[3] = {cuuint32_t(box_elems), cuuint32_t(box_heads), cuuint32_t(box_rows)};
  const cuuint32_t element_strides[3] = {1u, 1u, 1u};
  const CUtensorMapDataType type =
      t.dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 3, t.data, global_dim, global_strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
