// Owning host tensors for the tools and tests: storage in any dtype, seeded random fill, and a float64
// copy of exactly the values stored (after rounding to the dtype), which is what the oracle must see.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <vector>

#include "common/float_convert.h"
#include "msa/config.h"
#include "msa/tensor.h"

namespace msa {

class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
    numel_ = 1;
    for (int64_t s : shape_) numel_ *= s;
    storage_.assign(size_t(numel_) * dtype_size(dtype_) + 1, 0);
  }

  DType dtype() const { return dtype_; }
  int64_t numel() const { return numel_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  void* data() { return storage_.data(); }

  TensorView view(Device device = Device::cpu()) {
    TensorView t;
    t.data = storage_.data();
    t.dtype = dtype_;
    t.device = device;
    t.ndim = int(shape_.size());
    int64_t stride = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.shape[d] = shape_[d];
      t.stride[d] = stride;
      stride *= shape_[d];
    }
    return t;
  }

  double get(int64_t i) const {
    const uint8_t* p = storage_.data();
    switch (dtype_) {
      case DType::f32: { float v; std::memcpy(&v, p + 4 * i, 4); return v; }
      case DType::f64: { double v; std::memcpy(&v, p + 8 * i, 8); return v; }
      case DType::bf16: { uint16_t v; std::memcpy(&v, p + 2 * i, 2); return bf16_to_float(v); }
      case DType::f16: { uint16_t v; std::memcpy(&v, p + 2 * i, 2); return f16_to_float(v); }
      case DType::i32: { int32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
      case DType::fp8_e4m3: return fp8_e4m3_to_float(p[i]);
    }
    return 0;
  }

  void set(int64_t i, double x) {
    uint8_t* p = storage_.data();
    switch (dtype_) {
      case DType::f32: { float v = float(x); std::memcpy(p + 4 * i, &v, 4); break; }
      case DType::f64: { std::memcpy(p + 8 * i, &x, 8); break; }
      case DType::bf16: { uint16_t v = float_to_bf16(float(x)); std::memcpy(p + 2 * i, &v, 2); break; }
      case DType::f16: { uint16_t v = float_to_f16(float(x)); std::memcpy(p + 2 * i, &v, 2); break; }
      case DType::i32: { int32_t v = int32_t(x); std::memcpy(p + 4 * i, &v, 4); break; }
      case DType::fp8_e4m3: { p[i] = float_to_fp8_e4m3(float(x)); break; }
    }
  }

  std::vector<double> to_double() const {
    std::vector<double> out(static_cast<size_t>(numel_));
    for (int64_t i = 0; i < numel_; ++i) out[size_t(i)] = get(i);
    return out;
  }

  // Gaussian values with standard deviation `stddev`.
  void fill_normal(std::mt19937_64& rng, double stddev = 1.0) {
    std::normal_distribution<double> dist(0.0, stddev);
    for (int64_t i = 0; i < numel_; ++i) set(i, dist(rng));
  }

  // NaN everywhere: an output a kernel forgot to write then fails every comparison.
  void poison() {
    for (int64_t i = 0; i < numel_; ++i)
      set(i, dtype_ == DType::i32 ? -12345.0 : std::numeric_limits<double>::quiet_NaN());
  }

 private:
  DType dtype_ = DType::f32;
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  std::vector<uint8_t> storage_;
};

// ||got - ref|| / ||ref||; infinity when got holds a NaN or an infinity.
inline double relative_error(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Prefix sums of per-sequence lengths.
inline std::vector<int32_t> prefix_sums(const std::vector<int32_t>& lengths) {
  std::vector<int32_t> cu(lengths.size() + 1, 0);
  for (size_t b = 0; b < lengths.size(); ++b) cu[b + 1] = cu[b] + lengths[b];
  return cu;
}

}  // namespace msa
