// CUDA KL alignment against the CPU backend on the same fresh random inputs (teacher lse from the CPU
// main-branch forward): sparse over topk and dense warmup, ragged batches, chunked prefill, decode,
// sequences shorter than k blocks, GQA ratios 1..64, D and Di 64/128; outputs poisoned before each
// call; bitwise reproducible. Every case runs under each kernel choice: the FFMA one
// (MSA_KL_KERNEL=ffma), the default (tensor-core kernels where the shape allows: block_size a multiple
// of 64, D and Di in {64, 128}, G dividing 64; the FFMA kernel otherwise; sparse dqi and loss from the
// key-major kernel's per-query partials; the key-major kernel over 256-row tiles where G is 16 or 32),
// `tiles` (the same with dqi and loss from the query-major kernel's tile unions, as large problems
// run) and `narrow` (the default with the 64-row key-major kernel for every G). On a mismatch the first element out of
// tolerance is printed (index, got, expected) with the largest error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/device_tensor.h"
#include "kernel_env.h"
#include "cuda/training_cuda_testing.h"
#include "problem_fixture.h"

namespace msa {
namespace {

using testing::DeviceTensor;
using testing::TestProblem;
using testing::ScopedKernelEnv;

struct KlOut {
  HostTensor loss, dqi, dki;
};

KlOut make_out(TestProblem& p) {
  KlOut o{HostTensor(DType::f32, {1}),
          HostTensor(p.dtype, {p.total_q(), p.cfg.num_kv_heads, p.cfg.index_head_dim}),
          HostTensor(p.dtype, {p.total_k(), p.cfg.index_head_dim})};
  o.loss.poison();
  o.dqi.poison();
  o.dki.poison();
  return o;
}

constexpr float kCoeff = 1.5f;

KlOut run_cuda(TestProblem& p, HostTensor* topk, HostTensor& lse, bool deterministic) {
  KlOut o = make_out(p);
  HostTensor topk_dummy(DType::i32, {1});
  DeviceTensor q(p.q), k(p.k), qi(p.qi), ki(p.ki), lse_d(lse), topk_d(topk ? *topk : topk_dummy), cq(p.cu_q),
      ck(p.cu_k), loss(o.loss), dqi(o.dqi), dki(o.dki);
  Varlen vl;
  vl.cu_seqlens_q = cq.view();
  vl.cu_seqlens_k = ck.view();
  Context ctx;
  ctx.deterministic = deterministic;
  kl_alignment(p.cfg, vl, q.view(), k.view(), lse_d.view(), qi.view(), ki.view(), topk ? topk_d.view() : TensorView{},
               kCoeff, loss.view(), dqi.view(), dki.view(), ctx);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  loss.download();
  dqi.download();
  dki.download();
  return o;
}

// Norm-relative error below tol; otherwise a message with the first element whose error exceeds
// tol * max|ref| (flat index and, for 3-D/2-D tensors, its coordinates), and the largest error.
::testing::AssertionResult close(const char* name, const HostTensor& got_t, const HostTensor& ref_t, double tol) {
  const std::vector<double> got = got_t.to_double(), ref = ref_t.to_double();
  const double err = relative_error(got, ref);
  if (err < tol) return ::testing::AssertionSuccess();
  double ref_max = 0, worst = -1;
  size_t worst_i = 0;
  for (size_t i = 0; i < ref.size(); ++i) ref_max = std::max(ref_max, std::fabs(ref[i]));
  std::ostringstream os;
  os << name << ": relative error " << err << " (tol " << tol << ")";
  bool first = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::isfinite(got[i]) ? std::fabs(got[i] - ref[i]) : INFINITY;
    if (d > worst) worst = d, worst_i = i;
    if (first && !(d <= tol * ref_max)) {
      first = false;
      os << "; first bad element " << i;
      const auto& sh = ref_t.shape();
      if (sh.size() == 3) os << " [" << i / (sh[1] * sh[2]) << "][" << (i / sh[2]) % sh[1] << "][" << i % sh[2] << "]";
      if (sh.size() == 2) os << " [" << i / sh[1] << "][" << i % sh[1] << "]";
      os << " got " << got[i] << " expected " << ref[i];
    }
  }
  os << "; max |error| " << worst << " at " << worst_i << " (got " << got[worst_i] << " expected " << ref[worst_i]
     << ", max |ref| " << ref_max << ")";
  return ::testing::AssertionFailure() << os.str();
}

void check_one(TestProblem& p, HostTensor* topk, HostTensor* cpu_topk = nullptr) {
  HostTensor out, lse;
  HostTensor* ref_topk = cpu_topk ? cpu_topk : topk;
  testing::cpu_forward(p, ref_topk, out, lse);
  KlOut ref = make_out(p);
  kl_alignment(p.cfg, p.varlen, p.q.view(), p.k.view(), lse.view(), p.qi.view(), p.ki.view(),
               ref_topk ? ref_topk->view() : TensorView{}, kCoeff, ref.loss.view(), ref.dqi.view(), ref.dki.view());
  KlOut got = run_cuda(p, topk, lse, /*deterministic=*/true);
  EXPECT_TRUE(close("loss", got.loss, ref.loss, 1e-2));
  EXPECT_TRUE(close("dqi", got.dqi, ref.dqi, 2e-2));
  EXPECT_TRUE(close("dki", got.dki, ref.dki, 2e-2));
  KlOut again = run_cuda(p, topk, lse, /*deterministic=*/false);
  EXPECT_TRUE(testing::same_bytes(got.loss, again.loss)) << "loss not reproducible";
  EXPECT_TRUE(testing::same_bytes(got.dqi, again.dqi)) << "dqi not reproducible";
  EXPECT_TRUE(testing::same_bytes(got.dki, again.dki)) << "dki not reproducible";
}

struct Case {
  int hq, hkv, d, di, block, k;
  std::vector<int32_t> lq, lk;
  DType dtype;
};

void check_case(const Case& c, uint64_t seed) {
  Config cfg = testing::attention_config(c.hq, c.hkv, c.d, c.block, c.k);
  cfg.index_head_dim = c.di;
  TestProblem p(cfg, c.lq, c.lk, c.dtype, seed);
  std::mt19937_64 rng(seed * 5 + 3);
  HostTensor topk = testing::random_topk_tensor(cfg, p.lens, rng);
  {
    SCOPED_TRACE("sparse");
    check_one(p, &topk);
  }
  {
    SCOPED_TRACE("dense");
    check_one(p, nullptr);
  }
}

// The kernel choice (MSA_KL_KERNEL) for one test, restored after it.
class KlAlignmentCuda : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    MSA_SKIP_WITHOUT_GPU();
    kernel_.emplace("MSA_KL_KERNEL", GetParam());
  }

 private:
  std::optional<ScopedKernelEnv> kernel_;
};

