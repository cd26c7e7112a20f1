// Element types of the CPU backend and the dtype dispatch that instantiates a kernel for each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common/float_convert.h"
#include "msa/error.h"
#include "msa/tensor.h"

namespace msa {
namespace detail {
namespace cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16 x) { return bf16_to_float(x.bits); }
inline float to_float(f16 x) { return f16_to_float(x.bits); }

template <class T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16 from_float<bf16>(float x) { return bf16{float_to_bf16(x)}; }
template <>
inline f16 from_float<f16>(float x) { return f16{float_to_f16(x)}; }
template <class T>
inline T from_acc(double x) { return T(x); }  // f64 path keeps f64

// Accumulator type: f32, or f64 for f64 inputs (gradient checks).
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// sizeof(acc_t<T>) for the element type of `dtype`.
inline std::size_t acc_bytes_of(DType dtype) {
  return dtype == DType::f64 ? sizeof(double) : sizeof(float);
}

template <class T, class A>
inline T store_as(A x) {
  if constexpr (std::is_same_v<T, double>)
    return x;
  else
    return from_float<T>(float(x));
}

// Pointer to element (i, j, 0) of a 3-d view, or (i, 0) of a 2-d one.
template <class T>
inline T* row3(const TensorView& t, int64_t i, int64_t j) {
  return static_cast<T*>(t.data) + i * t.stride[0] + j * t.stride[1];
}
template <class T>
inline T* row2(const TensorView& t, int64_t i) {
  return static_cast<T*>(t.data) + i * t.stride[0];
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa

// Runs BODY with `scalar_t` bound to the C++ element type of DTYPE.
#define MSA_CPU_DISPATCH_FLOAT(DTYPE, ...)                                         \
  [&] {                                                                            \
    switch (DTYPE) {                                                               \
      case ::msa::DType::f32: { using scalar_t = float; return __VA_ARGS__(); }    \
      case ::msa::DType::f64: { using scalar_t = double; return __VA_ARGS__(); }   \
      case ::msa::DType::bf16: {                                                   \
        using scalar_t = ::msa::detail::cpu::bf16; return __VA_ARGS__(); }         \
      case ::msa::DType::f16: {                                                    \
        using scalar_t = ::msa::detail::cpu::f16; return __VA_ARGS__(); }          \
      default: throw ::msa::Error("msa: unsupported dtype on the CPU");            \
    }                                                                              \
  }()
