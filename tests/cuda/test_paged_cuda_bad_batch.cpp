// CUDA paged calls on a batch the plan does not describe; the CPU rejects both cases below with an
// ArgumentError (PagedValidation), a captured GPU kernel cannot throw:
//  - page ids outside the cache: the rows that would read such a page come out NaN (out and lse), and
//    every other request's rows are bitwise those of the same run with a valid table. Sparse (the
//    index ranks a bad block first, so it is selected) and dense mode; one key split and many (the
//    merge kernel); both attention kernels; the three index kernels.
//  - device lengths unlike the plan's (larger cu_seqlens_q / kv_lens): append and run stay inside
//    every buffer (the kernels clamp them to the plan's maxima); checked with guard rows after out,
//    lse and topk, and by memcheck, which runs every PagedCuda* test.
// paged_check_batch, which reads the batch back, turns both into the CPU's ArgumentError on demand.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/device_tensor.h"
#include "expect_argument.h"
#include "kernel_env.h"
#include "msa/error.h"
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

// Device copies of a bf16 token-major step's caches, page table, lengths, queries and new rows, and a
// workspace of `ws_bytes`.
struct StepOnDevice {
  DeviceTensor k, v, ki, pt, cu_q, kv, q, qi, k_new, v_new, ki_new;
  void* ws = nullptr;
  Context ctx;
  StepOnDevice(PagedStep& s, std::size_t ws_bytes)
      : k(s.k_cache), v(s.v_cache), ki(s.ki_cache), pt(s.page_table), cu_q(s.cu_q), kv(s.kv), q(s.p.q),
        qi(s.p.qi), k_new(s.k_new), v_new(s.v_new), ki_new(s.ki_new) {
    if (cudaMalloc(&ws, ws_bytes ? ws_bytes : 1) != cudaSuccess) throw std::runtime_error("cudaMalloc");
    ctx.workspace = {ws, ws_bytes};
  }
  ~StepOnDevice() { cudaFree(ws); }
  PagedKVCache cache() const { return {k.view(), v.view(), ki.view(), {}, {}, {}}; }
  // Appends the new rows with `batch`, then runs the layer with it.
  void step(const PagedPlan& plan, const PagedBatch& batch, const TensorView& out, const TensorView& lse,
            const TensorView& topk) {
    paged_append_kv(plan, batch, k_new.view(), v_new.view(), ki_new.view(), cache(), ctx);
    paged_run(plan, batch, q.view(), qi.view(), cache(), out, lse, topk, ctx);
    MSA_TEST_CUDA(cudaDeviceSynchronize());
  }
};

// Appends the step's tokens with the valid table, then runs with `table` (valid or not).
void run_on_gpu(PagedStep& s, const PagedOptions& opt, HostTensor& table, Outputs& o) {
  const PagedPlan plan = paged_plan(s.p.cfg, s.q_lens.data(), s.kv_lens.data(), int(s.q_lens.size()), DType::bf16,
                                    Device::cuda(0), opt);
  StepOnDevice d(s, plan.workspace_bytes);
  DeviceTensor bad_pt(table), out(o.out), lse(o.lse), topk(o.topk);
  paged_append_kv(plan, {d.cu_q.view(), d.kv.view(), d.pt.view()}, d.k_new.view(), d.v_new.view(), d.ki_new.view(),
                  d.cache(), d.ctx);
  paged_run(plan, {d.cu_q.view(), d.kv.view(), bad_pt.view()}, d.q.view(), d.qi.view(), d.cache(), out.view(),
            lse.view(), topk.view(), d.ctx);
  MSA_TEST_CUDA(cudaDeviceSynchronize());
  out.download();
  lse.download();
  topk.download();
}