TEST_P(KlAlignmentCuda, RaggedBlockEdgesGqa16) {
  check_case({64, 4, 128, 128, 64, 3, {1, 63, 64, 65, 66}, {1, 63, 64, 65, 300}, DType::bf16}, 41);
}

TEST_P(KlAlignmentCuda, ChunkedPrefillAndDecodeGqa16) {
  check_case({16, 1, 128, 64, 128, 4, {1, 16, 7, 130}, {700, 529, 128, 300}, DType::bf16}, 42);
}

TEST_P(KlAlignmentCuda, Gqa4HeadDim64Float16) {
  check_case({32, 8, 64, 128, 64, 4, {127, 3, 200}, {127, 400, 333}, DType::f16}, 43);
}

// Block size 16 and Di = 32: the FFMA kernel under either setting.
TEST_P(KlAlignmentCuda, Gqa1ShortSequencesBelowK) {
  check_case({4, 4, 64, 32, 16, 8, {1, 30, 129, 100}, {1, 30, 129, 250}, DType::bf16}, 44);
}

TEST_P(KlAlignmentCuda, Gqa1Block64ShortAndLong) {
  check_case({2, 2, 64, 64, 64, 3, {1, 65, 100, 257}, {1, 65, 300, 257}, DType::bf16}, 45);
}

