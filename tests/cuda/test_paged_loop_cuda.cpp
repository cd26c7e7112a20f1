// The serving loop of tests/paged_loop.h on the CUDA backend: one device cache carried across a prefill
// step and 12 speculative decode steps, so each step's append writes into pages that earlier steps'
// appends filled and each run reads them. Per step, against the contiguous CPU API on the same tokens:
// the local slot and the selected sets (a block only the GPU chose must score, in float64, within
// rounding of the weakest block the CPU chose), and out / lse of the rows whose selections agree.
// Both page layouts, under both attention kernels.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "cuda/device_tensor.h"
#include "kernel_env.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "paged_compare.h"
#include "paged_loop.h"

namespace msa {
namespace {

using testing::DeviceTensor;
using testing::KvLayout;

Config loop_config() { return testing::make_config(16, 2, 64, 32, 16, 4); }

// Block score of (query row, group, block j) in float64 over the keys the query sees.
double block_score(const testing::TestProblem& p, int r, int64_t row, int g, int64_t j) {
  const Config& c = p.cfg;
  const int B = c.block_size, Di = c.index_head_dim, hkv = c.num_kv_heads;
  const int64_t q_len = p.lens.cu_q[size_t(r) + 1] - p.lens.cu_q[size_t(r)];
  const int64_t kv_len = p.lens.cu_k[size_t(r) + 1] - p.lens.cu_k[size_t(r)];
  const int64_t pos = rules::query_position(q_len, kv_len, row - p.lens.cu_q[size_t(r)]);
  const double iscale = c.index_softmax_scale();
  double best = -INFINITY;
  for (int64_t t = j * B; t < std::min<int64_t>((j + 1) * B, pos + 1); ++t) {
    double dot = 0;
    for (int d = 0; d < Di; ++d)
      dot += double(float(p.qi.get((row * hkv + g) * Di + d)) * float(iscale)) *
             p.ki.get((p.lens.cu_k[size_t(r)] + t) * Di + d);
    best = std::max(best, dot);
  }
  return best;
}

// The GPU step against the contiguous CPU API: selections up to near-ties, then outputs of the rows
// whose selections agree.
void expect_step_matches(testing::TestProblem& p, const testing::PagedOutputs& got) {
  const testing::PagedOutputs want = testing::run_contiguous(p, false);
  const Config& c = p.cfg;
  const int64_t tq = p.total_q();
  const int K = c.topk, hkv = c.num_kv_heads, G = c.group_size(), D = c.head_dim;
  std::vector<char> agree(size_t(tq * hkv), 1);
  int64_t near_ties = 0;
  for (int r = 0; r + 1 < int(p.lens.cu_q.size()); ++r)
    for (int64_t row = p.lens.cu_q[size_t(r)]; row < p.lens.cu_q[size_t(r) + 1]; ++row)
      for (int g = 0; g < hkv; ++g) {
        auto at = [&](const HostTensor& t, int s) { return int32_t(t.get((int64_t(g) * tq + row) * K + s)); };
        std::set<int32_t> a, b;
        for (int s = 0; s < K; ++s) {
          a.insert(at(got.topk, s));
          b.insert(at(want.topk, s));
        }
        const int n = int(std::count_if(b.begin(), b.end(), [](int32_t x) { return x >= 0; })) - 1;
        ASSERT_EQ(at(got.topk, n), at(want.topk, n)) << "local slot, group " << g << " row " << row;
        ASSERT_EQ(std::count_if(a.begin(), a.end(), [](int32_t x) { return x >= 0; }), n + 1)
            << "selected blocks, group " << g << " row " << row;
        if (a == b) continue;
        double weakest = INFINITY;
        for (int32_t j : b)
          if (j >= 0 && j != at(want.topk, n)) weakest = std::min(weakest, block_score(p, r, row, g, j));
        for (int32_t j : a)
          if (j >= 0 && !b.count(j))
            ASSERT_GE(block_score(p, r, row, g, j), weakest - 1e-3 * (1 + std::fabs(weakest)))
                << "group " << g << " row " << row << ": block " << j << " is not a near-tie";
        agree[size_t(row * hkv + g)] = 0;
        ++near_ties;
      }
  EXPECT_LE(near_ties, std::max<int64_t>(2, tq * hkv / 10)) << "too many near-tied selections";
  double num = 0, den = 0, lse_err = 0;
  for (int64_t row = 0; row < tq; ++row)
    for (int h = 0; h < c.num_q_heads; ++h) {
      if (!agree[size_t(row * hkv + h / G)]) continue;
      for (int d = 0; d < D; ++d) {
        const double x = got.out.get((row * c.num_q_heads + h) * D + d), y = want.out.get((row * c.num_q_heads + h) * D + d);
        ASSERT_TRUE(std::isfinite(x)) << "out[" << row << ", " << h << ", " << d << "]";
        num += (x - y) * (x - y);
        den += y * y;
      }
      lse_err = std::max(lse_err, std::fabs(got.lse.get(row * c.num_q_heads + h) - want.lse.get(row * c.num_q_heads + h)));
    }
  EXPECT_LT(std::sqrt(num / std::max(den, 1e-300)), 1e-2) << "out relative error (rows whose selections agree)";
  EXPECT_LT(lse_err, 1e-1) << "max |lse - cpu lse|";
}

void run_loop(KvLayout layout) {
  const auto steps = testing::loop_schedule();
  testing::ServingLoop loop(loop_config(), DType::bf16, layout, testing::final_lengths(steps), 99);
  DeviceTensor k_cache(loop.k_cache), v_cache(loop.v_cache), ki_cache(loop.ki_cache);
  const PagedKVCache cache = loop.cache(k_cache.view(), v_cache.view(), ki_cache.view());
  for (size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i) + (i ? " (decode)" : " (prefill)"));
    testing::LoopStep s = loop.next(steps[i]);
    const PagedPlan plan = paged_plan(loop.cfg, s.q_lens.data(), s.kv_lens.data(), int(s.q_lens.size()), DType::bf16,
                                      Device::cuda(0));
    DeviceTensor table(s.table), cu_q(s.cu_q), kv(s.kv), k_new(s.k_new), v_new(s.v_new), ki_new(s.ki_new);
    DeviceTensor q(s.ref.q), qi(s.ref.qi);
    testing::PagedOutputs got(loop.cfg, s.ref.total_q(), DType::bf16);
    DeviceTensor out(got.out), lse(got.lse), topk(got.topk);
    void* ws = nullptr;
    MSA_TEST_CUDA(cudaMalloc(&ws, plan.workspace_bytes));
    Context ctx;
    ctx.workspace = {ws, plan.workspace_bytes};
    const PagedBatch b{cu_q.view(), kv.view(), table.view()};
    paged_append_kv(plan, b, k_new.view(), v_new.view(), ki_new.view(), cache, ctx);
    paged_run(plan, b, q.view(), qi.view(), cache, out.view(), lse.view(), topk.view(), ctx);
    MSA_TEST_CUDA(cudaDeviceSynchronize());
    cudaFree(ws);
    out.download();
    lse.download();
    topk.download();
    expect_step_matches(s.ref, got);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(PagedCudaLoop, PrefillThenSpeculativeDecodeSteps) {
  MSA_SKIP_WITHOUT_GPU();
  for (const char* kernel : {"ffma", "mma"})
    for (KvLayout layout : {KvLayout::token_major, KvLayout::head_major}) {
      testing::ScopedKernelEnv env("MSA_PAGED_ATTENTION_KERNEL", kernel);
      SCOPED_TRACE(std::string(kernel) + " " + testing::kv_layout_name(layout));
      run_loop(layout);
      if (HasFatalFailure()) return;
    }
}

}  // namespace
}  // namespace msa
