// The one polynomial behind the CPU softmax's 2^x (AVX2 rows in attention_simd.h, AVX-512 rows in
// amx_tiles.h): 2^f for f in [-0.5, 0.5], Taylor coefficients of degree 6 (error below f32
// rounding), highest degree first for Horner's rule; the caller scales by 2^round(x).
#pragma once

namespace msa {
namespace detail {
namespace cpu {

constexpr int kExp2Degree = 6;
constexpr float kExp2Poly[kExp2Degree + 1] = {1.5403530393381606e-4f,
                                              1.3333558146428443e-3f,
                                              9.6181291076284772e-3f,
                                              5.5504108664821580e-2f,
                                              2.4022650695910071e-1f,
                                              6.9314718055994531e-1f,
                                              1.f};

}  // namespace cpu
}  // namespace detail
}  // namespace msa