TEST_P(KlAlignmentCuda, Gqa1HeadDim128IndexDim64Float16) {
  check_case({3, 3, 128, 64, 64, 2, {70, 1, 129}, {200, 64, 129}, DType::f16}, 46);
}

TEST_P(KlAlignmentCuda, Gqa2DecodeSuffixes) {
  check_case({4, 2, 64, 128, 64, 3, {1, 2, 16, 5}, {390, 64, 129, 600}, DType::bf16}, 47);
}

TEST_P(KlAlignmentCuda, Gqa64OneQueryPerTile) {
  check_case({64, 1, 64, 64, 64, 2, {33, 1, 90}, {33, 200, 250}, DType::bf16}, 48);
}

TEST_P(KlAlignmentCuda, Gqa8HeadDim128Block128Float16) {
  check_case({16, 2, 128, 128, 128, 2, {140, 9}, {400, 129}, DType::f16}, 49);
}

// Lists longer than one 16-query tile of the wide key-major kernel, and a key split's share ending
// inside a tile.
TEST_P(KlAlignmentCuda, Gqa16LongListsBlock128) {
  check_case({64, 4, 128, 128, 128, 4, {1000, 37}, {1000, 700}, DType::bf16}, 51);
}

// G = 32: the wide kernel's warps own one query of two m-tiles, its tiles 8 queries.
TEST_P(KlAlignmentCuda, Gqa32HeadDim64Float16) {
  check_case({64, 2, 64, 64, 64, 3, {300, 5, 1}, {300, 500, 64}, DType::f16}, 52);
}

INSTANTIATE_TEST_SUITE_P(Kernels, KlAlignmentCuda, ::testing::Values("ffma", "default", "tiles", "narrow"),
                         [](const ::testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

// The default kernel skips ids outside [0, local] and counts a duplicated id once, as the CUDA
// attention kernels: equal to the CPU backend on the row with those ids replaced by -1.
class KlAlignmentCudaIds : public ::testing::Test {
 protected:
  void SetUp() override { MSA_SKIP_WITHOUT_GPU(); }
};

TEST_F(KlAlignmentCudaIds, InvalidIdsSkippedDuplicatesOnce) {
  if (const char* e = std::getenv("MSA_KL_KERNEL"); e && std::string(e) == "ffma")
    GTEST_SKIP() << "the FFMA kernel counts a duplicated id twice";
  Config cfg = testing::attention_config(16, 2, 64, 64, 4);
  cfg.index_head_dim = 64;
  TestProblem p(cfg, {40, 200}, {300, 200}, DType::bf16, 50);
  std::mt19937_64 rng(77);
  HostTensor clean = testing::random_topk_tensor(cfg, p.lens, rng);
  HostTensor messy = clean;
  const int64_t tq = p.total_q();
  int changed = 0;
  for (int g = 0; g < cfg.num_kv_heads; ++g)
    for (int64_t row = 0; row < tq; row += 7)
      for (int s = 0; s < cfg.topk; ++s) {
        const int64_t e = (g * tq + row) * cfg.topk + s;
        if (int32_t(clean.get(e)) != -1) continue;
        // An unused slot becomes a block past the query's local one, or a copy of slot (s + 1) % k.
        const int32_t other = int32_t(clean.get((g * tq + row) * cfg.topk + (s + 1) % cfg.topk));
        messy.set(e, (row + s) % 2 == 0 || other == -1 ? 1000 + s : other);
        ++changed;
      }
  ASSERT_GT(changed, 0);
  check_one(p, &messy, &clean);
}

}  // namespace
}  // namespace msa
