// Stage 1 of the CUDA index branch: HMMA (index_block_scores.cuh) vs the first wgmma kernel
// (index_block_scores_wgmma.cuh) vs the pipelined wgmma kernel (index_block_scores_wgmma_pipe.cuh)
// vs the warp-specialised TMA kernel (index_block_scores_ws.cuh, with and without ping-pong):
// one sequence, Hkv = 4, B = 128, bf16, Di = 128 then 64. Checks that each wgmma kernel writes the
// same entries as the HMMA one (block scores and block LSEs; unwritten entries keep a sentinel) to a
// relative 1e-3, and that the block-score argmax per row agrees, then times each (median of reps,
// CUDA events). Exits non-zero on a mismatch.
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -Iinclude -Isrc \
//        -I.deps/python/cutlass_library/source/include bench/index_wgmma_stage1.cu -o stage1 && ./stage1 32768 131072
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_bench_common.h"
#include "cuda/index_block_scores.cuh"
#include "cuda/index_block_scores_wgmma.cuh"
#include "cuda/index_block_scores_wgmma_pipe.cuh"
#include "cuda/index_block_scores_ws.cuh"
#include "cuda/tensor_map.h"

using namespace msa::detail::cuda::index;

// Counts entries that differ between two dumps: written in one only, or off by > 1e-3 relative.
// Prints the first mismatch.
int64_t count_mismatches(const std::vector<float>& x, const std::vector<float>& y, const char* what) {
  int64_t bad = 0, first = -1;
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const bool wx = x[i] != 12345.f, wy = y[i] != 12345.f;
    bool ok = wx == wy && std::isnan(x[i]) == std::isnan(y[i]);
    if (ok && wx) {
      const double d = std::abs(double(x[i]) - y[i]) / std::max(1.0, std::abs(double(x[i])));
      worst = std::max(worst, d);
      ok = d <= 1e-3;
    }
    if (!ok) {
      if (first < 0) first = int64_t(i);
      ++bad;
    }
  }
  std::printf("  %s: %lld mismatches, worst relative difference %.2e", what, (long long)bad, worst);
  if (first >= 0) std::printf(" (first at %lld: %g vs %g)", (long long)first, x[size_t(first)], y[size_t(first)]);
  std::printf("\n");
  return bad;
}

// Rows (of ld entries) whose largest written block score sits in a different block: the selection
// that stage 2 makes from these scores, reduced to its first pick. Near-ties are allowed.
int64_t count_argmax_changes(const std::vector<float>& x, const std::vector<float>& y, int64_t ld) {
  int64_t bad = 0;
  for (size_t r = 0; r * ld < x.size(); ++r) {
    int64_t bx = -1, by = -1;
    for (int64_t j = 0; j < ld; ++j) {
      const float vx = x[r * ld + j], vy = y[r * ld + j];
      if (vx != 12345.f && (bx < 0 || vx > x[r * ld + bx])) bx = j;
      if (vy != 12345.f && (by < 0 || vy > y[r * ld + by])) by = j;
    }
    if (bx != by && !(bx >= 0 && by >= 0 && std::abs(x[r * ld + bx] - x[r * ld + by]) <= 1e-3f)) ++bad;
  }
  std::printf("  rows whose top block differs: %lld\n", (long long)bad);
  return bad;
}

