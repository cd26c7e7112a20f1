// FP8 E4M3 pages of the paged cache (docs/serving.md "FP8 caches"): value = byte x scale, one f32 scale
// per (page, kv head) for K and V, per page for ki. Pages are dequantised to f32 rows where the 16-bit
// paths convert theirs; new tokens are quantised with the page's scale by paged_append_kv.
#pragma once

#include <array>
#include <cstdint>

#include "common/float_convert.h"
#include "cpu/element.h"
#include "msa/tensor.h"

namespace msa {
namespace detail {
namespace cpu {
namespace paged {

inline bool is_fp8(const TensorView& cache) { return cache.dtype == DType::fp8_e4m3; }

// Scale of (page, head) from k_scale / v_scale [num_pages, Hkv], or of page from ki_scale [num_pages].
inline float page_scale(const TensorView& scale, int64_t page, int64_t head = 0) {
  const float* s = scale.ptr<const float>() + page * scale.stride[0];
  return scale.ndim == 2 ? s[head * scale.stride[1]] : s[0];
}

// All 256 codes decoded once: a table lookup per element instead of the bit arithmetic.
inline const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[size_t(b)] = fp8_e4m3_to_float(uint8_t(b));
    return t;
  }();
  return table;
}

// n bytes -> f32 x scale, zero padding up to dp.
inline void dequantise_row(const uint8_t* src, int n, float scale, float* dst, int dp) {
  const float* t = fp8_table().data();
  for (int i = 0; i < n; ++i) dst[i] = t[src[i]] * scale;
  for (int i = n; i < dp; ++i) dst[i] = 0.f;
}

// n elements of the query dtype -> bytes of x / scale (round to nearest even, saturating at +-448).
template <class T>
inline void quantise_row(const T* src, int n, float scale, uint8_t* dst) {
  for (int i = 0; i < n; ++i) dst[i] = float_to_fp8_e4m3(to_float(src[i]) / scale);
}

}  // namespace paged
}  // namespace cpu
}  // namespace detail
}  // namespace msa
