// Device listing for msa::cuda_devices() (include/msa/info.h).
#include <cuda_runtime.h>

#include "msa/info.h"

namespace msa {
namespace detail {
namespace cuda {

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> devices;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: list none, leave no sticky error behind
    return devices;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    DeviceInfo d;
    d.index = i;
    d.name = prop.name;
    d.sm_count = prop.multiProcessorCount;
    d.total_memory_bytes = prop.totalGlobalMem;
    d.compute_capability_major = prop.major;
    d.compute_capability_minor = prop.minor;
    devices.push_back(d);
  }
  return devices;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
