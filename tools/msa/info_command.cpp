#include "info_command.h"

#include <cstdio>

#include "msa/info.h"

namespace msa {
namespace tool {

int info_command() {
  std::printf("backends compiled in: cpu%s\n", built_with_cuda() ? ", cuda (sm_90a kernels)" : "");
  std::printf("cpu: %d threads (OpenMP)\n", cpu_thread_count());
  if (!built_with_cuda()) {
    std::printf("cuda: not built (configure with nvcc present, or -DMSA_CUDA=ON)\n");
    return 0;
  }
  const std::vector<DeviceInfo> devices = cuda_devices();
  if (devices.empty()) std::printf("cuda: no device found\n");
  for (const DeviceInfo& d : devices)
    std::printf("cuda:%d %s, compute capability %d.%d, %d SMs, %.1f GiB\n", d.index, d.name.c_str(),
                d.compute_capability_major, d.compute_capability_minor, d.sm_count,
                double(d.total_memory_bytes) / (1024.0 * 1024.0 * 1024.0));
  return 0;
}

}  // namespace tool
}  // namespace msa
