// The functions a backend provides for the serving API (include/msa/paged.h). They receive arguments
// validated by src/core/paged_validate.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "msa/paged.h"

namespace msa {
namespace detail {
// A device batch copied to the host (paged_check_batch); page_table rows packed, shape[1] apart.
struct HostBatch {
  std::vector<int32_t> cu_seqlens_q, kv_lens, page_table;
};
namespace cpu {
// Per-thread scratch of paged_run for this plan (the plan reserves plan.num_threads of them).
std::size_t paged_thread_bytes(const PagedPlan& plan);
void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache);
void paged_run(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
               const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
               const TensorView& lse, const TensorView& topk, const Workspace& workspace);
}  // namespace cpu
namespace cuda {  // src/cuda/paged_*.cu; asynchronous on ctx.stream, graph capturable
void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache,
                     const Context& ctx);
void paged_run(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
               const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
               const TensorView& lse, const TensorView& topk, const Context& ctx);
// Copies the batch tensors to the host and waits for them on ctx.stream (not graph capturable:
// throws when ctx.stream is capturing).
HostBatch paged_batch_to_host(const PagedBatch& batch, const Context& ctx);
// SMs of the device (the default PagedOptions::num_workers of a CUDA plan); 132 if it cannot tell.
int paged_default_workers(int device_index);
}  // namespace cuda
}  // namespace detail
}  // namespace msa
