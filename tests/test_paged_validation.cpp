// Serving API argument checks: every bad input raises ArgumentError naming the argument.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "expect_argument.h"
#include "msa/error.h"
#include "msa/paged.h"
#include "paged_fixture.h"

namespace msa {
namespace {

using testing::PagedStep;

Config tiny() { return testing::make_config(4, 2, 16, 8, 8, 3); }

using testing::expect_arg;

struct Step {
  PagedStep s{tiny(), {2, 1}, {20, 9}, DType::bf16, 11};
  PagedPlan plan = s.plan();
  std::vector<unsigned char> ws = std::vector<unsigned char>(plan.workspace_bytes);
  HostTensor out{DType::bf16, {3, 4, 16}}, lse{DType::f32, {3, 4}}, topk{DType::i32, {2, 3, 3}};
  Context ctx() {
    Context c;
    c.workspace = {ws.data(), ws.size()};
    return c;
  }
  void run(const PagedBatch& b, const PagedKVCache& cache, const TensorView& q, Context c) {
    paged_run(plan, b, q, s.p.qi.view(), cache, out.view(), lse.view(), topk.view(), c);
  }
  void run() { run(s.batch(), s.cache(), s.p.q.view(), ctx()); }
};

TEST(PagedValidation, PlanRejectsBadLengths) {
  const Config c = tiny();
  const int32_t q[] = {3, 1}, kv[] = {2, 9}, neg[] = {-1, 1};
  expect_arg("q_lens", [&] { paged_plan(c, q, kv, 2, DType::bf16, Device::cpu()); });
  expect_arg("q_lens", [&] { paged_plan(c, neg, kv, 2, DType::bf16, Device::cpu()); });
  expect_arg("batch", [&] { paged_plan(c, q, kv, 0, DType::bf16, Device::cpu()); });
  expect_arg("dtype", [&] { paged_plan(c, q + 1, kv + 1, 1, DType::i32, Device::cpu()); });
  Config bad = c;
  bad.num_q_heads = 3;
  expect_arg("num_q_heads", [&] { paged_plan(bad, q + 1, kv + 1, 1, DType::bf16, Device::cpu()); });
}

TEST(PagedValidation, GoodStepRuns) {
  Step t;
  EXPECT_NO_THROW(t.run());
}

TEST(PagedValidation, PageIdsOutOfRange) {
  Step t;
  t.s.page_table.set(1, double(t.s.num_pages));  // request 0, block 1
  expect_arg("page_table", [&] { t.run(); });
  t.s.page_table.set(1, -1);
  expect_arg("page_table", [&] { t.run(); });
}

TEST(PagedValidation, PageTableTooShort) {
  Step t;
  PagedBatch b = t.s.batch();
  b.page_table.shape[1] = 2;  // request 0 (kv_len 20, B 8) needs 3 pages
  expect_arg("page_table", [&] { t.run(b, t.s.cache(), t.s.p.q.view(), t.ctx()); });
}

TEST(PagedValidation, LengthsDifferFromThePlan) {
  Step t;
  t.s.kv.set(1, 10);
  expect_arg("kv_lens", [&] { t.run(); });
  Step u;
  u.s.cu_q.set(1, 1);
  expect_arg("cu_seqlens_q", [&] { u.run(); });
}

// paged_check_batch reports what paged_run would, without running (the GPU's on-demand check; its
// device side is in tests/cuda/test_paged_cuda_bad_batch.cpp).
TEST(PagedValidation, CheckBatchNamesTheTensor) {
  Step t;
  EXPECT_NO_THROW(paged_check_batch(t.plan, t.s.batch(), t.s.cache()));
  t.s.page_table.set(1, double(t.s.num_pages));
  expect_arg("page_table", [&] { paged_check_batch(t.plan, t.s.batch(), t.s.cache()); });
  Step u;
  u.s.kv.set(0, 21);
  expect_arg("kv_lens", [&] { paged_check_batch(u.plan, u.s.batch(), u.s.cache()); });
  Step v;
  v.s.cu_q.set(2, 2);
  expect_arg("cu_seqlens_q", [&] { paged_check_batch(v.plan, v.s.batch(), v.s.cache()); });
  PagedKVCache no_k = t.s.cache();
  no_k.k = TensorView{};
  expect_arg("k_cache", [&] { paged_check_batch(t.plan, t.s.batch(), no_k); });
}

TEST(PagedValidation, Workspace) {
  Step t;
  Context c = t.ctx();
  c.workspace.bytes -= 1;
  expect_arg("workspace", [&] { t.run(t.s.batch(), t.s.cache(), t.s.p.q.view(), c); });
  c.workspace = {};
  expect_arg("workspace", [&] { t.run(t.s.batch(), t.s.cache(), t.s.p.q.view(), c); });
}

// Caches (append writes them) and run's outputs with indices sharing addresses are rejected by name;
// head-major caches (a permutation of the same bytes) are not (the PagedForward tests run them).
TEST(PagedValidation, OverlappingWrittenTensors) {
  Step t;
  PagedKVCache cache = t.s.cache();
  cache.k.stride[1] = 0;  // every slot of a page at one address
  expect_arg("k_cache", [&] { t.run(t.s.batch(), cache, t.s.p.q.view(), t.ctx()); });
  expect_arg("k_cache", [&] {
    paged_append_kv(t.plan, t.s.batch(), t.s.k_new.view(), t.s.v_new.view(), t.s.ki_new.view(), cache);
  });
  cache = t.s.cache();
  cache.ki.stride[0] = cache.ki.stride[1];  // page p + 1 starts at slot 1 of page p
  expect_arg("ki_cache", [&] { t.run(t.s.batch(), cache, t.s.p.q.view(), t.ctx()); });
  TensorView out = t.out.view();
  out.stride[1] = 0;
  expect_arg("out", [&] {
    paged_run(t.plan, t.s.batch(), t.s.p.q.view(), t.s.p.qi.view(), t.s.cache(), out, t.lse.view(),
              t.topk.view(), t.ctx());
  });
  TensorView topk = t.topk.view();
  topk.stride[0] = 0;
  expect_arg("topk", [&] {
    paged_run(t.plan, t.s.batch(), t.s.p.q.view(), t.s.p.qi.view(), t.s.cache(), t.out.view(),
              t.lse.view(), topk, t.ctx());
  });
  t.run();  // the untouched step still runs
}

TEST(PagedValidation, DtypesAndShapes) {
  Step t;
  HostTensor q16(DType::f16, {3, 4, 16});
  expect_arg("q", [&] { t.run(t.s.batch(), t.s.cache(), q16.view(), t.ctx()); });
  PagedKVCache cache = t.s.cache();
  cache.v.shape[2] = 1;
  expect_arg("v_cache", [&] { t.run(t.s.batch(), cache, t.s.p.q.view(), t.ctx()); });
  cache = t.s.cache();
  cache.ki.dtype = DType::f32;
  expect_arg("ki_cache", [&] { t.run(t.s.batch(), cache, t.s.p.q.view(), t.ctx()); });
  cache = t.s.cache();
  cache.k_scale = t.lse.view();
  expect_arg("k_scale", [&] { t.run(t.s.batch(), cache, t.s.p.q.view(), t.ctx()); });
  HostTensor topk_bad(DType::i32, {2, 3, 2});
  expect_arg("topk", [&] {
    paged_run(t.plan, t.s.batch(), t.s.p.q.view(), t.s.p.qi.view(), t.s.cache(), t.out.view(),
              t.lse.view(), topk_bad.view(), t.ctx());
  });
  HostTensor lse16(DType::bf16, {3, 4});
  expect_arg("lse", [&] {
    paged_run(t.plan, t.s.batch(), t.s.p.q.view(), t.s.p.qi.view(), t.s.cache(), t.out.view(),
              lse16.view(), t.topk.view(), t.ctx());
  });
  HostTensor knew(DType::bf16, {2, 2, 16});
  expect_arg("k_new", [&] {
    paged_append_kv(t.plan, t.s.batch(), knew.view(), t.s.v_new.view(), t.s.ki_new.view(),
                    t.s.cache());
  });
}

}  // namespace
}  // namespace msa
