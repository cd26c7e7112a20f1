// The serving API driven the way an engine drives it (tests/paged_loop.h): one cache carried across a
// prefill step and 12 speculative decode steps (1 to 3 new tokens, pauses, a request that stops),
// pages from a shuffled free list as sequences cross block boundaries. After every step, selections
// and outputs equal the contiguous API over each request's tokens so far (paged_compare.h). Both page
// layouts, bf16 and f32, dense mode too.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "msa/paged.h"
#include "paged_compare.h"
#include "paged_loop.h"

namespace msa {
namespace {

using testing::KvLayout;

Config loop_config() { return testing::make_config(8, 2, 32, 16, 16, 4); }

struct LoopCase {
  DType dtype;
  KvLayout layout;
  bool dense;
};

class PagedDecodeLoop : public ::testing::TestWithParam<LoopCase> {};

TEST_P(PagedDecodeLoop, PrefillThenSpeculativeDecodeSteps) {
  const LoopCase lc = GetParam();
  const auto steps = testing::loop_schedule();
  const std::vector<int32_t> final_lens = testing::final_lengths(steps);
  testing::ServingLoop loop(loop_config(), lc.dtype, lc.layout, final_lens, 4242);
  for (size_t i = 0; i < steps.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i) + (i ? " (decode)" : " (prefill)"));
    testing::LoopStep s = loop.next(steps[i]);
    PagedOptions opt;
    opt.dense = lc.dense;
    const PagedPlan plan = paged_plan(loop.cfg, s.q_lens.data(), s.kv_lens.data(), int(s.q_lens.size()),
                                      lc.dtype, Device::cpu(), opt);
    std::vector<unsigned char> ws(plan.workspace_bytes);
    Context ctx;
    ctx.workspace = {ws.data(), ws.size()};
    const PagedBatch b{s.cu_q.view(), s.kv.view(), s.table.view()};
    paged_append_kv(plan, b, s.k_new.view(), s.v_new.view(), s.ki_new.view(), loop.host_cache(), ctx);
    testing::PagedOutputs got(loop.cfg, s.ref.total_q(), lc.dtype);
    paged_run(plan, b, s.ref.q.view(), s.ref.qi.view(), loop.host_cache(), got.out.view(), got.lse.view(),
              lc.dense ? TensorView{} : got.topk.view(), ctx);
    testing::expect_paged_equals_contiguous(s.ref, got, lc.dense);
    if (HasFatalFailure()) return;
  }
  EXPECT_EQ(loop.lens, final_lens);
}

INSTANTIATE_TEST_SUITE_P(
    Cpu, PagedDecodeLoop,
    ::testing::Values(LoopCase{DType::bf16, KvLayout::token_major, false},
                      LoopCase{DType::bf16, KvLayout::head_major, false},
                      LoopCase{DType::f32, KvLayout::token_major, false},
                      LoopCase{DType::bf16, KvLayout::head_major, true}),
    [](const ::testing::TestParamInfo<LoopCase>& i) {
      return std::string(dtype_name(i.param.dtype)) + "_" + testing::kv_layout_name(i.param.layout) +
             (i.param.dense ? "_dense" : "");
    });

}  // namespace
}  // namespace msa
