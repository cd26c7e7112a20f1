// The functions each backend provides. They receive validated arguments (src/core/dispatch.cpp
// checks shapes, dtypes, devices and lengths); ids inside `topk` are checked by the backend itself,
// where it reads them.
#pragma once

#include "core/problem.h"
#include "msa/ops.h"

#define MSA_BACKEND_DECLARATIONS                                                                    \
  std::size_t workspace_bytes(Op op, const Problem& p, int num_threads);                            \
  void index_topk(const Problem& p, const TensorView& qi, const TensorView& ki,                     \
                  const TensorView& topk, const TensorView& selected_lse, float temperature,        \
                  const Context& ctx);                                                              \
  /* topk undefined = dense (every visible key). */                                                 \
  void attention_forward(const Problem& p, const TensorView& q, const TensorView& k,                \
                         const TensorView& v, const TensorView& topk, const TensorView& out,        \
                         const TensorView& lse, const Context& ctx);                                \
  void attention_backward(const Problem& p, const TensorView& q, const TensorView& k,               \
                          const TensorView& v, const TensorView& topk, const TensorView& out,       \
                          const TensorView& lse, const TensorView& dout, const TensorView& dq,      \
                          const TensorView& dk, const TensorView& dv, const Context& ctx);          \
  void kl_alignment(const Problem& p, const TensorView& q, const TensorView& k,                     \
                    const TensorView& lse, const TensorView& qi, const TensorView& ki,              \
                    const TensorView& topk, float coeff, const TensorView& loss,                    \
                    const TensorView& dqi, const TensorView& dki, const Context& ctx);

namespace msa {
namespace detail {
namespace cpu {
MSA_BACKEND_DECLARATIONS
}  // namespace cpu
#if defined(MSA_WITH_CUDA)
namespace cuda {
MSA_BACKEND_DECLARATIONS
int device_count();

// Makes the tensors' device current for one call and gives the caller's back afterwards: kernels
// launch on the current device, which need not be the tensors' (FlashAttention's CUDAGuard). No
// runtime call when it is already current (the usual case, and inside graph captures).
class DeviceScope {
 public:
  explicit DeviceScope(Device device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;  // the caller's device where it had to change
};

template <class F>
auto on_device(Device device, F&& call) -> decltype(call()) {
  DeviceScope scope(device);
  return call();
}
}  // namespace cuda
#endif
}  // namespace detail
}  // namespace msa
