#include "buffers.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "msa/info.h"

#if defined(MSA_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace msa {
namespace tool {

namespace {

#if defined(MSA_WITH_CUDA)
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}
#endif

std::size_t bytes_of(const HostTensor& t) { return std::size_t(t.numel()) * dtype_size(t.dtype()); }

}  // namespace

Buffer::Buffer(HostTensor host, Device device) : host_(std::move(host)), device_(device) {
  if (device_.type == DeviceType::cuda) {
#if defined(MSA_WITH_CUDA)
    cuda_check(cudaMalloc(&device_data_, bytes_of(host_) + 1), "cudaMalloc");
    upload();
#else
    throw std::runtime_error("this build has no CUDA backend");
#endif
  }
}

Buffer::~Buffer() {
#if defined(MSA_WITH_CUDA)
  if (device_data_) cudaFree(device_data_);
#endif
}

TensorView Buffer::view() {
  TensorView t = host_.view(device_);
  if (device_data_) t.data = device_data_;
  return t;
}

void Buffer::upload() {
#if defined(MSA_WITH_CUDA)
  if (device_data_)
    cuda_check(cudaMemcpy(device_data_, host_.data(), bytes_of(host_), cudaMemcpyHostToDevice),
               "cudaMemcpy to device");
#endif
}

void Buffer::download() {
#if defined(MSA_WITH_CUDA)
  if (device_data_)
    cuda_check(cudaMemcpy(host_.data(), device_data_, bytes_of(host_), cudaMemcpyDeviceToHost),
               "cudaMemcpy to host");
#endif
}

void Buffer::poison() {
  // Same values as HostTensor::poison, written in bulk: all-ones bits are a NaN in f32, f16 and bf16.
  if (host_.dtype() == DType::i32) {
    int32_t* p = static_cast<int32_t*>(host_.data());
    std::fill(p, p + host_.numel(), -12345);
  } else {
    std::memset(host_.data(), 0xff, bytes_of(host_));
  }
  upload();
}

TensorView slice(const TensorView& t, int dim, int64_t begin, int64_t count) {
  TensorView s = t;
  s.data = static_cast<char*>(t.data) + begin * t.stride[dim] * int64_t(dtype_size(t.dtype));
  s.shape[dim] = count;
  return s;
}

void synchronize(Device device) {
#if defined(MSA_WITH_CUDA)
  if (device.type == DeviceType::cuda) cuda_check(cudaDeviceSynchronize(), "synchronize");
#else
  (void)device;
#endif
}

std::string describe_device(Device device, int threads) {
  if (device.type == DeviceType::cpu)
    return "cpu (" + std::to_string(threads > 0 ? threads : cpu_thread_count()) + " threads)";
  for (const DeviceInfo& d : cuda_devices())
    if (d.index == device.index)
      return "cuda:" + std::to_string(d.index) + " " + d.name + " (sm_" +
             std::to_string(d.compute_capability_major) +
             std::to_string(d.compute_capability_minor) + ", " + std::to_string(d.sm_count) +
             " SMs)";
  return device_name(device);
}

}  // namespace tool
}  // namespace msa
