// Times the two stages of the CUDA index branch separately (one sequence, Hkv = 4, Di = 128, B = 128,
// k = 16, bf16), and dumps stage 1's block scores so torch.topk can be timed on the same data
// (bench/index_topk_vs_torch.py). Self-contained: launches the kernels from their headers.
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Iinclude -Isrc \
//        bench/index_topk_stages.cu -o index_topk_stages && ./index_topk_stages 32768 131072
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_bench_common.h"
#include "cuda/index_block_scores.cuh"
#include "cuda/index_select.cuh"

using namespace msa::detail::cuda::index;

int main(int argc, char** argv) {
  const int Hkv = 4, Di = 128, B = 128, K = 16;
  for (int ai = 1; ai < argc; ++ai) {
    const int64_t L = std::atoll(argv[ai]);
    const int64_t nb = (L + B - 1) / B, ld = (nb + 3) / 4 * 4, rows = Hkv * L;
    uint16_t *qi, *ki;
    int32_t *cu, *topk;
    float *scores, *lses, *sel_lse;
    CHECK(cudaMalloc(&qi, L * Hkv * Di * 2));
    CHECK(cudaMalloc(&ki, L * Di * 2));
    CHECK(cudaMalloc(&cu, 8));
    CHECK(cudaMalloc(&topk, rows * K * 4));
    CHECK(cudaMalloc(&scores, rows * ld * 4));
    CHECK(cudaMalloc(&lses, rows * ld * 4));
    CHECK(cudaMalloc(&sel_lse, rows * 4));
    const int32_t cu_h[2] = {0, int32_t(L)};
    CHECK(cudaMemcpy(cu, cu_h, 8, cudaMemcpyHostToDevice));
    fill_random_bf16<<<1024, 256>>>(qi, L * Hkv * Di, 1u);
    fill_random_bf16<<<1024, 256>>>(ki, L * Di, 2u);
    // Entries past a row's local block are never written: -inf makes the dump a causal-masked matrix.
    fill_value<<<4096, 256>>>(scores, rows * ld, -INFINITY);
    CHECK(cudaGetLastError());

    BlockScoreArgs s{};
    s.qi = qi; s.qi_s0 = Hkv * Di; s.qi_s1 = Di;
    s.ki = ki; s.ki_s0 = Di;
    s.cu_q = cu; s.cu_k = cu;
    s.num_kv_heads = Hkv; s.head_dim = Di; s.padded_dim = Di; s.block_size = B;
    s.groups_per_cta = Hkv; s.queries_per_cta = kScoreRows / Hkv;
    s.iscale = 1.f / std::sqrt(float(Di)); s.lse_factor = s.iscale;
    s.vector_loads = true;
    s.scores = scores; s.lses = lses; s.ld = ld; s.total_q = L;
    const dim3 grid(unsigned((L + s.queries_per_cta - 1) / s.queries_per_cta), 1, 1);
    const size_t smem = block_score_smem_bytes(Di);
    CHECK(cudaFuncSetAttribute(block_scores_kernel<true, false>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    CHECK(cudaFuncSetAttribute(block_scores_kernel<true, true>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    auto stage1 = [&] { block_scores_kernel<true, false><<<grid, kScoreThreads, smem>>>(s); };
    auto stage1_lse = [&] { block_scores_kernel<true, true><<<grid, kScoreThreads, smem>>>(s); };

    SelectArgs t{};
    t.scores = scores; t.lses = nullptr; t.ld = ld; t.cu_q = cu; t.cu_k = cu; t.batch = 1;
    t.num_kv_heads = Hkv; t.block_size = B; t.k = K; t.total_q = L;
    t.topk = topk; t.topk_s0 = L * K; t.topk_s1 = K;
    const unsigned sel_blocks = unsigned((rows + kSelectWarps - 1) / kSelectWarps);
    auto stage2 = [&] { select_topk_kernel<<<sel_blocks, kSelectWarps * 32>>>(t); };
    SelectArgs tl = t;
    tl.lses = lses; tl.selected_lse = sel_lse; tl.lse_s0 = L; tl.lse_s1 = 1;
    auto stage2_lse = [&] { select_topk_kernel<<<sel_blocks, kSelectWarps * 32>>>(tl); };

    const int reps = L > 65536 ? 5 : 10;
    const float t1l = median_ms(stage1_lse, reps, 1);
    const float t1 = median_ms(stage1, reps, 1);
    const float t2 = median_ms(stage2, 20, 1);
    const float t2l = median_ms(stage2_lse, 20, 1);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    // Useful MMA work: every (row, visible key) pair, 2 * Di flops.
    const double flops = 2.0 * Hkv * Di * (double(L) * (L + 1) / 2);
    std::printf("L=%lld rows=%lld blocks=%lld | stage1 %.3f ms (%.0f TFLOP/s useful), with block LSE "
                "%.3f ms | stage2 top-k %.3f ms, with selected LSE %.3f ms\n",
                (long long)L, (long long)rows, (long long)nb, t1, flops / t1 / 1e9, t1l, t2, t2l);

    // Dump the block scores for the torch.topk comparison.
    std::vector<float> host(size_t(rows * ld));
    CHECK(cudaMemcpy(host.data(), scores, host.size() * 4, cudaMemcpyDeviceToHost));
    char path[256];
    std::snprintf(path, sizeof(path), "/tmp/index_scores_%lld_%lld.f32", (long long)rows,
                  (long long)ld);
    FILE* f = std::fopen(path, "wb");
    std::fwrite(host.data(), 4, host.size(), f);
    std::fclose(f);
    std::printf("dumped %s\n", path);
    cudaFree(qi); cudaFree(ki); cudaFree(cu); cudaFree(topk); cudaFree(scores); cudaFree(lses);
    cudaFree(sel_lse);
  }
  return 0;
}
