// The one alignment rule of the CUDA kernels' vector accesses (16-byte cp.async rows, element-pair
// stores): the data pointer and every outer stride, in bytes, are multiples of the access size.
// Dimensions of extent 1 do not count: their stride is only ever multiplied by 0, and exporters set
// it freely (torch's DLPack export gave every extent-1 dimension stride 1, so q [1, Hq, D] of a
// batch-1 single-token decode arrives with strides (1, D, 1)). Plain C++: host tests include it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "msa/tensor.h"

namespace msa {
namespace detail {
namespace cuda {

inline bool rows_aligned(const TensorView& t, std::size_t bytes) {
  if (!t.defined()) return true;
  if (reinterpret_cast<std::uintptr_t>(t.data) % bytes != 0) return false;
  for (int d = 0; d + 1 < t.ndim; ++d)
    if (t.shape[d] > 1 && (t.stride[d] * int64_t(dtype_size(t.dtype))) % int64_t(bytes) != 0) return false;
  return true;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
