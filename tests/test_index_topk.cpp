// CPU index branch (msa::index_topk) against the float64 oracle: selection as sets per (group, query)
// with the local block in its slot and -1 padding, near-tie tolerance, exact ties to the smaller id,
// the selected LSE (with temperature) and caller-provided workspace.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "msa/error.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "index_testing.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::Case;
using testing::IndexResult;
using testing::run_case;
using testing::run_index;
using testing::TestProblem;

const std::vector<int32_t> kRagged = {1, 7, 8, 9, 20, 100};

TEST(IndexTopk, RaggedPrefillAllDtypes) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    SCOPED_TRACE(dtype_name(dt));
    run_case({2, 32, 8, 4, kRagged, kRagged}, dt, 11);
  }
}

TEST(IndexTopk, GroupCounts) {
  for (int hkv : {1, 2, 4}) {
    SCOPED_TRACE("Hkv " + std::to_string(hkv));
    run_case({hkv, 24, 16, 3, {130, 17}, {130, 17}}, DType::f32, 20 + hkv);
  }
}

TEST(IndexTopk, BlocksSpanningKeyChunks) {
  // Blocks of 24 and 96 keys straddle the backend's key chunks: pooling and the per-block sum of
  // exp must combine across chunks. 300 queries also span several query tiles.
  run_case({1, 32, 24, 4, {300, 31}, {300, 70}}, DType::f32, 25);
  run_case({2, 32, 96, 2, {300}, {300}}, DType::bf16, 26, 0.8f);
}

TEST(IndexTopk, ChunkedPrefillAndDecode) {
  // Suffix queries over cached prefixes: chunked prefill and decode with 1..16 queries.
  run_case({2, 32, 8, 5, {3, 16, 1, 5, 40}, {100, 77, 64, 9, 200}}, DType::f32, 31);
  run_case({4, 32, 16, 4, {1, 2, 16}, {300, 161, 257}}, DType::bf16, 32);
}

TEST(IndexTopk, SelectedLseWithTemperature) {
  for (float t : {0.5f, 2.f}) {
    SCOPED_TRACE("T " + std::to_string(t));
    run_case({2, 32, 8, 4, kRagged, kRagged}, DType::f32, 41, t);
    run_case({2, 32, 8, 4, {5, 33}, {70, 33}}, DType::f64, 42, t);
  }
}

TEST(IndexTopk, TopkCoversEveryBlock) {
  // k larger than the number of blocks: every earlier block is selected.
  run_case({2, 16, 8, 64, {50, 3}, {50, 120}}, DType::f32, 51);
}

TEST(IndexTopk, ExactTiesGoToSmallerBlockId) {
  // ki periodic with period B: every full block has the same score, so ids 0..n-1 win.
  for (DType dt : {DType::f32, DType::bf16}) {
    Config cfg{4, 2, 16, 32, 8, 4};
    TestProblem p(cfg, {60, 9}, {60, 9}, dt, 61);
    const int64_t tk = p.total_k();
    for (int64_t t = 0; t < tk; ++t)
      for (int d = 0; d < 32; ++d) p.ki.set(t * 32 + d, p.ki.get((t % 8) * 32 + d));
    IndexResult r = run_index(p, 1.f);
    const int64_t tq = p.total_q();
    for (int g = 0; g < 2; ++g)
      for (int64_t row = 0; row < tq; ++row) {
        const reference::QueryRow qr = reference::locate_query(p.lens, row);
        const int64_t local = qr.position / 8;
        const int n = rules::num_nonlocal_selected(local, 4);
        std::vector<int32_t> ids;
        for (int s = 0; s < n; ++s) ids.push_back(int32_t(r.topk.get((int64_t(g) * tq + row) * 4 + s)));
        std::sort(ids.begin(), ids.end());
        for (int s = 0; s < n; ++s) ASSERT_EQ(ids[s], s) << "row " << row;
        ASSERT_EQ(r.topk.get((int64_t(g) * tq + row) * 4 + n), local);
      }
    int64_t same = 0;
    check_selection(p, r, 1.f, true, same);
  }
}

