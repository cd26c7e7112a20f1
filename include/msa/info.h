// What this build of the library can run on: backends compiled in, CPU threads, CUDA devices.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace msa {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int sm_count = 0;
  std::size_t total_memory_bytes = 0;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
};

// True when the CUDA backend was compiled in (it may still find no device at run time).
bool built_with_cuda();

// Threads the CPU backend uses when Context::num_threads is 0.
int cpu_thread_count();

// The CUDA devices visible to this process; empty without CUDA, a driver or a device.
std::vector<DeviceInfo> cuda_devices();

}  // namespace msa
