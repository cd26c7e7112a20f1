// A HostTensor mirrored on the GPU, for the device tests (they compare the CUDA backend with the CPU
// backend on the same inputs).
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "common/host_tensor.h"
#include "msa/ops.h"

namespace msa {
namespace testing {

#define MSA_TEST_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

class DeviceTensor {
 public:
  // Allocated on the current device, which its views name.
  explicit DeviceTensor(HostTensor& host) : host_(&host) {
    if (cudaGetDevice(&device_) != cudaSuccess) throw std::runtime_error("cudaGetDevice");
    bytes_ = size_t(host.numel()) * dtype_size(host.dtype());
    if (cudaMalloc(&ptr_, bytes_ ? bytes_ : 1) != cudaSuccess) throw std::runtime_error("cudaMalloc");
    upload();
  }
  ~DeviceTensor() { cudaFree(ptr_); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  void upload() {
    if (cudaMemcpy(ptr_, host_->data(), bytes_, cudaMemcpyHostToDevice) != cudaSuccess)
      throw std::runtime_error("cudaMemcpy H2D");
  }
  // Copies the device contents back into the host tensor it mirrors.
  void download() {
    if (cudaMemcpy(host_->data(), ptr_, bytes_, cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error("cudaMemcpy D2H");
  }
  TensorView view() const {
    TensorView t = host_->view(Device::cuda(device_));
    t.data = ptr_;
    return t;
  }

 private:
  HostTensor* host_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  int device_ = 0;
};

#define MSA_SKIP_WITHOUT_GPU() \
  if (!::msa::cuda_available()) GTEST_SKIP() << "no CUDA device"

}  // namespace testing
}  // namespace msa
