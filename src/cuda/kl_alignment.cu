// CUDA KL alignment of the index branch (SPEC.md "Index branch training: KL alignment").
// By default the tensor-core kernels run (kl_alignment_mma.cu: bf16/f16, D and Di in {64, 128},
// block_size a multiple of 64, G dividing 64, 16-byte aligned rows); MSA_KL_KERNEL=ffma, or any other
// problem, runs the first version below.
//
// The CUDA-core (FFMA) version: one CTA of 4 warps per (query, group), a warp per key, lanes over the
// head dimension. Pass 1 takes the student logsumexp over the selected visible tokens (every visible
// token when topk is undefined); pass 2 recomputes the teacher P = mean over the G heads of
// exp(scale q.k - lse) key by key (never stored), accumulates the loss, dqi (in the CTA) and dki.
//
// Determinism: dki sums contributions from many CTAs. They are added as 64-bit fixed-point integers
// (integer addition is associative, so every run gives the same bits), with a power-of-two scale
// chosen from a bound of the whole sum: |sum| <= |coeff| * iscale * max|qi| (each (query, group)
// contributes at most |norm| * iscale * max|qi| with |Q - P| <= 1, and norm = coeff / (Hkv total_q)).
// The sum stays below 2^61 and the resolution is ~2^-61 of the bound, far below f32 precision of
// any non-negligible gradient. The loss is summed per CTA and then in a fixed order.
// Known limitations: ids outside [0, local] are skipped (not reported, unlike the CPU backend; as the
// CUDA attention forward and backward, and the tensor-core path); a duplicated id counts twice here
// (once in the tensor-core path, as in the attention kernels); Di <= 256.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/backend.h"
#include "cuda/attention_mma.cuh"
#include "cuda/sequence_of_row.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"
#include "cuda/kl_alignment_mma.h"
#include "cuda/workspace.cuh"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

constexpr int kKlThreads = 128;
constexpr int kKlWarps = kKlThreads / 32;
constexpr int kMaxIndexDim = 256;

struct KlParams {
  const void* q;
  const void* k;
  const float* lse;
  const void* qi;
  const void* ki;
  const int32_t* topk;  // nullptr: dense (every visible key)
  const int32_t* cu_q;
  const int32_t* cu_k;
  float* loss;
  void* dqi;
  void* dki;
  unsigned long long* dki_fixed;  // [total_k, Di] fixed-point accumulators
  unsigned int* max_abs_qi;       // f32 bits of max |qi|
  double* loss_part;              // [total_q, Hkv]
  int64_t q_s0, q_s1, k_s0, k_s1, lse_s0, lse_s1, qi_s0, qi_s1, ki_s0, topk_s0, topk_s1;
  int64_t dqi_s0, dqi_s1, dki_s0;
  int64_t total_q, total_k;
  int batch, hkv, G, D, Di, B, topk_k;
  float scale, iscale, coeff, norm;
};

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

// Power-of-two fixed-point scale for dki: the bound of the sum (see the file comment) maps below 2^61.
__device__ __forceinline__ double dki_fixed_scale(const KlParams& p) {
  const double bound = double(fabsf(p.coeff)) * double(p.iscale) * double(__uint_as_float(*p.max_abs_qi));
  int e = 0;
  frexp(bound, &e);  // bound < 2^e
  return ldexp(1.0, 61 - e);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
  return x;
}

template <class T>
__global__ void __launch_bounds__(256) kl_max_abs_qi_kernel(const KlParams p) {
  const int64_t n = p.total_q * p.hkv * p.Di;
  float m = 0.f;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = e % p.Di, gh = (e / p.Di) % p.hkv, row = e / (int64_t(p.Di) * p.hkv);
    m = fmaxf(m, fabsf(to_f(static_cast<const T*>(p.qi)[row * p.qi_s0 + gh * p.qi_s1 + d])));
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, s));
  if ((threadIdx.x & 31) == 0) atomicMax(p.max_abs_qi, __float_as_uint(m));  // m >= 0: bits order as values
}

