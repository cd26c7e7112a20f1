// CUDA paged_run with page ids outside the cache. The CPU rejects them (ArgumentError, PagedValidation);
// the device cannot throw from a captured kernel, so the rows that would read such a page come out NaN
// (out and lse), and every other request's rows are bitwise those of the same run with a valid table.
// Sparse (the index ranks a bad block first, so it is selected) and dense mode; one key split and
// many (the merge); both attention kernels; the three index kernels.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda/device_tensor.h"
#include "kernel_env.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "paged_fixture.h"

namespace msa {
namespace {

using testing::DeviceTensor;
using testing::PagedStep;

struct Outputs {
  HostTensor out, lse, topk;
  Outputs(const Config& c, int64_t tq)
      : out(DType::bf16, {tq, c.num_q_heads, c.head_dim}), lse(DType::f32, {tq, c.num_q_heads}),
        topk(DType::i32, {c.num_kv_heads, tq, c.topk}) {}
};

// Appends the step's tokens with the valid table, then runs with `table` (valid or not).
void run_on_gpu(PagedStep& s, const PagedOptions& opt, HostTensor& table, Outputs& o) {
  const Config& cfg = s.p.cfg;
  const PagedPlan plan = paged_plan(cfg, s.q_lens.data(), s.kv_lens.data(), int(s.q_lens.size()), DType::bf16,
                                    Device::cuda(0), opt);
  DeviceTensor k(s.k_cache), v(s.v_cache), ki(s.ki_cache), pt(s.page_table), bad_pt(table), cu_q(s.cu_q),
      kv(s.kv), q(s.p.q), qi(s.p.qi), k_new(s.k_new), v_new(s.v_new), ki_new(s.ki_new);
  DeviceTensor out(o.out), lse(o.lse), topk(o.topk);
  void* ws = nullptr;
  MSA_TEST_CUDA(cudaMalloc(&ws, plan.workspace_bytes ? plan.workspace_bytes : 1));
  Context ctx;
  ctx.workspace = {ws, plan.workspace_bytes};
  const PagedKVCache cache{k.view(), v.view(), ki.view(), {}, {}, {}};
  paged_append_kv(plan, {cu_q.view(), kv.view(), pt.view()}, k_new.view(), v_new.view(), ki_new.view(), cache, ctx);
  paged_run(plan, {cu_q.view(), kv.view(), bad_pt.view()}, q.view(), qi.view(), cache, out.view(), lse.view(),
            topk.view(), ctx);
  MSA_TEST_CUDA(cudaDeviceSynchronize());
  out.download();
  lse.download();
  topk.download();
  cudaFree(ws);
}

void check_bad_pages(bool dense, int num_workers) {
  const Config cfg = testing::make_config(16, 2, 64, 32, 16, 4);
  const int B = cfg.block_size;
  const std::vector<int32_t> q_lens = {1, 3, 2, 4}, kv_lens = {5 * B + 3, 3 * B + 1, 6 * B, 2 * B + 5};
  PagedStep s(cfg, q_lens, kv_lens, DType::bf16, /*seed=*/41, 3, testing::KvLayout::token_major);
  HostTensor bad = s.page_table;
  bad.set(0 * s.width + 1, double(s.num_pages));  // request 0, an older block
  bad.set(2 * s.width + 5, -1);                    // request 2, its local block
  const int64_t tq = s.p.total_q();
  PagedOptions opt;
  opt.dense = dense;
  opt.num_workers = num_workers;
  Outputs good(cfg, tq), got(cfg, tq);
  run_on_gpu(s, opt, s.page_table, good);
  run_on_gpu(s, opt, bad, got);

  const int hq = cfg.num_q_heads, D = cfg.head_dim;
  for (int r = 0; r < int(q_lens.size()); ++r) {
    const bool poisoned = r == 0 || r == 2;
    for (int64_t row = s.p.lens.cu_q[r]; row < s.p.lens.cu_q[r + 1]; ++row)
      for (int h = 0; h < hq; ++h) {
        const int64_t l = row * hq + h;
        if (poisoned) {
          ASSERT_TRUE(std::isnan(got.lse.get(l))) << "lse[" << row << ", " << h << "] = " << got.lse.get(l);
          for (int e = 0; e < D; ++e)
            ASSERT_TRUE(std::isnan(got.out.get(l * D + e))) << "out[" << row << ", " << h << ", " << e << "]";
        } else {
          ASSERT_EQ(got.lse.get(l), good.lse.get(l)) << "lse[" << row << ", " << h << "] of a valid request";
          for (int e = 0; e < D; ++e)
            ASSERT_EQ(got.out.get(l * D + e), good.out.get(l * D + e)) << "out[" << row << ", " << h << ", " << e << "]";
        }
      }
  }
  if (dense) return;
  // The bad older block of request 0 is among every group's selection of its query.
  for (int g = 0; g < cfg.num_kv_heads; ++g) {
    bool found = false;
    for (int slot = 0; slot < cfg.topk; ++slot) found |= got.topk.get((int64_t(g) * tq + 0) * cfg.topk + slot) == 1;
    EXPECT_TRUE(found) << "group " << g << ": block 1 (page id outside the cache) not selected";
  }
}

class PagedCudaBadPages : public ::testing::TestWithParam<const char*> {
 protected:
  msa::testing::ScopedKernelEnv index_{"MSA_PAGED_INDEX_KERNEL", GetParam()};
};

TEST_P(PagedCudaBadPages, RowsThatReadThemAreNaN) {
  MSA_SKIP_WITHOUT_GPU();
  for (const char* kernel : {"ffma", "mma"}) {
    testing::ScopedKernelEnv env("MSA_PAGED_ATTENTION_KERNEL", kernel);
    for (bool dense : {false, true})
      for (int workers : {1, 512}) {
        SCOPED_TRACE(std::string(kernel) + (dense ? " dense" : " sparse") + " workers " + std::to_string(workers));
        check_bad_pages(dense, workers);
      }
  }
}

INSTANTIATE_TEST_SUITE_P(IndexKernels, PagedCudaBadPages, ::testing::Values("smem", "stream", "mma"),
                         [](const ::testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

}  // namespace
}  // namespace msa
