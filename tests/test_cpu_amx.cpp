// The CPU backend's AMX path (bf16 index scores and attention forward) and its fallback, each
// against the float64 oracle on the same problems: every case runs with MSA_CPU_AMX=all (the tile
// unit wherever it applies, also for decode-like calls the backend would give to the row kernels),
// =1 (the backend's choice) and =0. Where the CPU or kernel offers no AMX every run takes the
// fallback, and the first test says so.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "attention_testing.h"
#include "cpu/amx.h"
#include "index_testing.h"
#include "kernel_env.h"

namespace msa {
namespace {

using testing::Case;
using testing::expect_forward_matches_oracle;
using testing::oracle_topk;
using testing::run_case;
using testing::ScopedKernelEnv;
using testing::TestProblem;

const char* const kAmxSettings[] = {"all", "1", "0"};

TEST(CpuAmx, ReportsWhetherTheTileUnitRuns) {
  ScopedKernelEnv on("MSA_CPU_AMX", "1");
  const bool amx = detail::cpu::amx::usable();
  if (!amx) GTEST_SKIP() << "no AMX here: the MSA_CPU_AMX=1 cases below run the fallback path";
  EXPECT_FALSE(detail::cpu::amx::forced());
  {
    ScopedKernelEnv all("MSA_CPU_AMX", "all");
    EXPECT_TRUE(detail::cpu::amx::forced());
  }
  ScopedKernelEnv off("MSA_CPU_AMX", "0");
  EXPECT_FALSE(detail::cpu::amx::usable()) << "MSA_CPU_AMX=0 must turn the tile path off";
}

TEST(CpuAmx, IndexShapes) {
  // Index head dims below, at and above one 32-wide reduction step, blocks smaller than, equal to
  // and straddling the 64-key chunks, groups 1 to 8; ragged, chunked-prefill and decode lengths.
  // Without the selected LSE, blocks of a multiple of 64 keys are pooled as they are scored.
  const std::vector<Case> cases = {
      {1, 8, 8, 4, {1, 7, 8, 9, 20, 100}, {1, 7, 8, 9, 20, 100}},
      {2, 40, 32, 3, {63, 64, 65, 200}, {63, 64, 65, 200}},
      {4, 64, 24, 4, {300, 31}, {300, 70}},
      {8, 128, 128, 4, {1, 16, 300}, {700, 400, 300}},
      {2, 128, 64, 16, {5, 1, 40}, {1100, 129, 40}},
      {1, 32, 192, 3, {2, 190, 600}, {900, 191, 600}},
  };
  for (const char* amx : kAmxSettings) {
    ScopedKernelEnv env("MSA_CPU_AMX", amx);
    for (size_t i = 0; i < cases.size(); ++i)
      for (bool with_lse : {true, false}) {
        SCOPED_TRACE("MSA_CPU_AMX=" + std::string(amx) + " case " + std::to_string(i) +
                     (with_lse ? " with" : " without") + " selected LSE");
        run_case(cases[i], DType::bf16, 300 + i, i % 2 ? 0.7f : 1.f, with_lse);
      }
  }
}

// (Hq, Hkv, D, block)
class CpuAmxForward : public ::testing::TestWithParam<std::tuple<int, int, int, int>> {
 protected:
  Config config(int k) const {
    Config c;
    c.num_q_heads = std::get<0>(GetParam());
    c.num_kv_heads = std::get<1>(GetParam());
    c.head_dim = std::get<2>(GetParam());
    c.index_head_dim = 16;
    c.block_size = std::get<3>(GetParam());
    c.topk = k;
    return c;
  }
  int block() const { return std::get<3>(GetParam()); }
};

// Lengths at block edges, shorter than k blocks and long enough to be sparse; sparse and dense.
TEST_P(CpuAmxForward, RaggedPrefill) {
  const int B = block();
  const std::vector<int32_t> lens = {1, B - 1, B, B + 1, 4 * B + 17};
  for (const char* amx : kAmxSettings) {
    ScopedKernelEnv env("MSA_CPU_AMX", amx);
    SCOPED_TRACE(std::string("MSA_CPU_AMX=") + amx);
    TestProblem p(config(3), lens, lens, DType::bf16, 40 + B);
    HostTensor topk = oracle_topk(p);
    expect_forward_matches_oracle(p, &topk);
    expect_forward_matches_oracle(p, nullptr);
  }
}

// Chunked prefill and decode (1..16 queries) over cached prefixes; a sequence with no query.
TEST_P(CpuAmxForward, QuerySuffixes) {
  const int B = block();
  for (const char* amx : kAmxSettings) {
    ScopedKernelEnv env("MSA_CPU_AMX", amx);
    SCOPED_TRACE(std::string("MSA_CPU_AMX=") + amx);
    TestProblem p(config(4), {13, 1, 0, 16, 2 * B + 3}, {5 * B + 7, 9 * B, B, 6 * B + 1, 7 * B},
                  DType::bf16, 50 + B);
    HostTensor topk = oracle_topk(p);
    expect_forward_matches_oracle(p, &topk);
    expect_forward_matches_oracle(p, nullptr);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, CpuAmxForward,
    ::testing::Values(std::make_tuple(8, 2, 128, 32), std::make_tuple(16, 1, 64, 64),
                      std::make_tuple(4, 4, 40, 32), std::make_tuple(8, 1, 16, 128),
                      std::make_tuple(32, 8, 128, 64), std::make_tuple(64, 4, 128, 128),
                      std::make_tuple(6, 2, 72, 96)));

// A caller's workspace of exactly workspace_bytes(bf16) runs the AMX forward with every thread
// count and gives the same bits as the library's own scratch; one byte less is refused.
TEST(CpuAmx, ForwardCallerWorkspace) {
  ScopedKernelEnv env("MSA_CPU_AMX", "all");
  Config cfg{8, 2, 64, 16, 32, 3};
  TestProblem p(cfg, {70, 5}, {100, 90}, DType::bf16, 61);
  HostTensor topk = oracle_topk(p);
  for (HostTensor* ids : {&topk, static_cast<HostTensor*>(nullptr)}) {
    testing::ForwardResult base = testing::run_forward(p, ids);
    for (int threads : {1, 2, 3}) {
      const Op op = ids ? Op::sparse_forward : Op::dense_forward;
      const std::size_t bytes = workspace_bytes(op, cfg, p.varlen, p.total_q(), p.total_k(),
                                                Device::cpu(), threads, DType::bf16);
      std::vector<unsigned char> ws(bytes + 1, 0xff);
      Context ctx;
      ctx.num_threads = threads;
      ctx.workspace = {ws.data() + 1, bytes};  // deliberately misaligned
      testing::ForwardResult r = testing::run_forward(p, ids, ctx);
      ASSERT_EQ(std::memcmp(r.out.data(), base.out.data(), size_t(base.out.numel()) * 2), 0);
      ASSERT_EQ(std::memcmp(r.lse.data(), base.lse.data(), size_t(base.lse.numel()) * 4), 0);
      ctx.workspace.bytes = bytes - 1;
      EXPECT_THROW(testing::run_forward(p, ids, ctx), ArgumentError);
    }
  }
}

}  // namespace
}  // namespace msa
