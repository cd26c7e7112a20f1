// Stage 1 of the CUDA index branch, HMMA (index_block_scores.cuh) vs wgmma
// (index_block_scores_wgmma.cuh): one sequence, Hkv = 4, B = 128, bf16, Di = 128 then 64. Checks that
// both write the same entries (block scores and block LSEs; unwritten entries keep a sentinel) to a
// relative 1e-3, and times each. Exits non-zero on a mismatch.
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -Iinclude -Isrc \
//        -I.deps/python/cutlass_library/source/include bench/index_wgmma_stage1.cu -o stage1 && ./stage1 4096 131072
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_bench_common.h"
#include "cuda/index_block_scores.cuh"
#include "cuda/index_block_scores_wgmma.cuh"

using namespace msa::detail::cuda::index;

// Counts entries that differ between two dumps: written in one only, or off by > 1e-3 relative.
int64_t count_mismatches(const std::vector<float>& x, const std::vector<float>& y, const char* what) {
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const bool wx = x[i] != 12345.f, wy = y[i] != 12345.f;
    if (wx != wy || std::isnan(x[i]) != std::isnan(y[i])) { ++bad; continue; }
    if (!wx) continue;
    const double d = std::abs(double(x[i]) - y[i]) / std::max(1.0, std::abs(double(x[i])));
    worst = std::max(worst, d);
    if (!(d <= 1e-3)) ++bad;
  }
  std::printf("  %s: %lld mismatches, worst relative difference %.2e\n", what, (long long)bad, worst);
  return bad;
}

template <int kDim>
int64_t run(int64_t L) {
  const int Hkv = 4, Di = kDim, B = 128;
  const int64_t nb = (L + B - 1) / B, ld = (nb + 3) / 4 * 4, rows = Hkv * L, n = rows * ld;
  uint16_t *qi, *ki;
  int32_t* cu;
  float *sc[2], *ls[2];
  CHECK(cudaMalloc(&qi, L * Hkv * Di * 2));
  CHECK(cudaMalloc(&ki, L * Di * 2));
  CHECK(cudaMalloc(&cu, 8));
  for (int k = 0; k < 2; ++k) {
    CHECK(cudaMalloc(&sc[k], n * 4));
    CHECK(cudaMalloc(&ls[k], n * 4));
  }
  const int32_t cu_h[2] = {0, int32_t(L)};
  CHECK(cudaMemcpy(cu, cu_h, 8, cudaMemcpyHostToDevice));
  fill_random_bf16<<<1024, 256>>>(qi, L * Hkv * Di, 1u);
  fill_random_bf16<<<1024, 256>>>(ki, L * Di, 2u);

  BlockScoreArgs s{};
  s.qi = qi; s.qi_s0 = Hkv * Di; s.qi_s1 = Di;
  s.ki = ki; s.ki_s0 = Di;
  s.cu_q = cu; s.cu_k = cu;
  s.num_kv_heads = Hkv; s.head_dim = Di; s.padded_dim = Di; s.block_size = B;
  s.groups_per_cta = Hkv; s.queries_per_cta = kScoreRows / Hkv;
  s.iscale = 1.f / std::sqrt(float(Di)); s.lse_factor = s.iscale / 0.8f;
  s.vector_loads = true;
  s.ld = ld; s.total_q = L;
  BlockScoreArgs s_h = s, s_w = s;
  s_h.scores = sc[0]; s_h.lses = ls[0];
  s_w.scores = sc[1]; s_w.lses = ls[1];
  const dim3 grid(unsigned((L + s.queries_per_cta - 1) / s.queries_per_cta), 1, 1);

  const size_t smem_h = block_score_smem_bytes(Di);
  const size_t smem_w = WgmmaScoreTraits<true, kDim, 128>::kSmemBytes;
  CHECK(cudaFuncSetAttribute(block_scores_kernel<true, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_h)));
  CHECK(cudaFuncSetAttribute(block_scores_kernel<true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_h)));
  CHECK(cudaFuncSetAttribute(block_scores_wgmma_kernel<true, false, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_w)));
  CHECK(cudaFuncSetAttribute(block_scores_wgmma_kernel<true, true, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_w)));
  auto hmma = [&] { block_scores_kernel<true, false><<<grid, kScoreThreads, smem_h>>>(s_h); };
  auto hmma_lse = [&] { block_scores_kernel<true, true><<<grid, kScoreThreads, smem_h>>>(s_h); };
  auto wg = [&] { block_scores_wgmma_kernel<true, false, kDim, 128><<<grid, kWgmmaThreads, smem_w>>>(s_w); };
  auto wg_lse = [&] { block_scores_wgmma_kernel<true, true, kDim, 128><<<grid, kWgmmaThreads, smem_w>>>(s_w); };

  // Outputs first (sentinel-filled, one LSE run each), then timings.
  for (int k = 0; k < 2; ++k) {
    fill_value<<<4096, 256>>>(sc[k], n, 12345.f);
    fill_value<<<4096, 256>>>(ls[k], n, 12345.f);
  }
  hmma_lse();
  wg_lse();
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> h[2], l[2];
  for (int k = 0; k < 2; ++k) {
    h[k].resize(size_t(n));
    l[k].resize(size_t(n));
    CHECK(cudaMemcpy(h[k].data(), sc[k], n * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(l[k].data(), ls[k], n * 4, cudaMemcpyDeviceToHost));
  }
  std::printf("L=%lld Di=%d:\n", (long long)L, Di);
  int64_t bad = count_mismatches(h[0], h[1], "block scores") + count_mismatches(l[0], l[1], "block LSEs");

  const int reps = L > 65536 ? 5 : 10;
  const double flops = 2.0 * Hkv * Di * (double(L) * (L + 1) / 2);
  const float th = median_ms(hmma, reps, 1), thl = median_ms(hmma_lse, reps, 1);
  const float tw = median_ms(wg, reps, 1), twl = median_ms(wg_lse, reps, 1);
  CHECK(cudaGetLastError());
  std::printf("  HMMA  %.3f ms (%.0f TFLOP/s useful), with block LSE %.3f ms\n", th, flops / th / 1e9, thl);
  std::printf("  wgmma %.3f ms (%.0f TFLOP/s useful), with block LSE %.3f ms\n", tw, flops / tw / 1e9, twl);
  cudaFree(qi); cudaFree(ki); cudaFree(cu);
  for (int k = 0; k < 2; ++k) { cudaFree(sc[k]); cudaFree(ls[k]); }
  return bad;
}

int main(int argc, char** argv) {
  int64_t bad = 0;
  for (int ai = 1; ai < argc; ++ai) {
    const int64_t L = std::atoll(argv[ai]);
    bad += run<128>(L);
    bad += run<64>(L);
  }
  std::printf(bad ? "MISMATCH\n" : "outputs match\n");
  return bad ? 1 : 0;
}
