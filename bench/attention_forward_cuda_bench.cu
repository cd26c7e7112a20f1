// Times the CUDA attention forward (sparse and dense causal) on one long sequence, Hq=64, Hkv=4,
// D=128, B=128, k=16, bf16, with cudaEvents (warm-up, median of repeats). TFLOP/s counts 4*D FLOPs per
// selected visible key per query head.
//
// Two topk patterns: "shared" (the 4 queries of a CTA tile pick the same 15 earlier blocks, as
// neighbouring queries mostly do with a trained index) and "random" (every query picks its own
// random blocks: the worst case for the union of a tile).
//
// Each variant runs once per kernel, selected through MSA_ATTENTION_KERNEL (the library reads it at
// every call): "mma" (mma.sync) and "wgmma" (the default where compiled in; on other builds or
// devices it silently runs mma.sync too). --kernels mma,wgmma picks them; --dense-max N skips the
// dense variant for L > N (at 128K one dense call takes about 1.5 s).
//
// Build: nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Iinclude -Isrc \
//          bench/attention_forward_cuda_bench.cu build-wgperf/libmsa.a -Xcompiler -fopenmp -o afb
// Run:   ./afb 32768 131072 --dense-max 32768
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench_common.h"
#include "msa/ops.h"
#include "msa/rules.h"

using namespace msa;

int main(int argc, char** argv) {
  Config cfg;  // defaults: Hq 64, Hkv 4, D 128, B 128, k 16
  std::vector<int> lengths;
  std::vector<std::string> kernels = {"mma", "wgmma"};
  long dense_max = -1;  // no limit
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dense-max" && i + 1 < argc) {
      dense_max = std::atol(argv[++i]);
    } else if (a == "--kernels" && i + 1 < argc) {
      kernels.clear();
      std::string list = argv[++i];
      for (std::size_t b = 0, e; b <= list.size(); b = e + 1) {
        e = list.find(',', b);
        if (e == std::string::npos) e = list.size();
        if (e > b) kernels.push_back(list.substr(b, e - b));
      }
    } else {
      lengths.push_back(std::atoi(argv[i]));
    }
  }
  if (lengths.empty()) lengths = {32768, 131072};
  // Times f once per kernel; prints one line each.
  auto time_kernels = [&](int L, const char* variant, double flops, int reps, int warmups, auto f) {
    for (const std::string& kname : kernels) {
      setenv("MSA_ATTENTION_KERNEL", kname.c_str(), 1);
      const float ms = median_ms(f, reps, warmups);
      std::printf("%-8d %-14s %-6s %10.3f %10.1f\n", L, variant, kname.c_str(), ms, flops / (ms * 1e-3) / 1e12);
      std::fflush(stdout);
    }
  };
  std::printf("%-8s %-14s %-6s %10s %10s\n", "L", "variant", "kernel", "ms", "TFLOP/s");
  for (int L : lengths) {
    const int64_t Hq = cfg.num_q_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim, B = cfg.block_size;
    const int K = cfg.topk;
    std::mt19937_64 rng(1);
    std::vector<uint16_t> hq(size_t(L) * Hq * D), hkv(size_t(L) * Hkv * D);
    std::normal_distribution<float> nd;
    auto bf = [](float x) { __nv_bfloat16 b = __float2bfloat16(x); return *reinterpret_cast<uint16_t*>(&b); };
    for (auto& x : hq) x = bf(nd(rng));
    for (auto& x : hkv) x = bf(nd(rng));
    void *q, *k, *v, *out, *lse, *topk, *cu;
    CHECK(cudaMalloc(&q, hq.size() * 2));
    CHECK(cudaMalloc(&k, hkv.size() * 2));
    CHECK(cudaMalloc(&v, hkv.size() * 2));
    CHECK(cudaMalloc(&out, hq.size() * 2));
    CHECK(cudaMalloc(&lse, size_t(L) * Hq * 4));
    CHECK(cudaMalloc(&topk, size_t(Hkv) * L * K * 4));
    CHECK(cudaMalloc(&cu, 8));
    CHECK(cudaMemcpy(q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(k, hkv.data(), hkv.size() * 2, cudaMemcpyHostToDevice));
    for (auto& x : hkv) x = bf(nd(rng));
    CHECK(cudaMemcpy(v, hkv.data(), hkv.size() * 2, cudaMemcpyHostToDevice));
    const int32_t hcu[2] = {0, L};
    CHECK(cudaMemcpy(cu, hcu, 8, cudaMemcpyHostToDevice));
    Varlen vl;
    vl.cu_seqlens_q = TensorView::contiguous(cu, DType::i32, {2}, Device::cuda());
    vl.cu_seqlens_k = vl.cu_seqlens_q;
    vl.max_seqlen_q = vl.max_seqlen_k = L;
    auto view = [](void* p, DType t, std::initializer_list<int64_t> s) {
      return TensorView::contiguous(p, t, s, Device::cuda());
    };
    TensorView tq = view(q, DType::bf16, {L, Hq, D}), tk = view(k, DType::bf16, {L, Hkv, D}),
               tv = view(v, DType::bf16, {L, Hkv, D}), to = view(out, DType::bf16, {L, Hq, D}),
               tl = view(lse, DType::f32, {L, Hq}), tt = view(topk, DType::i32, {Hkv, L, K});

    for (int shared = 1; shared >= 0; --shared) {
      std::vector<int32_t> ht(size_t(Hkv) * L * K, -1);
      double keys = 0;
      std::vector<int32_t> pick;
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t i = 0; i < L; ++i) {
          const int64_t local = rules::local_block(i, int(B));
          const int n = rules::num_nonlocal_selected(local, K);
          const int tile_q = int(64 / (Hq / Hkv));
          if (!shared || i % tile_q == 0 || int(pick.size()) > n) {
            pick.clear();  // n distinct ids below local, by rejection (n <= 15)
            while (int(pick.size()) < n) {
              const int32_t id = int32_t(rng() % uint64_t(local));
              if (std::find(pick.begin(), pick.end(), id) == pick.end()) pick.push_back(id);
            }
          }
          int32_t* row = ht.data() + (g * L + i) * K;
          int s = 0;
          for (int32_t id : pick) if (id < local && s < n) row[s++] = id;
          row[s] = int32_t(local);
          keys += double(s) * B + double(i - local * B + 1);
        }
      CHECK(cudaMemcpy(topk, ht.data(), ht.size() * 4, cudaMemcpyHostToDevice));
      const double flops = keys / double(Hkv) * double(Hq) * 4.0 * double(D);
      time_kernels(L, shared ? "sparse-shared" : "sparse-random", flops, 10, 3,
                   [&] { sparse_attention_forward(cfg, vl, tq, tk, tv, tt, to, tl); });
    }
    const double dflops = double(L) * (double(L) + 1) / 2 * double(Hq) * 4.0 * double(D);
    if (dense_max < 0 || L <= dense_max)
      time_kernels(L, "dense", dflops, 5, 3, [&] { dense_attention_forward(cfg, vl, tq, tk, tv, to, tl); });
    CHECK(cudaGetLastError());
    for (void* p : {q, k, v, out, lse, topk, cu}) CHECK(cudaFree(p));
  }
  return 0;
}
