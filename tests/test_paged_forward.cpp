// Serving API (msa/paged.h) on the CPU: paged_append_kv + paged_run over a shuffled paged cache
// equal the contiguous varlen API (msa::index_topk + msa::sparse_attention_forward, or
// msa::dense_attention_forward in dense mode) on the same tokens, and the float64 oracle on sampled
// rows. Ragged kv lengths, every decode q_len 1..16, chunked prefill, GQA ratios 1, 4, 16, key splits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "kernel_env.h"
#include "msa/error.h"
#include "msa/ops.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "paged_compare.h"
#include "paged_fixture.h"

namespace msa {
namespace {

using testing::KvLayout;
using testing::PagedStep;

Config small_config(int hq, int hkv) { return testing::make_config(hq, hkv, 32, 16, 16, 4); }

using Outputs = testing::PagedOutputs;

// Appends the step's tokens, then runs one layer (twice, to check the plan and workspace are reusable).
Outputs run_paged(PagedStep& s, const PagedOptions& opt) {
  const PagedPlan plan = s.plan(opt);
  std::vector<unsigned char> ws(plan.workspace_bytes);
  Context ctx;
  ctx.workspace = {ws.data(), ws.size()};
  paged_append_kv(plan, s.batch(), s.k_new.view(), s.v_new.view(), s.ki_new.view(), s.cache(), ctx);
  Outputs o(s.p.cfg, s.p.total_q(), s.p.dtype);
  for (int rep = 0; rep < 2; ++rep) {
    o.out.poison();
    o.lse.poison();
    paged_run(plan, s.batch(), s.p.q.view(), s.p.qi.view(), s.cache(), o.out.view(), o.lse.view(),
              o.topk.view(), ctx);
  }
  return o;
}

void expect_same(PagedStep& s, const PagedOptions& opt = {}) {
  testing::expect_paged_equals_contiguous(s.p, run_paged(s, opt), opt.dense);
}

struct Case {
  int hq, hkv;
  DType dtype;
  KvLayout layout = KvLayout::token_major;
};
std::string case_name(const ::testing::TestParamInfo<Case>& i) {
  return "Hq" + std::to_string(i.param.hq) + "_Hkv" + std::to_string(i.param.hkv) + "_" +
         dtype_name(i.param.dtype) + (i.param.layout == KvLayout::head_major ? "_head_major" : "");
}

class PagedForward : public ::testing::TestWithParam<Case> {};

TEST_P(PagedForward, RaggedDecodeLengths) {
  const Case cs = GetParam();
  const Config c = small_config(cs.hq, cs.hkv);
  const int B = c.block_size;
  // kv: 1, B-1, B, B+1, shorter than k blocks, long; q_len cycles through decode sizes.
  const std::vector<int32_t> kv = {1, B - 1, B, B + 1, 3 * B - 2, 13 * B + 5};
  const std::vector<int32_t> q = {1, 4, 16, 2, 9, 16};
  PagedStep s(c, q, kv, cs.dtype, 101, 3, cs.layout);
  expect_same(s);
}

TEST_P(PagedForward, EveryDecodeQueryCount) {
  const Case cs = GetParam();
  const Config c = small_config(cs.hq, cs.hkv);
  std::vector<int32_t> q, kv;
  for (int n = 1; n <= 16; ++n) {
    q.push_back(n);
    kv.push_back(150 + 7 * n);
  }
  PagedStep s(c, q, kv, cs.dtype, 202, 3, cs.layout);
  expect_same(s);
}

TEST_P(PagedForward, ChunkedPrefill) {
  const Case cs = GetParam();
  const Config c = small_config(cs.hq, cs.hkv);
  // A chunk over a cached prefix, a chunk starting mid-page, and a whole prompt (q_len == kv_len).
  PagedStep s(c, {40, 37, 70}, {300, 101, 70}, cs.dtype, 303, 3, cs.layout);
  expect_same(s);
}

TEST_P(PagedForward, KeySplitsMergeByLse) {
  const Case cs = GetParam();
  const Config c = small_config(cs.hq, cs.hkv);
  PagedStep s(c, {3}, {517}, cs.dtype, 404, 3, cs.layout);
  PagedOptions opt;
  opt.num_threads = 7;  // one tile, seven workers: index block ranges and attention key splits
  const PagedPlan plan = s.plan(opt);
  EXPECT_GT(plan.attention_work.front().splits, 1);
  EXPECT_GT(plan.index_work.size(), size_t(1));
  expect_same(s, opt);
}

TEST_P(PagedForward, DenseModeEqualsDenseAttention) {
  const Case cs = GetParam();
  const Config c = small_config(cs.hq, cs.hkv);
  PagedStep s(c, {1, 5, 33}, {200, 17, 90}, cs.dtype, 505, 3, cs.layout);
  PagedOptions opt;
  opt.dense = true;
  expect_same(s, opt);
  opt.num_threads = 5;
  expect_same(s, opt);
}

INSTANTIATE_TEST_SUITE_P(Cpu, PagedForward,
                         ::testing::Values(Case{4, 4, DType::f32}, Case{4, 1, DType::f32},
                                           Case{16, 1, DType::f32}, Case{8, 2, DType::bf16},
                                           Case{16, 4, DType::f16},
                                           Case{4, 1, DType::f32, KvLayout::head_major},
                                           Case{8, 2, DType::bf16, KvLayout::head_major}),
                         case_name);

// bf16 pages of 64 and 128 keys take the index's tile-unit kernel where the CPU has AMX (index head
// dims 64 and 128 read in place, 40 staged); each case also runs with MSA_CPU_AMX=0.
TEST(PagedForward, TileUnitIndexOnBf16Pages) {
  testing::for_each_tile_unit_case(small_config(8, 2), [](const Config& c) {
    const int B = c.block_size;
    PagedStep s(c, {1, 4, 16, 2, 9, 16, 40}, {1, B - 1, B, B + 1, 3 * B - 2, 13 * B + 5, 300}, DType::bf16,
                808 + B + c.index_head_dim);
    expect_same(s);
    // Only single-token decode: the plan's scratch is sized for 2 rows per work item.
    PagedStep decode(c, {1, 1}, {13 * B + 5, 300}, DType::bf16, 909 + B + c.index_head_dim);
    expect_same(decode);
  });
}

TEST(PagedForward, EmptyRequestsAndNoQueries) {
  const Config c = small_config(4, 2);
  PagedStep s(c, {0, 2, 0}, {30, 18, 5}, DType::f32, 606);
  expect_same(s);
}

// head_major_kv_cache: the strides of [num_pages, Hkv, B, D] storage (packed, or K and V interleaved per
// page), and its argument checks.
TEST(PagedForward, HeadMajorViewHelper) {
  float buf[1];
  const TensorView t = head_major_kv_cache(buf, DType::bf16, 5, 16, 4, 64, Device::cpu());
  EXPECT_EQ(t.ndim, 4);
  const int64_t want_shape[4] = {5, 16, 4, 64}, want_stride[4] = {4 * 16 * 64, 64, 16 * 64, 1};
  for (int d = 0; d < 4; ++d) {
    EXPECT_EQ(t.shape[d], want_shape[d]) << d;
    EXPECT_EQ(t.stride[d], want_stride[d]) << d;
  }
  EXPECT_EQ(head_major_kv_cache(buf, DType::bf16, 5, 16, 4, 64, Device::cpu(), 2 * 4 * 16 * 64).stride[0],
            2 * 4 * 16 * 64);
  EXPECT_THROW(head_major_kv_cache(buf, DType::bf16, 5, 16, 4, 64, Device::cpu(), 100), ArgumentError);
  EXPECT_THROW(head_major_kv_cache(buf, DType::bf16, -1, 16, 4, 64), ArgumentError);
}

// After the append every token of every request sits in its (page, slot), in either page layout; the
// slots no request uses keep their poison.
TEST(PagedForward, AppendWritesOnlyTheNewSlots) {
  for (KvLayout layout : {KvLayout::token_major, KvLayout::head_major}) {
    SCOPED_TRACE(testing::kv_layout_name(layout));
    const Config c = small_config(4, 2);
    PagedStep s(c, {3, 1}, {20, 33}, DType::f32, 707, 3, layout);
    const PagedPlan plan = s.plan();
    paged_append_kv(plan, s.batch(), s.k_new.view(), s.v_new.view(), s.ki_new.view(), s.cache());
    const int B = c.block_size, hkv = c.num_kv_heads, D = c.head_dim;
    std::vector<char> used(size_t(s.k_cache.numel()), 0);
    for (int r = 0; r < 2; ++r)
      for (int t = 0; t < s.kv_lens[r]; ++t) {
        const int64_t page = int64_t(s.page_table.get(r * s.width + t / B));
        const int64_t tok = s.p.lens.cu_k[r] + t;
        for (int d = 0; d < c.index_head_dim; ++d)
          ASSERT_EQ(s.ki_cache.get((page * B + t % B) * c.index_head_dim + d),
                    s.p.ki.get(tok * c.index_head_dim + d));
        for (int h = 0; h < hkv; ++h)
          for (int d = 0; d < D; ++d) {
            const int64_t at = s.kv_index(page, t % B, h, d);
            ASSERT_EQ(s.k_cache.get(at), s.p.k.get((tok * hkv + h) * D + d)) << "request " << r << " token " << t;
            ASSERT_EQ(s.v_cache.get(at), s.p.v.get((tok * hkv + h) * D + d)) << "request " << r << " token " << t;
            used[size_t(at)] = 1;
          }
      }
    for (int64_t i = 0; i < s.k_cache.numel(); ++i)
      if (!used[size_t(i)]) ASSERT_TRUE(std::isnan(s.k_cache.get(i))) << "k_cache element " << i << " was written";
  }
}

}  // namespace
}  // namespace msa