TEST(IndexTopk, WorkspaceAndThreadCountsGiveIdenticalResults) {
  Config cfg{8, 2, 16, 32, 8, 4};
  TestProblem p(cfg, {100, 7}, {150, 90}, DType::bf16, 71);
  IndexResult base = run_index(p, 1.f, true, Context{});
  for (int threads : {1, 2, 3}) {
    const std::size_t bytes = workspace_bytes(Op::index_topk, cfg, p.varlen, p.total_q(),
                                              p.total_k(), Device::cpu(), threads, DType::bf16);
    std::vector<unsigned char> ws(bytes + 1, 0xff);
    Context ctx;
    ctx.num_threads = threads;
    ctx.workspace = {ws.data() + 1, bytes};  // deliberately misaligned
    IndexResult r = run_index(p, 1.f, true, ctx);
    ASSERT_EQ(std::memcmp(r.topk.data(), base.topk.data(), size_t(base.topk.numel()) * 4), 0);
    ASSERT_EQ(std::memcmp(r.slse.data(), base.slse.data(), size_t(base.slse.numel()) * 4), 0);
    ctx.workspace.bytes = bytes - 1;
    EXPECT_THROW(run_index(p, 1.f, true, ctx), ArgumentError);
  }
}

TEST(IndexTopk, SelectedLseIsOptional) {
  Config cfg{4, 2, 16, 32, 8, 4};
  TestProblem p(cfg, kRagged, kRagged, DType::f32, 81);
  IndexResult with = run_index(p, 1.f, true), without = run_index(p, 1.f, false);
  ASSERT_EQ(std::memcmp(with.topk.data(), without.topk.data(), size_t(with.topk.numel()) * 4), 0);
  for (int64_t i = 0; i < without.slse.numel(); ++i) ASSERT_TRUE(std::isnan(without.slse.get(i)));
}

TEST(IndexTopk, StridedInputs) {
  // qi and ki as column slices of wider buffers (innermost contiguous, outer strides free). bf16
  // with Di 32 and blocks of 64 reads ki's strided rows in place on the AMX path (with and without
  // the selected LSE: the two AMX layouts).
  struct Shape {
    DType dt;
    int di, block;
  };
  for (const Shape sh : {Shape{DType::f32, 16, 8}, Shape{DType::bf16, 32, 64}}) {
    const int di = sh.di, wide = di + 24;
    Config cfg{4, 2, 16, di, sh.block, 3};
    TestProblem p(cfg, {140, 3}, {140, 130}, sh.dt, 91);
    const int64_t tq = p.total_q(), tk = p.total_k();
    HostTensor qwide(sh.dt, {tq, 2, di + 8}), kwide(sh.dt, {tk, wide});
    qwide.poison();
    kwide.poison();
    for (int64_t r = 0; r < tq; ++r)
      for (int g = 0; g < 2; ++g)
        for (int d = 0; d < di; ++d)
          qwide.set((r * 2 + g) * (di + 8) + d, p.qi.get((r * 2 + g) * di + d));
    for (int64_t t = 0; t < tk; ++t)
      for (int d = 0; d < di; ++d) kwide.set(t * wide + 3 + d, p.ki.get(t * di + d));
    TensorView qv = qwide.view(), kv = kwide.view();
    qv.shape[2] = di;
    kv.data = static_cast<char*>(kv.data) + 3 * dtype_size(sh.dt);
    kv.shape[1] = di;
    for (bool with_lse : {true, false}) {
      IndexResult want = run_index(p, 1.f, with_lse);
      HostTensor topk(DType::i32, {2, tq, 3}), slse(DType::f32, {2, tq});
      topk.poison();
      slse.poison();
      index_topk(cfg, p.varlen, qv, kv, topk.view(), with_lse ? slse.view() : TensorView{});
      ASSERT_EQ(std::memcmp(topk.data(), want.topk.data(), size_t(topk.numel()) * 4), 0);
      if (with_lse) ASSERT_EQ(std::memcmp(slse.data(), want.slse.data(), size_t(slse.numel()) * 4), 0);
    }
  }
}

}  // namespace
}  // namespace msa
