// CUDA paged_append_kv: one thread per 8 elements of a new token's k, v or ki row, written to the
// page slot of the token's position; FP8 caches get x / scale encoded by the one host/device encoder
// of common/float_convert.h (the CPU append's rule). Lengths are read on the device: capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "common/float_convert.h"
#include "core/paged_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/grid_dependency.cuh"
#include "cuda/paged_layout.h"
#include "cuda/paged_load.cuh"
#include "cuda/paged_tile.cuh"
#include "cuda/rows_aligned.h"
#include "cuda/sequence_of_row.cuh"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

struct Dst {
  unsigned char* data;
  int64_t s0, s1, s2;  // bytes
  bool fp8;
  const float* scale;
  int64_t sc0, sc1;
};
struct Src {
  const void* data;
  int64_t s0, s1;  // elements
};

struct AppendArgs {
  Src k, v, ki;
  Dst kd, vd, kid;
  const int32_t* cu_q;
  const int32_t* kv_lens;
  const int32_t* page_table;
  int64_t pt_s0, pt_s1, num_pages;
  int batch, hkv, D, Di, B;
  paged::PlanBounds bounds;
};

template <class T>
__device__ void write8(const T* src, const Dst& d, int64_t page, int64_t slot, int head, int e) {
  float x[8];
  paged::load8<T>(src, x);
  unsigned char* row = d.data + page * d.s0 + slot * d.s1 + head * d.s2;
  if (d.fp8) {
    const float scale = d.scale[page * d.sc0 + head * d.sc1];
    uint8_t b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = float_to_fp8_e4m3(x[i] / scale);
    *reinterpret_cast<uint2*>(row + e) = *reinterpret_cast<const uint2*>(b);
  } else {
    *reinterpret_cast<uint4*>(reinterpret_cast<T*>(row) + e) = *reinterpret_cast<const uint4*>(src);
    if (sizeof(T) == 4) *reinterpret_cast<uint4*>(reinterpret_cast<T*>(row) + e + 4) =
        *reinterpret_cast<const uint4*>(src + 4);
  }
}

template <class T>
__global__ void append_kernel(const AppendArgs a) {
  wait_for_prior_grid_then_release_next();
  const int kvec = a.hkv * a.D / 8, per_row = 2 * kvec + a.Di / 8;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.bounds.total_q * per_row) return;
  const int64_t row = i / per_row;
  int w = int(i - row * per_row);
  const int r = sequence_of_row(a.cu_q, a.batch, row);
  const paged::RequestSpan s = paged::request_span(a.cu_q, a.kv_lens, r, a.bounds);
  if (row < s.q_begin || row >= s.q_begin + s.q_len) return;  // only with lengths unlike the plan's
  const int64_t pos = rules::query_position(s.q_len, s.kv, row - s.q_begin);
  if (pos < 0) return;  // likewise: kv_lens below q_len
  const int64_t j = rules::block_of(pos, a.B);
  const int64_t page = a.page_table[r * a.pt_s0 + j * a.pt_s1];
  if (page < 0 || page >= a.num_pages) return;  // an id outside the cache is not written
  const int64_t slot = pos - rules::block_begin(j, a.B);
  if (w < 2 * kvec) {
    const bool is_v = w >= kvec;
    if (is_v) w -= kvec;
    const int head = w / (a.D / 8), e = (w % (a.D / 8)) * 8;
    const Src& s = is_v ? a.v : a.k;
    const T* src = static_cast<const T*>(s.data) + row * s.s0 + head * s.s1 + e;
    write8<T>(src, is_v ? a.vd : a.kd, page, slot, head, e);
  } else {
    const int e = (w - 2 * kvec) * 8;
    const T* src = static_cast<const T*>(a.ki.data) + row * a.ki.s0 + e;
    write8<T>(src, a.kid, page, slot, 0, e);
  }
}

Dst dst_of(const TensorView& cache, const TensorView& scale) {
  const int64_t es = int64_t(dtype_size(cache.dtype));
  Dst d{};
  d.data = static_cast<unsigned char*>(cache.data);
  d.s0 = cache.stride[0] * es;
  d.s1 = cache.stride[1] * es;
  d.s2 = cache.ndim == 4 ? cache.stride[2] * es : 0;
  d.fp8 = cache.dtype == DType::fp8_e4m3;
  if (d.fp8) {
    d.scale = scale.ptr<const float>();
    d.sc0 = scale.stride[0];
    d.sc1 = scale.ndim == 2 ? scale.stride[1] : 0;
  }
  return d;
}

template <class T>
void append_impl(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                 const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache,
                 cudaStream_t stream) {
  const Config& c = plan.cfg;
  AppendArgs a{};
  a.k = {k_new.data, k_new.stride[0], k_new.stride[1]};
  a.v = {v_new.data, v_new.stride[0], v_new.stride[1]};
  a.ki = {ki_new.data, ki_new.stride[0], 0};
  a.kd = dst_of(cache.k, cache.k_scale);
  a.vd = dst_of(cache.v, cache.v_scale);
  a.kid = dst_of(cache.ki, cache.ki_scale);
  a.cu_q = batch.cu_seqlens_q.ptr<const int32_t>();
  a.kv_lens = batch.kv_lens.ptr<const int32_t>();
  a.page_table = batch.page_table.ptr<const int32_t>();
  a.pt_s0 = batch.page_table.stride[0];
  a.pt_s1 = batch.page_table.stride[1];
  a.num_pages = cache.k.shape[0];
  a.batch = plan.batch;
  a.hkv = c.num_kv_heads;
  a.D = c.head_dim;
  a.Di = c.index_head_dim;
  a.B = c.block_size;
  a.bounds = paged::bounds_of(plan);
  const int64_t n = plan.total_q * (2 * int64_t(c.num_kv_heads) * c.head_dim / 8 + c.index_head_dim / 8);
  const int threads = 256;
  launch_chained(append_kernel<T>, unsigned((n + threads - 1) / threads), threads, 0, stream, a);
  MSA_CUDA_CHECK_LAUNCH();
}

}  // namespace

void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache,
                     const Context& ctx) {
  if (plan.total_q == 0) return;
  const Config& c = plan.cfg;
  if (c.head_dim % 8 || c.index_head_dim % 8)
    throw NotSupportedError("msa: CUDA paged append: D and Di must be multiples of 8");
  for (const TensorView* t : {&k_new, &v_new, &ki_new, &cache.k, &cache.v, &cache.ki})
    if (!rows_aligned(*t, 8 * dtype_size(t->dtype)))
      throw NotSupportedError("msa: CUDA paged append: rows must be 8-element aligned");
  cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);
  switch (plan.dtype) {
    case DType::bf16: return append_impl<__nv_bfloat16>(plan, batch, k_new, v_new, ki_new, cache, stream);
    case DType::f16: return append_impl<__half>(plan, batch, k_new, v_new, ki_new, cache, stream);
    case DType::f32: return append_impl<float>(plan, batch, k_new, v_new, ki_new, cache, stream);
    default: throw NotSupportedError("msa: CUDA paged append: unsupported dtype");
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
