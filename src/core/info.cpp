#include "msa/info.h"

#include <omp.h>

namespace msa {

#if defined(MSA_WITH_CUDA)
namespace detail {
namespace cuda {
std::vector<DeviceInfo> list_devices();  // src/cuda/info.cu
}  // namespace cuda
}  // namespace detail
#endif

bool built_with_cuda() {
#if defined(MSA_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

int cpu_thread_count() { return omp_get_max_threads(); }

std::vector<DeviceInfo> cuda_devices() {
#if defined(MSA_WITH_CUDA)
  return detail::cuda::list_devices();
#else
  return {};
#endif
}

}  // namespace msa