// Index of the first element at or after `from` whose bytes differ between `got` and `before`, or -1.
int64_t first_changed(HostTensor& got, HostTensor& before, int64_t from) {
  const std::size_t es = dtype_size(got.dtype());
  for (int64_t i = from; i < got.numel(); ++i)
    if (std::memcmp(static_cast<const char*>(got.data()) + i * es, static_cast<const char*>(before.data()) + i * es,
                    es) != 0)
      return i;
  return -1;
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

// Three requests (one decode token, chunks of 3 and 2 queries) over 6, 4 and 2 blocks.
struct ThreeRequests {
  static constexpr int B = 16;
  const Config cfg = testing::make_config(16, 2, 64, 32, B, 4);
  const std::vector<int32_t> q_lens = {1, 3, 2}, kv_lens = {5 * B + 3, 3 * B + 1, 2 * B};
  PagedStep step(uint64_t seed) const {
    return PagedStep(cfg, q_lens, kv_lens, DType::bf16, seed, 3, testing::KvLayout::token_major);
  }
};

// The plan's lengths on the host, larger ones on the device: cu_seqlens_q past total_q and a kv_len
// past the plan's longest.
TEST(PagedCudaBadLengths, StayInsideTheBuffers) {
  MSA_SKIP_WITHOUT_GPU();
  const ThreeRequests three;
  const Config& cfg = three.cfg;
  const int B = ThreeRequests::B;
  const std::vector<int32_t>&q_lens = three.q_lens, &kv_lens = three.kv_lens;
  PagedStep s = three.step(/*seed=*/43);
  PagedOptions dense_opt;
  dense_opt.dense = true;
  const PagedPlan plans[2] = {paged_plan(cfg, q_lens.data(), kv_lens.data(), 3, DType::bf16, Device::cuda(0), {}),
                              paged_plan(cfg, q_lens.data(), kv_lens.data(), 3, DType::bf16, Device::cuda(0), dense_opt)};
  const int64_t tq = plans[0].total_q, guard = 8;
  const std::size_t ws_bytes = std::max(plans[0].workspace_bytes, plans[1].workspace_bytes);
  HostTensor cu_q(DType::i32, {4}), kv(DType::i32, {3});
  const int32_t wrong_cu_q[4] = {0, 4, 9, 40}, wrong_kv[3] = {5 * B + 3, 30 * B, 2 * B};
  for (int i = 0; i < 4; ++i) cu_q.set(i, wrong_cu_q[i]);
  for (int i = 0; i < 3; ++i) kv.set(i, wrong_kv[i]);
  // Outputs with guard rows behind the plan's total_q rows.
  HostTensor out(DType::bf16, {tq + guard, cfg.num_q_heads, cfg.head_dim}), lse(DType::f32, {tq + guard, cfg.num_q_heads}),
      topk(DType::i32, {cfg.num_kv_heads, tq + guard, cfg.topk});
  out.poison();
  lse.poison();
  topk.poison();
  HostTensor out0 = out, lse0 = lse, topk0 = topk;
  StepOnDevice d(s, ws_bytes);
  DeviceTensor dcu(cu_q), dkv(kv), dout(out), dlse(lse), dtopk(topk);
  const PagedBatch batch{dcu.view(), dkv.view(), d.pt.view()};
  TensorView o = dout.view(), l = dlse.view(), t = dtopk.view();
  o.shape[0] = tq;
  l.shape[0] = tq;
  t.shape[1] = tq;  // topk [Hkv, total_q, k] inside the [Hkv, total_q + guard, k] buffer
  for (const PagedPlan& p : plans) d.step(p, batch, o, l, p.options.dense ? TensorView{} : t);
  dout.download();
  dlse.download();
  dtopk.download();
  const int64_t row_out = int64_t(cfg.num_q_heads) * cfg.head_dim;
  const int64_t out_changed = first_changed(out, out0, tq * row_out);
  ASSERT_EQ(out_changed, -1) << "out guard element " << out_changed - tq * row_out << " was written";
  const int64_t lse_changed = first_changed(lse, lse0, tq * cfg.num_q_heads);
  ASSERT_EQ(lse_changed, -1) << "lse guard element " << lse_changed - tq * cfg.num_q_heads << " was written";
  for (int g = 0; g < cfg.num_kv_heads; ++g)
    for (int64_t row = tq; row < tq + guard; ++row)
      for (int slot = 0; slot < cfg.topk; ++slot) {
        const int64_t i = (g * (tq + guard) + row) * cfg.topk + slot;
        ASSERT_EQ(topk.get(i), topk0.get(i)) << "topk guard row " << row - tq << " of group " << g << " was written";
      }
}

using testing::expect_arg;

// The device batch read back and checked like the CPU's: a good batch passes, each bad tensor is
// named; page tables with rows apart (a slice of a wider table) and with one row for all requests
// (stride 0); refused inside a graph capture.
TEST(PagedCudaCheckBatch, NamesTheBadTensor) {
  MSA_SKIP_WITHOUT_GPU();
  const ThreeRequests three;
  const int B = ThreeRequests::B;
  PagedStep s = three.step(/*seed=*/47);
  const PagedPlan plan =
      paged_plan(three.cfg, three.q_lens.data(), three.kv_lens.data(), 3, DType::bf16, Device::cuda(0), {});
  StepOnDevice d(s, plan.workspace_bytes);
  const PagedBatch good{d.cu_q.view(), d.kv.view(), d.pt.view()};
  EXPECT_NO_THROW(paged_check_batch(plan, good, d.cache(), d.ctx));

  HostTensor wide(DType::i32, {3, s.width + 5});
  wide.poison();
  for (int r = 0; r < 3; ++r)
    for (int64_t j = 0; j < s.width; ++j) wide.set(r * (s.width + 5) + j, s.page_table.get(r * s.width + j));
  DeviceTensor dwide(wide);
  TensorView slice = dwide.view();
  slice.shape[1] = s.width;
  EXPECT_NO_THROW(paged_check_batch(plan, {good.cu_seqlens_q, good.kv_lens, slice}, d.cache(), d.ctx));
  wide.set(2 * (s.width + 5) + 1, double(s.num_pages));  // request 2, block 1
  dwide.upload();
  expect_arg("page_table", [&] { paged_check_batch(plan, {good.cu_seqlens_q, good.kv_lens, slice}, d.cache(), d.ctx); });
  TensorView one_row = d.pt.view();
  one_row.stride[0] = 0;  // every request reads request 0's pages
  EXPECT_NO_THROW(paged_check_batch(plan, {good.cu_seqlens_q, good.kv_lens, one_row}, d.cache(), d.ctx));
  HostTensor bad_row0 = s.page_table;
  bad_row0.set(2, -1);  // request 0, block 2
  DeviceTensor dbad_row0(bad_row0);
  one_row.data = dbad_row0.view().data;
  expect_arg("page_table", [&] { paged_check_batch(plan, {good.cu_seqlens_q, good.kv_lens, one_row}, d.cache(), d.ctx); });

  HostTensor kv = s.kv, cu_q = s.cu_q;
  kv.set(1, 3 * B + 2);
  cu_q.set(3, 7);
  DeviceTensor dkv(kv), dcu(cu_q);
  expect_arg("kv_lens", [&] { paged_check_batch(plan, {good.cu_seqlens_q, dkv.view(), good.page_table}, d.cache(), d.ctx); });
  expect_arg("cu_seqlens_q", [&] { paged_check_batch(plan, {dcu.view(), good.kv_lens, good.page_table}, d.cache(), d.ctx); });

  cudaStream_t stream = nullptr;
  MSA_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Context captured = d.ctx;
  captured.stream = stream;
  MSA_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  expect_arg("stream", [&] { paged_check_batch(plan, good, d.cache(), captured); });
  cudaGraph_t graph = nullptr;
  MSA_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
  if (graph) cudaGraphDestroy(graph);
  MSA_TEST_CUDA(cudaStreamDestroy(stream));
}

INSTANTIATE_TEST_SUITE_P(IndexKernels, PagedCudaBadPages, ::testing::Values("smem", "stream", "mma"),
                         [](const ::testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

}  // namespace
}  // namespace msa
