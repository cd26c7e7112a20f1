// Which sequence of a varlen batch a packed query row belongs to, on the device.
#pragma once

#include <cstdint>

namespace msa {
namespace detail {
namespace cuda {

// Sequence of packed query row `row` (cu_q ascending; empty sequences skipped).
__device__ __forceinline__ int sequence_of_row(const int32_t* cu_q, int batch, int64_t row) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_q[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