template <class T>
__global__ void __launch_bounds__(kKlThreads) kl_alignment_kernel(const KlParams p) {
  extern __shared__ float smem[];
  float* qh = smem;                // [G][D], pre-scaled by scale
  float* qis = qh + p.G * p.D;     // [Di], raw qi
  float* lse_h = qis + p.Di;       // [G]
  float* red = lse_h + p.G;        // [kKlWarps][Di] dqi partials
  __shared__ float s_m[kKlWarps], s_l[kKlWarps];
  __shared__ double s_loss[kKlWarps];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const int g = blockIdx.y;
  const int b = sequence_of_row(p.cu_q, p.batch, row);
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t pos = rules::query_position(lq, lk, row - q_begin);
  const int64_t local = rules::local_block(pos, p.B);
  const bool dense = p.topk == nullptr;
  const int32_t* ids = dense ? nullptr : p.topk + int64_t(g) * p.topk_s0 + row * p.topk_s1;
  const int nslots = dense ? int(local + 1) : p.topk_k;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* ki = static_cast<const T*>(p.ki);
  for (int e = tid; e < p.G * p.D; e += kKlThreads) {
    const int h = e / p.D, d = e % p.D;
    qh[e] = to_f(q[row * p.q_s0 + (int64_t(g) * p.G + h) * p.q_s1 + d]) * p.scale;
  }
  for (int d = tid; d < p.Di; d += kKlThreads)
    qis[d] = to_f(static_cast<const T*>(p.qi)[row * p.qi_s0 + int64_t(g) * p.qi_s1 + d]);
  for (int h = tid; h < p.G; h += kKlThreads) lse_h[h] = p.lse[row * p.lse_s0 + (int64_t(g) * p.G + h) * p.lse_s1];
  __syncthreads();

  // Calls f(t) for the keys of the set handled by this warp (every lane calls it: f is warp-wide).
  auto for_each_key = [&](auto&& f) {
    for (int slot = 0; slot < nslots; ++slot) {
      const int64_t j = dense ? slot : ids[slot];
      if (j < 0 || j > local) continue;  // -1, or a malformed id: skipped
      const int64_t end = rules::visible_block_end(j, p.B, pos);
      for (int64_t t = rules::block_begin(j, p.B) + warp; t < end; t += kKlWarps) f(t);
    }
  };
  auto student = [&](int64_t t) {
    const T* kr = ki + (k_begin + t) * p.ki_s0;
    float acc = 0.f;
    for (int d = lane; d < p.Di; d += 32) acc += qis[d] * to_f(kr[d]);
    return warp_sum(acc) * p.iscale;
  };

  // Pass 1: the student's logsumexp (online per warp, then warps in order).
  float m = -INFINITY, l = 0.f;
  for_each_key([&](int64_t t) {
    const float s = student(t);
    if (s > m) {
      l = l * expf(m - s) + 1.f;
      m = s;
    } else {
      l += expf(s - m);
    }
  });
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
  __syncthreads();
  float M = -INFINITY, L = 0.f;
  for (int w = 0; w < kKlWarps; ++w) M = fmaxf(M, s_m[w]);
  for (int w = 0; w < kKlWarps; ++w) L += s_m[w] == -INFINITY ? 0.f : s_l[w] * expf(s_m[w] - M);
  const float student_lse = M + logf(L);
  const bool any = L > 0.f;

  // Pass 2: teacher, loss and gradients.
  const double fscale = dki_fixed_scale(p);
  float dqi_acc[kMaxIndexDim / 32];
#pragma unroll
  for (int c = 0; c < kMaxIndexDim / 32; ++c) dqi_acc[c] = 0.f;
  double my_loss = 0.0;
  if (any) {
    for_each_key([&](int64_t t) {
      const float s = student(t);
      const T* kr = k + (k_begin + t) * p.k_s0 + int64_t(g) * p.k_s1;
      float P = 0.f;
      for (int h = 0; h < p.G; ++h) {
        float acc = 0.f;
        for (int d = lane; d < p.D; d += 32) acc += qh[h * p.D + d] * to_f(kr[d]);
        P += expf(warp_sum(acc) - lse_h[h]);
      }
      P /= float(p.G);
      const float log_q = s - student_lse;
      if (P > 0.f) my_loss += double(P * (logf(P) - log_q));
      const float grad = p.norm * (expf(log_q) - P);
      const float gs = grad * p.iscale;
      const T* kir = ki + (k_begin + t) * p.ki_s0;
      unsigned long long* dk = p.dki_fixed + (k_begin + t) * p.Di;
#pragma unroll
      for (int c = 0; c < kMaxIndexDim / 32; ++c) {
        const int d = lane + 32 * c;
        if (d < p.Di) {
          dqi_acc[c] += grad * to_f(kir[d]);
          atomicAdd(dk + d, static_cast<unsigned long long>(llrint(double(gs * qis[d]) * fscale)));
        }
      }
    });
  }
#pragma unroll
  for (int c = 0; c < kMaxIndexDim / 32; ++c)
    if (lane + 32 * c < p.Di) red[warp * p.Di + lane + 32 * c] = dqi_acc[c];
  if (lane == 0) s_loss[warp] = my_loss;
  __syncthreads();
  T* dqi = static_cast<T*>(p.dqi) + row * p.dqi_s0 + int64_t(g) * p.dqi_s1;
  for (int d = tid; d < p.Di; d += kKlThreads) {
    float sum = 0.f;
    for (int w = 0; w < kKlWarps; ++w) sum += red[w * p.Di + d];
    dqi[d] = mma::Elem<T>::from_float(p.iscale * sum);
  }
  if (tid == 0) {
    double sum = 0.0;
    for (int w = 0; w < kKlWarps; ++w) sum += s_loss[w];
    p.loss_part[row * p.hkv + g] = sum;
  }
}

