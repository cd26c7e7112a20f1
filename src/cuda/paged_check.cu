// paged_check_batch's device side: the batch tensors copied to the host, for the one set of checks
// the CPU runs on every call (src/core/paged_validate.cpp). It synchronises, which is why paged_run
// never calls it: a kernel only contains bad lengths and page ids (docs/serving.md).
#include <cuda_runtime.h>

#include <cstdint>

#include "core/paged_backend.h"
#include "cuda/cuda_check.cuh"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

HostBatch paged_batch_to_host(const PagedBatch& batch, const Context& ctx) {
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  MSA_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone)
    throw ArgumentError("stream",
                        "is capturing a CUDA graph: paged_check_batch reads the batch back to the host "
                        "(a synchronisation); call it before the capture or between replays");
  HostBatch host;
  host.cu_seqlens_q.resize(std::size_t(batch.cu_seqlens_q.shape[0]));
  host.kv_lens.resize(std::size_t(batch.kv_lens.shape[0]));
  const int64_t rows = batch.page_table.shape[0], width = batch.page_table.shape[1];
  host.page_table.resize(std::size_t(rows * width));
  auto copy = [&](void* dst, const void* src, std::size_t bytes) {
    if (bytes) MSA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  };
  // Validation left only the innermost dimension contiguous: the table's rows may lie apart (a slice
  // of a wider table) or overlap (stride 0, one row for every request).
  const int64_t pitch = batch.page_table.stride[0];
  copy(host.cu_seqlens_q.data(), batch.cu_seqlens_q.data, host.cu_seqlens_q.size() * 4);
  copy(host.kv_lens.data(), batch.kv_lens.data, host.kv_lens.size() * 4);
  if (rows > 0 && width > 0 && pitch >= width) {
    MSA_CUDA_CHECK(cudaMemcpy2DAsync(host.page_table.data(), std::size_t(width) * 4, batch.page_table.data,
                                     std::size_t(pitch) * 4, std::size_t(width) * 4, std::size_t(rows),
                                     cudaMemcpyDeviceToHost, stream));
  } else {
    for (int64_t r = 0; r < rows; ++r)
      copy(host.page_table.data() + r * width, batch.page_table.ptr<const int32_t>() + r * pitch,
           std::size_t(width) * 4);
  }
  MSA_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
