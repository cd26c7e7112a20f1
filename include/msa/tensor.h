// Non-owning tensor views: the one currency of the public API. The library never owns caller memory;
// a view says where the data is, how it is laid out and on which device it lives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace msa {

// fp8_e4m3: OCP E4M3 "fn" (no infinities, max 448, NaN 0x7f/0xff); only the paged KV caches accept
// it (msa/paged.h), every other entry point rejects it.
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, f64 = 4, fp8_e4m3 = 5 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

enum class DeviceType : int32_t { cpu = 0, cuda = 1 };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

std::string device_name(Device device);

// Shape and strides are in elements. The innermost dimension must be contiguous (stride 1) for every
// tensor the library reads or writes; outer strides are free, so q, k and v may be slices of one
// packed qkv buffer, as in FlashAttention.
struct TensorView {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t stride[kMaxDims] = {0, 0, 0, 0};
  Device device = Device::cpu();

  // A row-major contiguous view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = Device::cpu());

  bool defined() const { return data != nullptr; }
  int64_t size(int dim) const { return shape[dim]; }
  int64_t numel() const;
  bool is_contiguous() const;

  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

}  // namespace msa