template <int kDim>
int64_t run(int64_t L) {
  constexpr int kKinds = 5;  // HMMA, wgmma, pipelined wgmma, warp-specialised (ping-pong on, off)
  const char* names[kKinds] = {"HMMA      ", "wgmma     ", "wgmma pipe", "ws        ", "ws no pp  "};
  const int Hkv = 4, Di = kDim, B = 128;
  const int64_t nb = (L + B - 1) / B, ld = (nb + 3) / 4 * 4, rows = Hkv * L, n = rows * ld;
  uint16_t *qi, *ki;
  int32_t* cu;
  float *sc[kKinds], *ls[kKinds];
  CHECK(cudaMalloc(&qi, L * Hkv * Di * 2));
  CHECK(cudaMalloc(&ki, L * Di * 2));
  CHECK(cudaMalloc(&cu, 8));
  for (int k = 0; k < kKinds; ++k) {
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
  s.ld = ld; s.total_q = L; s.total_k = L;
  BlockScoreArgs sk[kKinds] = {s, s, s, s, s};
  for (int k = 0; k < kKinds; ++k) { sk[k].scores = sc[k]; sk[k].lses = ls[k]; }
  const dim3 grid = block_score_grid(s, kScoreRows, L, 1);
  WsBlockScoreParams wp[2]{};
  dim3 grid_ws;
  for (int v = 0; v < 2; ++v) {
    msa::TensorView kv;
    kv.data = ki; kv.dtype = msa::DType::bf16; kv.ndim = 3;
    kv.shape[0] = L; kv.shape[1] = 1; kv.shape[2] = Di;
    kv.stride[0] = Di; kv.stride[1] = Di; kv.stride[2] = 1;
    if (!msa::detail::cuda::encode_rows_map(&wp[v].ki_map, kv, kWsBoxElems, 1, 128)) {
      std::printf("tensor map refused\n");
      return 1;
    }
    grid_ws = block_score_grid(sk[3 + v], kWsRows, L, 1);
    wp[v].a = sk[3 + v];
    wp[v].pingpong = v == 0;
  }
  const size_t smem_ws = WsScoreTraits<true, kDim, 128>::kSmemBytes;
  CHECK(cudaFuncSetAttribute(block_scores_ws_kernel<true, false, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_ws)));
  CHECK(cudaFuncSetAttribute(block_scores_ws_kernel<true, true, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_ws)));

  const size_t smem_h = block_score_smem_bytes(Di);
  const size_t smem_w = WgmmaScoreTraits<true, kDim, 128>::kSmemBytes;
  const size_t smem_p = WgmmaScoreTraits<true, kDim, 128, kPipeStages>::kSmemBytes;
  CHECK(cudaFuncSetAttribute(block_scores_kernel<true, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_h)));
  CHECK(cudaFuncSetAttribute(block_scores_kernel<true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_h)));
  CHECK(cudaFuncSetAttribute(block_scores_wgmma_kernel<true, false, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_w)));
  CHECK(cudaFuncSetAttribute(block_scores_wgmma_kernel<true, true, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_w)));
  CHECK(cudaFuncSetAttribute(block_scores_wgmma_pipe_kernel<true, false, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_p)));
  CHECK(cudaFuncSetAttribute(block_scores_wgmma_pipe_kernel<true, true, kDim, 128>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_p)));
  auto launch = [&](int kind, bool lse) {
    const BlockScoreArgs& x = sk[kind];
    if (kind == 0 && lse) block_scores_kernel<true, true><<<grid, kScoreThreads, smem_h>>>(x);
    else if (kind == 0) block_scores_kernel<true, false><<<grid, kScoreThreads, smem_h>>>(x);
    else if (kind == 1 && lse) block_scores_wgmma_kernel<true, true, kDim, 128><<<grid, kWgmmaThreads, smem_w>>>(x);
    else if (kind == 1) block_scores_wgmma_kernel<true, false, kDim, 128><<<grid, kWgmmaThreads, smem_w>>>(x);
    else if (kind == 2 && lse) block_scores_wgmma_pipe_kernel<true, true, kDim, 128><<<grid, kWgmmaThreads, smem_p>>>(x);
    else if (kind == 2) block_scores_wgmma_pipe_kernel<true, false, kDim, 128><<<grid, kWgmmaThreads, smem_p>>>(x);
    else if (lse) block_scores_ws_kernel<true, true, kDim, 128><<<grid_ws, kWsThreads, smem_ws>>>(wp[kind - 3]);
    else block_scores_ws_kernel<true, false, kDim, 128><<<grid_ws, kWsThreads, smem_ws>>>(wp[kind - 3]);
  };

  // Outputs first (sentinel-filled, one LSE run each), then timings.
  for (int k = 0; k < kKinds; ++k) {
    fill_value<<<4096, 256>>>(sc[k], n, 12345.f);
    fill_value<<<4096, 256>>>(ls[k], n, 12345.f);
  }
  for (int k = 0; k < kKinds; ++k) launch(k, true);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> h[kKinds], l[kKinds];
  for (int k = 0; k < kKinds; ++k) {
    h[k].resize(size_t(n));
    l[k].resize(size_t(n));
    CHECK(cudaMemcpy(h[k].data(), sc[k], n * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(l[k].data(), ls[k], n * 4, cudaMemcpyDeviceToHost));
  }
  std::printf("L=%lld Di=%d:\n", (long long)L, Di);
  int64_t bad = 0;
  for (int k = 1; k < kKinds; ++k) {
    std::printf(" %s vs HMMA\n", names[k]);
    bad += count_mismatches(h[0], h[k], "block scores") + count_mismatches(l[0], l[k], "block LSEs");
    bad += count_argmax_changes(h[0], h[k], ld);
  }

  const int reps = L > 65536 ? 5 : 10;
  const double flops = 2.0 * Hkv * Di * (double(L) * (L + 1) / 2);
  for (int k = 0; k < kKinds; ++k) {
    const float t = median_ms([&] { launch(k, false); }, reps, 1);
    const float tl = median_ms([&] { launch(k, true); }, reps, 1);
    CHECK(cudaGetLastError());
    std::printf("  %s %8.3f ms (%4.0f TFLOP/s useful), with block LSE %8.3f ms (%4.0f TFLOP/s)\n", names[k], t,
                flops / t / 1e9, tl, flops / tl / 1e9);
  }
  cudaFree(qi); cudaFree(ki); cudaFree(cu);
  for (int k = 0; k < kKinds; ++k) { cudaFree(sc[k]); cudaFree(ls[k]); }
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