// dki from the fixed-point sums; the loss from the per-(query, group) parts in a fixed order.
template <class T>
__global__ void __launch_bounds__(256) kl_finish_kernel(const KlParams p) {
  const double inv = 1.0 / dki_fixed_scale(p);
  const int64_t n = p.total_k * p.Di;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / p.Di, d = e % p.Di;
    const double v = double(static_cast<long long>(p.dki_fixed[e])) * inv;
    static_cast<T*>(p.dki)[t * p.dki_s0 + d] = mma::Elem<T>::from_float(float(v));
  }
  if (blockIdx.x == 0) {
    __shared__ double part[256];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < p.total_q * p.hkv; i += 256) s += p.loss_part[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
      if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) *p.loss = float(part[0] * double(p.norm));
  }
}

struct KlLayout {
  std::size_t fixed = 0, max_abs = 0, loss_part = 0, total = 0;
  explicit KlLayout(const Problem& p) {
    fixed = align_up(std::size_t(p.total_k) * p.cfg.index_head_dim * sizeof(unsigned long long));
    max_abs = align_up(sizeof(unsigned int));
    loss_part = align_up(std::size_t(p.total_q) * p.cfg.num_kv_heads * sizeof(double));
    total = fixed + max_abs + loss_part;
  }
};

template <class T>
void launch(const Problem& p, const KlParams& a, cudaStream_t stream) {
  if (a.total_q > 0) {
    const unsigned mgrid = unsigned(std::min<int64_t>((a.total_q * a.hkv * a.Di + 255) / 256, 4096));
    kl_max_abs_qi_kernel<T><<<mgrid, 256, 0, stream>>>(a);
    MSA_CUDA_CHECK_LAUNCH();
    const std::size_t smem = (std::size_t(a.G) * a.D + a.Di + a.G + std::size_t(kKlWarps) * a.Di) * sizeof(float);
    int dev = 0, optin = 0;
    MSA_CUDA_CHECK(cudaGetDevice(&dev));
    MSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (smem + 1024 > std::size_t(optin))
      throw NotSupportedError("msa: CUDA KL alignment needs " + std::to_string(smem) + " bytes of shared memory");
    MSA_CUDA_CHECK(cudaFuncSetAttribute(kl_alignment_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    MSA_CHECK_ARG(p.cfg.num_kv_heads <= 65535, "num_kv_heads", "the CUDA KL alignment takes at most 65535 groups");
    kl_alignment_kernel<T><<<dim3(unsigned(a.total_q), unsigned(a.hkv)), kKlThreads, smem, stream>>>(a);
    MSA_CUDA_CHECK_LAUNCH();
  }
  const unsigned fgrid = unsigned(std::max<int64_t>(1, std::min<int64_t>((a.total_k * a.Di + 255) / 256, 4096)));
  kl_finish_kernel<T><<<fgrid, 256, 0, stream>>>(a);
  MSA_CUDA_CHECK_LAUNCH();
}

// MSA_KL_KERNEL=ffma keeps the FFMA kernel (the reference of the tensor-core one on a device).
bool ffma_requested() {
  const char* e = std::getenv("MSA_KL_KERNEL");
  return e != nullptr && std::string(e) == "ffma";
}

}  // namespace

std::size_t kl_alignment_workspace_bytes(const Problem& p) {
  return std::max(KlLayout(p).total, kl_alignment_mma_workspace_bytes(p));
}

void kl_alignment(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& lse,
                  const TensorView& qi, const TensorView& ki, const TensorView& topk, float coeff,
                  const TensorView& loss, const TensorView& dqi, const TensorView& dki,
                  const Context& ctx) {
  MSA_CHECK_ARG(p.dtype == DType::bf16 || p.dtype == DType::f16, "q",
                std::string("dtype ") + dtype_name(p.dtype) +
                    " is not supported by the CUDA KL alignment (bfloat16, float16)");
  if (!ffma_requested() && kl_alignment_mma_supports(p, q, k, qi, ki))
    return kl_alignment_mma(p, q, k, lse, qi, ki, topk, coeff, loss, dqi, dki, ctx);
  MSA_CHECK_ARG(p.cfg.index_head_dim <= kMaxIndexDim, "index_head_dim",
                "the CUDA KL alignment supports up to 256, got " + std::to_string(p.cfg.index_head_dim));
  MSA_CHECK_ARG(p.total_q < (int64_t(1) << 31), "q", "too many query rows for the CUDA KL alignment");
  const cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);
  const KlLayout lay(p);
  ScratchArena arena(ctx, lay.total);

  KlParams a{};
  a.q = q.data;
  a.k = k.data;
  a.lse = lse.ptr<float>();
  a.qi = qi.data;
  a.ki = ki.data;
  a.topk = topk.defined() ? topk.ptr<int32_t>() : nullptr;
  a.cu_q = p.varlen.cu_seqlens_q.ptr<int32_t>();
  a.cu_k = p.varlen.cu_seqlens_k.ptr<int32_t>();
  a.loss = loss.ptr<float>();
  a.dqi = dqi.data;
  a.dki = dki.data;
  a.dki_fixed = arena.take<unsigned long long>(std::size_t(p.total_k) * p.cfg.index_head_dim);
  a.max_abs_qi = arena.take<unsigned int>(1);
  a.loss_part = arena.take<double>(std::size_t(p.total_q) * p.cfg.num_kv_heads);
  a.q_s0 = q.stride[0], a.q_s1 = q.stride[1];
  a.k_s0 = k.stride[0], a.k_s1 = k.stride[1];
  a.lse_s0 = lse.stride[0], a.lse_s1 = lse.stride[1];
  a.qi_s0 = qi.stride[0], a.qi_s1 = qi.stride[1];
  a.ki_s0 = ki.stride[0];
  a.topk_s0 = topk.defined() ? topk.stride[0] : 0;
  a.topk_s1 = topk.defined() ? topk.stride[1] : 0;
  a.dqi_s0 = dqi.stride[0], a.dqi_s1 = dqi.stride[1];
  a.dki_s0 = dki.stride[0];
  a.total_q = p.total_q;
  a.total_k = p.total_k;
  a.batch = p.batch;
  a.hkv = p.cfg.num_kv_heads;
  a.G = p.cfg.group_size();
  a.D = p.cfg.head_dim;
  a.Di = p.cfg.index_head_dim;
  a.B = p.cfg.block_size;
  a.topk_k = p.cfg.topk;
  a.scale = p.cfg.softmax_scale();
  a.iscale = p.cfg.index_softmax_scale();
  a.coeff = coeff;
  // As the CPU backend: coeff / (Hkv total_q), rounded once to f32.
  a.norm = p.total_q > 0 ? float(double(coeff) / (double(a.hkv) * double(p.total_q))) : 0.f;

  MSA_CUDA_CHECK(cudaMemsetAsync(a.dki_fixed, 0, std::size_t(p.total_k) * a.Di * sizeof(unsigned long long), stream));
  MSA_CUDA_CHECK(cudaMemsetAsync(a.max_abs_qi, 0, sizeof(unsigned int), stream));
  if (p.dtype == DType::bf16) return launch<__nv_bfloat16>(p, a, stream);
  return launch<__half>(p, a, stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
