// Shared-memory budget of the paged mma attention (mma_smem, paged_attention_mma.cuh) for the serving
// benchmark's shape (Hq 64, Hkv 4, D 128, B 128, k 16): the regions are disjoint and in order, the
// block list and staged page ids are sized by the tile's union (tile queries x k), not by the longest
// request, and the two-CTA-per-SM claims of docs/serving.md hold for an H100 (228 KB an SM, 1 KB
// reserved a CTA): every mode fits two CTAs at 128K and at 1M decode, staged page ids included.
// Host only: runs without a GPU.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/paged_attention_mma.cuh"
#include "cuda/paged_layout.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using detail::cuda::paged::layout_of;
using detail::cuda::paged::Layout;
using detail::cuda::paged::mma_smem;
using detail::cuda::paged::mma_static_smem;
using detail::cuda::paged::MmaMode;
using detail::cuda::paged::MmaSmem;

constexpr std::size_t kSmemPerSm = 233472, kReservedPerCta = 1024;  // H100 / H200

// A decode plan's host fields: `batch` requests of `context` tokens with `q_len` new queries each.
PagedPlan decode_plan(int batch, int context, int q_len) {
  PagedPlan p;
  p.cfg = testing::make_config(64, 4, 128, 128, 128, 16);
  p.batch = batch;
  p.max_q_len = q_len;
  p.max_kv_len = context;
  p.total_q = int64_t(batch) * q_len;
  p.options.num_workers = 132;
  return p;
}

// What the host passes the mma kernel for `plan` (paged_run.cu: row_cap, list_cap, union_cap).
struct Caps {
  int row_cap;
  int64_t list_cap, union_cap;
};
Caps caps_of(const PagedPlan& plan) {
  const Layout lay = layout_of(plan);
  const int G = plan.cfg.group_size();
  return {std::min(lay.attn_tile_q, std::max(1, plan.max_q_len)) * G, lay.max_blocks, lay.max_union};
}

int ctas_per_sm(const MmaSmem& s, MmaMode mode) {
  return int(kSmemPerSm / (s.bytes + mma_static_smem(mode) + kReservedPerCta));
}

TEST(PagedAttentionSmem, RegionsAreDisjointAndSizedByTheUnion) {
  for (int context : {8192, 131072, 1 << 20})
    for (int q_len : {1, 4, 16}) {
      const Caps c = caps_of(decode_plan(32, context, q_len));
      ASSERT_EQ(c.union_cap, std::min<int64_t>(c.list_cap, int64_t(std::min(q_len, 4)) * 16))
          << "context " << context << " q_len " << q_len;
      for (MmaMode mode : {MmaMode::sixteen_bit, MmaMode::fp8_widened, MmaMode::fp8_registers})
        for (bool stage : {false, true}) {
          const bool fp8 = mode != MmaMode::sixteen_bit;
          const MmaSmem s = mma_smem(128, c.row_cap, c.list_cap, c.union_cap, fp8, fp8, stage, mode);
          SCOPED_TRACE(::testing::Message() << "context " << context << " q_len " << q_len << " mode "
                                            << int(mode) << " stage " << stage);
          EXPECT_GE(s.tiles, std::size_t(c.row_cap) * 128 * 2);  // Q rows, 16-bit
          EXPECT_LE(s.tiles, s.raw);
          EXPECT_LT(s.raw, s.ml + (fp8 ? 0 : 1));
          EXPECT_LT(s.ml, s.mask);
          EXPECT_EQ(s.list - s.mask, sizeof(uint32_t) * std::size_t(c.list_cap));  // a word per block id
          EXPECT_EQ(s.pages - s.list, sizeof(int32_t) * std::size_t(c.union_cap));  // the union's blocks
          EXPECT_EQ(s.scales - s.pages, stage ? sizeof(int32_t) * std::size_t(c.union_cap) : 0);
          EXPECT_GE(s.bytes, s.scales + (fp8 && stage ? 2 * sizeof(float) * std::size_t(c.union_cap) : 0));
        }
    }
}

TEST(PagedAttentionSmem, TwoCtasAnSmWhereTheDocsSaySo) {
  const Caps at128k = caps_of(decode_plan(32, 131072, 1)), at1m = caps_of(decode_plan(32, 1 << 20, 1));
  auto bytes = [](const Caps& c, MmaMode mode, bool stage) {
    const bool fp8 = mode != MmaMode::sixteen_bit;
    return mma_smem(128, c.row_cap, c.list_cap, c.union_cap, fp8, fp8, stage, mode);
  };
  // 16-bit and both FP8 modes, staged page ids included, at 128K and at 1M.
  for (const Caps& c : {at128k, at1m})
    for (MmaMode mode : {MmaMode::sixteen_bit, MmaMode::fp8_registers, MmaMode::fp8_widened})
      EXPECT_EQ(ctas_per_sm(bytes(c, mode, true), mode), 2) << "mode " << int(mode);
}

}  // namespace
}  // namespace msa
