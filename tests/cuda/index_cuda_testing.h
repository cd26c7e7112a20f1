// Shared by the CUDA index-branch tests: one case (config, ragged lengths, dtype, options) run on
// the GPU and checked against the float64 oracle (src/reference): the selected set per
// (group, query) up to near-ties, the local block in its slot, -1 padding, and the selected LSE.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/host_tensor.h"
#include "cuda/device_tensor.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "reference/oracle.h"

namespace msa {
namespace testing {

struct IndexCase {
  Config cfg;
  std::vector<int32_t> q_lengths, k_lengths;
  DType dtype = DType::bf16;
  float temperature = 1.f;
  bool want_lse = true;
  int row_pad = 0;             // extra elements per qi / ki row: strided (non-packed) inputs
  bool give_bounds = false;    // pass max_seqlen_* and host cu_seqlens, else the backend finds them
  bool give_workspace = false;  // caller-planned workspace instead of the backend's own
};

inline Config index_config(int hkv, int di, int block, int k) {
  Config c;
  c.num_kv_heads = hkv;
  c.num_q_heads = hkv;
  c.head_dim = 8;
  c.index_head_dim = di;
  c.block_size = block;
  c.topk = k;
  return c;
}

inline void run_case(const IndexCase& tc, uint64_t seed) {
  const Config& cfg = tc.cfg;
  reference::Lengths lens;
  lens.cu_q = prefix_sums(tc.q_lengths);
  lens.cu_k = prefix_sums(tc.k_lengths);
  const int64_t tq = lens.total_q(), tk = lens.total_k();
  const int H = cfg.num_kv_heads, Di = cfg.index_head_dim, K = cfg.topk;

  std::mt19937_64 rng(seed);
  HostTensor qi(tc.dtype, {tq, H, Di + tc.row_pad}), ki(tc.dtype, {tk, Di + tc.row_pad});
  qi.fill_normal(rng);
  ki.fill_normal(rng);
  std::vector<double> qi_d(size_t(tq) * H * Di), ki_d(size_t(tk) * Di);
  for (int64_t r = 0; r < tq * H; ++r)
    for (int d = 0; d < Di; ++d) qi_d[size_t(r * Di + d)] = qi.get(r * (Di + tc.row_pad) + d);
  for (int64_t r = 0; r < tk; ++r)
    for (int d = 0; d < Di; ++d) ki_d[size_t(r * Di + d)] = ki.get(r * (Di + tc.row_pad) + d);

  const int64_t nb = int64_t(lens.cu_q.size());
  HostTensor cu_q(DType::i32, {nb}), cu_k(DType::i32, {nb});
  for (int64_t b = 0; b < nb; ++b) {
    cu_q.set(b, lens.cu_q[size_t(b)]);
    cu_k.set(b, lens.cu_k[size_t(b)]);
  }
  HostTensor topk(DType::i32, {H, tq, K}), lse(DType::f32, {H, tq});
  topk.poison();
  lse.poison();

  DeviceTensor d_qi(qi), d_ki(ki), d_cu_q(cu_q), d_cu_k(cu_k), d_topk(topk), d_lse(lse);
  TensorView v_qi = d_qi.view(), v_ki = d_ki.view();
  v_qi.shape[2] = Di;  // a view of the first Di channels of each (padded) row
  v_ki.shape[1] = Di;
  Varlen varlen;
  varlen.cu_seqlens_q = d_cu_q.view();
  varlen.cu_seqlens_k = d_cu_k.view();
  if (tc.give_bounds) {
    varlen.max_seqlen_q = *std::max_element(tc.q_lengths.begin(), tc.q_lengths.end());
    varlen.max_seqlen_k = *std::max_element(tc.k_lengths.begin(), tc.k_lengths.end());
    varlen.host_cu_seqlens_q = lens.cu_q.data();
    varlen.host_cu_seqlens_k = lens.cu_k.data();
  }
  Context ctx;
  void* ws = nullptr;
  if (tc.give_workspace) {
    const std::size_t bytes =
        workspace_bytes(Op::index_topk, cfg, varlen, tq, tk, Device::cuda(0));
    ASSERT_GT(bytes, 0u);
    MSA_TEST_CUDA(cudaMalloc(&ws, bytes));
    ctx.workspace = {ws, bytes};
  }
  index_topk(cfg, varlen, v_qi, v_ki, d_topk.view(), tc.want_lse ? d_lse.view() : TensorView{},
             tc.temperature, ctx);
  MSA_TEST_CUDA(cudaDeviceSynchronize());
  if (ws) cudaFree(ws);
  d_topk.download();
  d_lse.download();

  int64_t set_differences = 0;
  for (int g = 0; g < H; ++g)
    for (int64_t row = 0; row < tq; ++row) {
      const reference::IndexRow ref =
          reference::index_row(cfg, lens, qi_d.data(), ki_d.data(), row, g, tc.temperature);
      const int64_t local = int64_t(ref.block_scores.size()) - 1;
      const int n = rules::local_slot(local, K);
      const int64_t base = (int64_t(g) * tq + row) * K;
      SCOPED_TRACE("group " + std::to_string(g) + " row " + std::to_string(row) + " local " +
                   std::to_string(local));
      ASSERT_EQ(topk.get(base + n), local);
      for (int s = n + 1; s < K; ++s) ASSERT_EQ(topk.get(base + s), rules::kUnusedSlot);
      std::vector<double> candidates(ref.block_scores.begin(), ref.block_scores.end() - 1);
      std::sort(candidates.begin(), candidates.end(), std::greater<double>());
      std::set<int64_t> got, want;
      for (int s = 0; s < n; ++s) {
        const int64_t id = int64_t(topk.get(base + s));
        ASSERT_GE(id, 0);
        ASSERT_LT(id, local);
        got.insert(id);
        want.insert(ref.topk[size_t(s)]);
        // Near-ties may swap: a chosen block must score within 1e-3 of the n-th best.
        const double kth = candidates[size_t(n - 1)];
        ASSERT_GE(ref.block_scores[size_t(id)], kth - 1e-3 * std::max(1.0, std::abs(kth)));
      }
      ASSERT_EQ(got.size(), size_t(n)) << "duplicate ids";
      if (got != want) {
        ++set_differences;
        continue;  // the LSE is over a (legitimately) different set
      }
      if (tc.want_lse) {
        const double v = lse.get(int64_t(g) * tq + row);
        ASSERT_TRUE(std::isfinite(v));
        ASSERT_NEAR(v, ref.selected_lse, 1e-3 * std::max(1.0, std::abs(ref.selected_lse)));
      }
    }
  EXPECT_LE(set_differences, std::max<int64_t>(1, H * tq / 100)) << "too many near-tie swaps";
}


// Case shapes run against both stage-1 kernels (test_index_topk_cuda.cpp: HMMA;
// test_index_topk_wgmma_cuda.cpp: wgmma), each file with its own seeds.

inline void run_ragged_prefill_chunked_decode_case(uint64_t seed) {  // bf16, Hkv 4, Di 128
  IndexCase tc;
  tc.cfg = index_config(4, 128, 128, 16);
  tc.q_lengths = {1, 127, 128, 129, 700, 200, 3, 16};
  tc.k_lengths = {1, 127, 128, 129, 700, 2500, 3000, 2200};
  run_case(tc, seed);
}

inline void run_f16_hkv1_temperature_host_bounds_case(uint64_t seed) {  // Di 128
  IndexCase tc;
  tc.cfg = index_config(1, 128, 128, 16);
  tc.dtype = DType::f16;
  tc.temperature = 0.7f;
  tc.give_bounds = true;
  tc.q_lengths = {129, 1, 300, 5};
  tc.k_lengths = {129, 1000, 2400, 2049};
  run_case(tc, seed);
}

inline void run_bf16_hkv8_di64_no_lse_caller_workspace_case(uint64_t seed) {
  IndexCase tc;
  tc.cfg = index_config(8, 64, 128, 16);
  tc.want_lse = false;
  tc.give_workspace = true;
  tc.q_lengths = {255, 2, 40};
  tc.k_lengths = {255, 2300, 2100};
  run_case(tc, seed);
}

inline void run_over_two_thousand_blocks_case(uint64_t seed) {
  IndexCase tc;
  tc.cfg = index_config(2, 128, 16, 16);
  tc.q_lengths = {8, 33};
  tc.k_lengths = {40000, 33};  // 2500 blocks of 16
  run_case(tc, seed);
}

// Seeds seed_base + Di.
inline void run_small_blocks_padded_and_scalar_head_dims_case(uint64_t seed_base) {
  for (int di : {24, 20}) {  // 24: zero-padded (to the MMA k-step, or to 64 for wgmma); 20: scalar loads
    IndexCase tc;
    tc.cfg = index_config(3, di, 8, 4);
    tc.q_lengths = {7, 8, 9, 60, 4};
    tc.k_lengths = {7, 8, 9, 100, 90};
    SCOPED_TRACE("Di " + std::to_string(di));
    run_case(tc, seed_base + di);
  }
}

// Seeds seed and seed + 1.
inline void run_blocks_wider_than_one_chunk_and_large_k_case(uint64_t seed) {
  IndexCase wide;  // B = 200: a block spans two key chunks; pooling and LSE must join them
  wide.cfg = index_config(4, 32, 200, 4);
  wide.temperature = 1.3f;
  wide.q_lengths = {1, 199, 201, 60};
  wide.k_lengths = {1, 199, 201, 1300};
  run_case(wide, seed);
  IndexCase many;  // k - 1 > 32: the round-by-round fallback selection
  many.cfg = index_config(2, 32, 8, 40);
  many.q_lengths = {300, 5};
  many.k_lengths = {300, 600};
  run_case(many, seed + 1);
}

// Seeds seed and seed + 1.
inline void run_strided_rows_case(uint64_t seed) {
  IndexCase tc;
  tc.cfg = index_config(4, 128, 32, 16);
  tc.row_pad = 8;  // rows 16-byte aligned but not packed
  tc.q_lengths = {100, 1};
  tc.k_lengths = {700, 650};
  run_case(tc, seed);
  tc.row_pad = 3;  // misaligned rows: the scalar load path
  run_case(tc, seed + 1);
}

}  // namespace testing
}  // namespace msa
