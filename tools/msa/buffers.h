// Tensors of a run on the backend's device: a host copy always (inputs are made there, results are
// checked there) and, for the CUDA backend, a device mirror allocated with the CUDA runtime.
#pragma once

#include <memory>

#include "common/host_tensor.h"
#include "msa/tensor.h"

namespace msa {
namespace tool {

class Buffer {
 public:
  // Takes `host`; on a CUDA device allocates a mirror and uploads it.
  Buffer(HostTensor host, Device device);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  TensorView view();
  HostTensor& host() { return host_; }
  // Device -> host (no-op on the CPU).
  void download();
  // NaN (or -12345 for int32) everywhere, so that an element a kernel never writes fails the check.
  void poison();

 private:
  void upload();
  HostTensor host_;
  Device device_;
  void* device_data_ = nullptr;
};

using BufferPtr = std::unique_ptr<Buffer>;
inline BufferPtr make_buffer(DType dtype, std::vector<int64_t> shape, Device device) {
  return std::make_unique<Buffer>(HostTensor(dtype, std::move(shape)), device);
}

// Elements [begin, begin + count) of dimension `dim`: an outer-strided view, no copy.
TensorView slice(const TensorView& t, int dim, int64_t begin, int64_t count);

// Waits for the device (no-op on the CPU); used before reading clocks and results.
void synchronize(Device device);

// Name of the device for reports, e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)".
std::string describe_device(Device device, int threads);

}  // namespace tool
}  // namespace msa
