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
}  // namespace cuda
#endif
}  // namespace detail
}  // namespace msa
