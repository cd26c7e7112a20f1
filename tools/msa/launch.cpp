#include "launch.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#if defined(MSA_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace msa {
namespace tool {

Launcher::Launcher(const RunProblem& p, Device device, int64_t max_rows) : device_(device) {
  whole_ = make_call(p.cu_q, p.cu_k, 0, 0);
  if (device.type != DeviceType::cpu) {
    chunks_.push_back(whole_);
    return;
  }
  std::vector<int32_t> cu_q{0}, cu_k{0};
  int64_t q0 = 0, k0 = 0;
  auto flush = [&] {
    if (cu_q.size() > 1) chunks_.push_back(make_call(cu_q, cu_k, q0, k0));
    cu_q.assign(1, 0);
    cu_k.assign(1, 0);
  };
  for (int b = 0; b < p.batch(); ++b) {
    const int32_t lq = p.cu_q[b + 1] - p.cu_q[b], lk = p.cu_k[b + 1] - p.cu_k[b];
    if (lq > max_rows) {
      flush();
      for (int64_t i = 0; i < lq; i += max_rows) {
        const int32_t n = int32_t(std::min<int64_t>(max_rows, lq - i));
        // Queries i..i+n-1 of the sequence see keys 0..(lk - lq + i + n - 1): a chunked prefill.
        chunks_.push_back(make_call({0, n}, {0, int32_t(lk - lq + i + n)}, p.cu_q[b] + i, p.cu_k[b]));
      }
      continue;
    }
    if (cu_q.back() + lq > max_rows) flush();
    if (cu_q.size() == 1) {
      q0 = p.cu_q[b];
      k0 = p.cu_k[b];
    }
    cu_q.push_back(cu_q.back() + lq);
    cu_k.push_back(cu_k.back() + lk);
  }
  flush();
}

Call Launcher::make_call(std::vector<int32_t> cu_q, std::vector<int32_t> cu_k, int64_t q0,
                         int64_t k0) {
  const int64_t n = int64_t(cu_q.size());
  auto tensor_of = [&](const std::vector<int32_t>& cu) {
    HostTensor t(DType::i32, {n});
    for (int64_t i = 0; i < n; ++i) t.set(i, cu[size_t(i)]);
    cu_buffers_.push_back(std::make_unique<Buffer>(std::move(t), device_));
    return cu_buffers_.back()->view();
  };
  Call c;
  c.varlen.cu_seqlens_q = tensor_of(cu_q);
  c.varlen.cu_seqlens_k = tensor_of(cu_k);
  for (int64_t b = 0; b + 1 < n; ++b) {
    c.varlen.max_seqlen_q = std::max(c.varlen.max_seqlen_q, cu_q[b + 1] - cu_q[b]);
    c.varlen.max_seqlen_k = std::max(c.varlen.max_seqlen_k, cu_k[b + 1] - cu_k[b]);
  }
  c.q0 = q0;
  c.k0 = k0;
  c.nq = cu_q.back();
  c.nk = cu_k.back();
  // Host copies let a GPU backend size grids and validate lengths without a device round trip.
  host_cu_.push_back(std::move(cu_q));
  c.varlen.host_cu_seqlens_q = host_cu_.back().data();
  host_cu_.push_back(std::move(cu_k));
  c.varlen.host_cu_seqlens_k = host_cu_.back().data();
  return c;
}

double time_ms(Device device, int warmup, int repeat, const std::function<void()>& body) {
  for (int i = 0; i < warmup; ++i) body();
#if defined(MSA_WITH_CUDA)
  if (device.type == DeviceType::cuda) {
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    cudaEventRecord(start);
    for (int i = 0; i < repeat; ++i) body();
    cudaEventRecord(stop);
    const cudaError_t err = cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err));
    return double(ms) / repeat;
  }
#else
  (void)device;
#endif
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < repeat; ++i) body();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
         repeat;
}

}  // namespace tool
}  // namespace msa
