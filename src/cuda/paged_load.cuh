// Eight consecutive elements of a paged-cache or query row as f32 (one 16-byte load for 16-bit
// rows, 8 bytes for FP8, 32 for f32), and eight f32 stored back in the query dtype. Rows are
// addressed in bytes so one helper serves a cache in the query dtype or in FP8 E4M3 (decoded by the
// hardware converter, exact: every E4M3 value is a half), chosen per cache at run time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

template <class T>
__device__ __forceinline__ void load8(const T* p, float* x);

template <>
__device__ __forceinline__ void load8<float>(const float* p, float* x) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
  x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float* x) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float* x) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8_fp8(const uint8_t* p, float scale, float* x) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const __nv_fp8x2_storage_t* b = reinterpret_cast<const __nv_fp8x2_storage_t*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(b[i], __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r));
    x[2 * i] = f.x * scale;
    x[2 * i + 1] = f.y * scale;
  }
}

// A cache row's 8 elements starting at element e: FP8 bytes x scale, or the query dtype T.
template <class T>
__device__ __forceinline__ void load8_cache(const unsigned char* row, int e, bool fp8, float scale,
                                            float* x) {
  if (fp8)
    load8_fp8(row + e, scale, x);
  else
    load8<T>(reinterpret_cast<const T*>(row) + e, x);
}

// Asynchronous global -> shared copy of one 8-element vector of `esize`-byte elements (FP8: 8
// bytes, 16-bit: 16, f32: 2 x 16); both addresses aligned to the vector's size.
__device__ __forceinline__ void cp_async_vec8(void* dst_smem, const void* src, int esize) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(dst_smem));
  if (esize == 1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
    if (esize == 4)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + 16),
                   "l"(static_cast<const unsigned char*>(src) + 16));
  }
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// Two E4M3 codes as a packed pair of T (exact: E4M3 -> half is exact, and every E4M3 value is a bf16):
// the tensor-core kernels' operands for FP8 caches, widened without their page scale.
template <class T>
__device__ __forceinline__ uint32_t fp8x2_to_pair(__nv_fp8x2_storage_t codes);
template <>
__device__ __forceinline__ uint32_t fp8x2_to_pair<__half>(__nv_fp8x2_storage_t codes) {
  const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
  return uint32_t(r.x) | (uint32_t(r.y) << 16);
}
template <>
__device__ __forceinline__ uint32_t fp8x2_to_pair<__nv_bfloat16>(__nv_fp8x2_storage_t codes) {
  const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r));
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
  return *reinterpret_cast<const uint32_t*>(&b);
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
