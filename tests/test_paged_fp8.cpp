// FP8 E4M3 paged caches (docs/serving.md "FP8 caches"):
//  - the E4M3 conversions: every code round-trips, random floats round to the nearest code (ties to
//    even, saturating at +-448) as a brute-force search over the 254 finite codes says;
//  - paged_append_kv quantises the new rows with the page's scale and writes nothing else;
//  - an FP8 run is exact for the values the cache holds: it equals the contiguous f32 API
//    (index_topk, sparse_attention_forward) on the dequantised tokens;
//  - against the same step with bf16 caches (built from the same data): outputs within the tolerance
//    and block selections agreeing above the floors that docs/serving.md records;
//  - validation: scales exactly when a cache is FP8, their shape and dtype, usable values.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <utility>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "common/float_convert.h"
#include "msa/error.h"
#include "msa/ops.h"
#include "expect_argument.h"
#include "kernel_env.h"
#include "msa/paged.h"
#include "paged_compare.h"
#include "paged_fixture.h"
#include "paged_fp8_cache.h"

namespace msa {
namespace {

using testing::Fp8Cache;
using testing::KvLayout;
using testing::kv_layout_name;
using testing::PagedStep;
using testing::ScalePolicy;

// ---------------------------------------------------------------------------------------------
// Conversions

double e4m3_formula(int b) {  // the OCP definition, for finite codes
  const int sign = b >> 7, exp = (b >> 3) & 15, mant = b & 7;
  const double mag = exp == 0 ? mant / 8.0 * std::ldexp(1.0, -6) : (1 + mant / 8.0) * std::ldexp(1.0, exp - 7);
  return sign ? -mag : mag;
}
bool is_nan_code(int b) { return (b & 0x7f) == 0x7f; }

TEST(Fp8E4M3, EveryCodeDecodesByTheFormulaAndRoundTrips) {
  for (int b = 0; b < 256; ++b) {
    const float f = fp8_e4m3_to_float(uint8_t(b));
    if (is_nan_code(b)) {
      EXPECT_TRUE(std::isnan(f)) << b;
      EXPECT_TRUE(is_nan_code(float_to_fp8_e4m3(f))) << b;
      continue;
    }
    EXPECT_EQ(double(f), e4m3_formula(b)) << b;
    EXPECT_EQ(std::signbit(f), bool(b & 0x80)) << b;  // -0 included
    EXPECT_EQ(float_to_fp8_e4m3(f), b) << b;
  }
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.f, -9));
}

// Nearest finite code by search; a tie goes to the even code; beyond +-448 saturates.
uint8_t nearest_code(float x) {
  if (std::isnan(x)) return 0x7f;
  const bool neg = std::signbit(x);
  const double a = std::min(std::fabs(double(x)), 448.0);
  int best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (int b = 0; b <= 0x7e; ++b) {
    const double err = std::fabs(e4m3_formula(b) - a);
    if (err < best_err || (err == best_err && (b & 1) == 0)) {
      best = b;
      best_err = err;
    }
  }
  return uint8_t(best | (neg ? 0x80 : 0));
}

TEST(Fp8E4M3, RandomFloatsRoundToNearestEvenAndSaturate) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> log_mag(-14, 10);
  std::vector<float> xs;
  for (int i = 0; i < 20000; ++i) {
    const double m = std::exp2(log_mag(rng));
    xs.push_back(float(rng() & 1 ? m : -m));
  }
  std::normal_distribution<float> normal(0.f, 100.f);
  for (int i = 0; i < 5000; ++i) xs.push_back(normal(rng));
  for (int b = 0; b < 0x7e; ++b) {  // exact midpoints between neighbours: the ties
    const double mid = (e4m3_formula(b) + e4m3_formula(b + 1)) / 2;
    xs.push_back(float(mid));
    xs.push_back(-float(mid));
    xs.push_back(std::nextafter(float(mid), 0.f));
    xs.push_back(std::nextafter(float(mid), 1e9f));
  }
  for (float x : {0.f, -0.f, 448.f, 449.f, 464.f, 480.f, 1e30f, -1e30f,
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::denorm_min(), std::ldexp(1.f, -10), std::ldexp(1.f, -11),
                  std::ldexp(1.01f, -11)})
    xs.push_back(x);
  for (float x : xs) ASSERT_EQ(int(float_to_fp8_e4m3(x)), int(nearest_code(x))) << x;
  EXPECT_EQ(float_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);
}

// ---------------------------------------------------------------------------------------------
// Paged steps with FP8 caches

Config fp8_config(int hq, int hkv) { return testing::make_config(hq, hkv, 64, 32, 16, 8); }


using Outputs = testing::PagedOutputs;

Outputs run_step(PagedStep& s, const PagedKVCache& cache, const PagedOptions& opt = {}) {
  const PagedPlan plan = s.plan(opt);
  std::vector<unsigned char> ws(plan.workspace_bytes);
  Context ctx;
  ctx.workspace = {ws.data(), ws.size()};
  paged_append_kv(plan, s.batch(), s.k_new.view(), s.v_new.view(), s.ki_new.view(), cache, ctx);
  Outputs o(s.p.cfg, s.p.total_q(), s.p.dtype);
  paged_run(plan, s.batch(), s.p.q.view(), s.p.qi.view(), cache, o.out.view(), o.lse.view(),
            o.topk.view(), ctx);
  return o;
}

std::set<int32_t> selected(const Outputs& o, const Config& c, int64_t tq, int g, int64_t row) {
  std::set<int32_t> ids;
  for (int k = 0; k < c.topk; ++k) {
    const int32_t id = int32_t(o.topk.get((g * tq + row) * c.topk + k));
    if (id >= 0) ids.insert(id);
  }
  return ids;
}

// A step of ragged requests: decode (1, 3, 16 queries), a prefill chunk, a short request.
PagedStep make_step(int hq, int hkv, uint64_t seed, KvLayout layout = KvLayout::token_major) {
  return PagedStep(fp8_config(hq, hkv), {1, 3, 16, 40, 5}, {1000, 517, 700, 300, 17}, DType::bf16,
                   seed, 3, layout);
}

class PagedFp8Layout : public ::testing::TestWithParam<KvLayout> {};

TEST_P(PagedFp8Layout, AppendQuantisesTheNewRowsWithThePageScale) {
  PagedStep s = make_step(8, 2, 1, GetParam());
  Fp8Cache f(s, ScalePolicy::page_amax);
  const HostTensor k_before = f.k, ki_before = f.ki;
  run_step(s, f.view());
  const Config& c = s.p.cfg;
  const int B = c.block_size, hkv = c.num_kv_heads, D = c.head_dim, Di = c.index_head_dim;
  std::vector<bool> fresh_k(size_t(f.k.numel()), false), fresh_ki(size_t(f.ki.numel()), false);
  for (size_t r = 0; r < s.q_lens.size(); ++r)
    for (int i = 0; i < s.q_lens[r]; ++i) {
      const int64_t pos = s.kv_lens[r] - s.q_lens[r] + i, row = s.p.lens.cu_q[r] + i;
      const int64_t page = int64_t(s.page_table.get(int64_t(r) * s.width + pos / B));
      for (int h = 0; h < hkv; ++h)
        for (int d = 0; d < D; ++d) {
          const int64_t at = s.kv_index(page, pos % B, h, d);
          const float x = float(s.k_new.get((row * hkv + h) * D + d));
          const uint8_t want = float_to_fp8_e4m3(x / float(f.k_scale.get(page * hkv + h)));
          ASSERT_EQ(static_cast<uint8_t*>(f.k.data())[at], want) << "request " << r << " token " << i;
          fresh_k[size_t(at)] = true;
        }
      for (int d = 0; d < Di; ++d) {
        const int64_t at = (page * B + pos % B) * Di + d;
        const float x = float(s.ki_new.get(row * Di + d));
        ASSERT_EQ(static_cast<uint8_t*>(f.ki.data())[at], float_to_fp8_e4m3(x / float(f.ki_scale.get(page))));
        fresh_ki[size_t(at)] = true;
      }
    }
  const uint8_t* k_now = static_cast<const uint8_t*>(f.k.data());
  const uint8_t* k_was = static_cast<const uint8_t*>(const_cast<HostTensor&>(k_before).data());
  for (int64_t i = 0; i < f.k.numel(); ++i)
    if (!fresh_k[size_t(i)]) ASSERT_EQ(k_now[i], k_was[i]) << "element " << i << " was not a new slot";
  const uint8_t* ki_now = static_cast<const uint8_t*>(f.ki.data());
  const uint8_t* ki_was = static_cast<const uint8_t*>(const_cast<HostTensor&>(ki_before).data());
  for (int64_t i = 0; i < f.ki.numel(); ++i)
    if (!fresh_ki[size_t(i)]) ASSERT_EQ(ki_now[i], ki_was[i]) << "element " << i;
}

// The FP8 run on the values the cache holds: the contiguous f32 API on the dequantised tokens (and
// the bf16 queries, exact in f32) selects the same blocks and gives the same outputs.
// The FP8 run on the values the cache holds: the contiguous f32 API on the dequantised tokens (and
// the bf16 queries, exact in f32) selects the same blocks and gives the same outputs.
void expect_run_equals_dequantised(PagedStep& s, const PagedOptions& opt) {
  Fp8Cache f(s, ScalePolicy::page_amax);
  Outputs got = run_step(s, f.view(), opt);
  const Config& c = s.p.cfg;
  const int B = c.block_size, D = c.head_dim, Di = c.index_head_dim, hkv = c.num_kv_heads;
  // The contiguous problem in f32 with the cached (dequantised) k / v / ki of every token.
  testing::TestProblem ref(c, s.q_lens, s.kv_lens, DType::f32, 1);
  for (int64_t i = 0; i < ref.q.numel(); ++i) ref.q.set(i, s.p.q.get(i));
  for (int64_t i = 0; i < ref.qi.numel(); ++i) ref.qi.set(i, s.p.qi.get(i));
  for (size_t r = 0; r < s.kv_lens.size(); ++r)
    for (int64_t t = 0; t < s.kv_lens[r]; ++t) {
      const int64_t page = int64_t(s.page_table.get(int64_t(r) * s.width + t / B));
      const int64_t tok = s.p.lens.cu_k[r] + t;
      for (int h = 0; h < hkv; ++h) {
        const float ks = float(f.k_scale.get(page * hkv + h)), vs = float(f.v_scale.get(page * hkv + h));
        for (int d = 0; d < D; ++d) {
          const int64_t at = s.kv_index(page, t % B, h, d);
          ref.k.set((tok * hkv + h) * D + d, float(f.k.get(at)) * ks);
          ref.v.set((tok * hkv + h) * D + d, float(f.v.get(at)) * vs);
        }
      }
      for (int d = 0; d < Di; ++d)
        ref.ki.set(tok * Di + d, float(f.ki.get((page * B + t % B) * Di + d)) * float(f.ki_scale.get(page)));
    }
  const int64_t tq = s.p.total_q();
  Outputs want(c, tq, DType::f32);
  index_topk(c, ref.varlen, ref.qi.view(), ref.ki.view(), want.topk.view(), TensorView{});
  for (int g = 0; g < hkv; ++g)
    for (int64_t row = 0; row < tq; ++row)
      ASSERT_EQ(selected(got, c, tq, g, row), selected(want, c, tq, g, row)) << "group " << g << " row " << row;
  sparse_attention_forward(c, ref.varlen, ref.q.view(), ref.k.view(), ref.v.view(), got.topk.view(),
                           want.out.view(), want.lse.view());
  EXPECT_LT(relative_error(got.out.to_double(), want.out.to_double()), 4e-3);  // bf16 output rounding
  EXPECT_LT(relative_error(got.lse.to_double(), want.lse.to_double()), 1e-6);
}

TEST_P(PagedFp8Layout, RunEqualsTheContiguousApiOnTheDequantisedTokens) {
  for (const auto& [hq, hkv] : std::vector<std::pair<int, int>>{{2, 2}, {8, 2}, {16, 1}}) {
    SCOPED_TRACE("Hq " + std::to_string(hq) + " Hkv " + std::to_string(hkv));
    PagedStep s = make_step(hq, hkv, 7 + hq, GetParam());
    PagedOptions opt;
    opt.num_threads = 3;  // key splits and index block ranges
    expect_run_equals_dequantised(s, opt);
  }
}

// FP8 ki pages of 64 and 128 keys with bf16 queries take the index's tile-unit path where the CPU has
// AMX (codes widened to bf16 a 64-key chunk at a time, amx::widen_fp8_chunk; the page scale on each
// block's max); index head dims 64 and 40 (a staged partial tile); each case also with MSA_CPU_AMX=0.
TEST(PagedFp8, TileUnitIndexOnFp8Pages) {
  testing::for_each_tile_unit_case(fp8_config(8, 2), [](const Config& c) {
    const int B = c.block_size;
    PagedStep s(c, {1, 4, 16, 2, 9, 40}, {1, B - 1, B + 1, 3 * B - 2, 13 * B + 5, 300}, DType::bf16,
                505 + B + c.index_head_dim);
    expect_run_equals_dequantised(s, PagedOptions{});
  });
}

INSTANTIATE_TEST_SUITE_P(Pages, PagedFp8Layout, ::testing::Values(KvLayout::token_major, KvLayout::head_major),
                         [](const ::testing::TestParamInfo<KvLayout>& i) { return std::string(kv_layout_name(i.param)); });

// FP8 against bf16 caches holding the same data (N(0,1), bf16-rounded), both scale policies, GQA
// 1 / 4 / 16, two seeds each. Measured on this CPU: docs/serving.md "FP8 caches" has the figures; the
// bounds below keep a margin over them. Output error of rows whose selection agrees (and of dense
// mode) is the K/V rounding alone; the end-to-end sparse error also holds the rows where FP8 ki picked
// another block among near-ties, which on random data moves a row's output a lot.
constexpr double kDenseTolerance = 0.06;
constexpr double kSparseTolerance = 0.40;
constexpr double kSameSetFloor = 0.70;
constexpr double kJaccardFloor = 0.92;

struct Agreement {
  double dense_err = 0, sparse_err = 0, matched_err = 0;
  std::vector<double> matched_got, matched_ref;  // outputs of rows whose selections agree
  int64_t rows = 0, same = 0;
  double jaccard = 0;
};

Agreement measure(ScalePolicy policy) {
  Agreement a;
  for (const auto& [hq, hkv] : std::vector<std::pair<int, int>>{{2, 2}, {8, 2}, {16, 1}})
    for (uint64_t seed : {21, 22}) {
      PagedStep s = make_step(hq, hkv, seed * 31 + uint64_t(hq));
      const Config& c = s.p.cfg;
      const int64_t tq = s.p.total_q();
      PagedOptions dense;
      dense.dense = true;
      {
        PagedStep s2 = make_step(hq, hkv, seed * 31 + uint64_t(hq));
        Fp8Cache f(s2, policy);
        const Outputs ref = run_step(s2, s2.cache(), dense), got = run_step(s2, f.view(), dense);
        a.dense_err = std::max(a.dense_err, relative_error(got.out.to_double(), ref.out.to_double()));
      }
      Fp8Cache f(s, policy);
      const Outputs ref = run_step(s, s.cache()), got = run_step(s, f.view());
      a.sparse_err = std::max(a.sparse_err, relative_error(got.out.to_double(), ref.out.to_double()));
      for (int g = 0; g < c.num_kv_heads; ++g)
        for (int64_t row = 0; row < tq; ++row) {
          const std::set<int32_t> x = selected(got, c, tq, g, row), y = selected(ref, c, tq, g, row);
          std::vector<int32_t> both;
          std::set_intersection(x.begin(), x.end(), y.begin(), y.end(), std::back_inserter(both));
          const size_t uni = x.size() + y.size() - both.size();
          a.jaccard += double(both.size()) / double(uni);
          a.same += x == y;
          ++a.rows;
          if (x != y) continue;
          const int G = c.group_size();
          for (int64_t e = (row * c.num_q_heads + g * G) * c.head_dim;
               e < (row * c.num_q_heads + (g + 1) * G) * c.head_dim; ++e) {
            a.matched_got.push_back(got.out.get(e));
            a.matched_ref.push_back(ref.out.get(e));
          }
        }
    }
  a.jaccard /= double(a.rows);
  a.matched_err = relative_error(a.matched_got, a.matched_ref);
  return a;
}

void report_and_check(const char* policy, const Agreement& a) {
  std::printf("fp8 (%s scales) vs bf16: dense rel err %.4f, sparse rel err %.4f (rows with the same "
              "selection %.4f), same set %.4f of %lld rows, mean Jaccard %.4f\n",
              policy, a.dense_err, a.sparse_err, a.matched_err, double(a.same) / double(a.rows),
              (long long)a.rows, a.jaccard);
  EXPECT_LT(a.dense_err, kDenseTolerance);
  EXPECT_LT(a.matched_err, kDenseTolerance);
  EXPECT_LT(a.sparse_err, kSparseTolerance);
  EXPECT_GT(double(a.same) / double(a.rows), kSameSetFloor);
  EXPECT_GT(a.jaccard, kJaccardFloor);
}

TEST(PagedFp8, AgreesWithBf16CachesPageScales) { report_and_check("page amax", measure(ScalePolicy::page_amax)); }
TEST(PagedFp8, AgreesWithBf16CachesHeadScales) { report_and_check("head amax", measure(ScalePolicy::head_amax)); }

using testing::expect_arg;

TEST(PagedFp8, ValidationOfScales) {
  PagedStep s(fp8_config(4, 2), {2, 1}, {20, 9}, DType::bf16, 3);
  Fp8Cache f(s, ScalePolicy::page_amax);
  const PagedPlan plan = s.plan();
  std::vector<unsigned char> ws(plan.workspace_bytes);
  Context ctx;
  ctx.workspace = {ws.data(), ws.size()};
  Outputs o(s.p.cfg, s.p.total_q(), DType::bf16);
  auto run = [&](const PagedKVCache& cache) {
    paged_run(plan, s.batch(), s.p.q.view(), s.p.qi.view(), cache, o.out.view(), o.lse.view(),
              o.topk.view(), ctx);
  };
  auto append = [&](const PagedKVCache& cache) {
    paged_append_kv(plan, s.batch(), s.k_new.view(), s.v_new.view(), s.ki_new.view(), cache, ctx);
  };
  EXPECT_NO_THROW(append(f.view()));
  EXPECT_NO_THROW(run(f.view()));
  PagedKVCache mixed = s.cache();  // FP8 K only: each cache is FP8 or not on its own
  mixed.k = f.k.view();
  mixed.k_scale = f.k_scale.view();
  EXPECT_NO_THROW(run(mixed));

  PagedKVCache c = f.view();
  c.k_scale = {};
  expect_arg("k_scale", [&] { run(c); });  // missing
  c = f.view();
  c.ki_scale = {};
  expect_arg("ki_scale", [&] { append(c); });
  c = s.cache();
  c.v_scale = f.v_scale.view();
  expect_arg("v_scale", [&] { run(c); });  // extra: v_cache is bf16
  c = s.cache();
  c.ki_scale = f.ki_scale.view();
  expect_arg("ki_scale", [&] { append(c); });
  c = f.view();
  c.v_scale.shape[1] = 1;
  expect_arg("v_scale", [&] { run(c); });  // shape
  c = f.view();
  c.ki_scale = f.k_scale.view();
  expect_arg("ki_scale", [&] { run(c); });  // [num_pages, Hkv] where [num_pages] is due
  HostTensor scale16(DType::bf16, {s.num_pages, 2});
  c = f.view();
  c.k_scale = scale16.view();
  expect_arg("k_scale", [&] { run(c); });  // dtype
  f.v_scale.set(int64_t(s.page_table.get(1)) * 2 + 1, 0.0);  // request 0 block 1: append writes it
  expect_arg("v_scale", [&] { append(f.view()); });
  f.v_scale.set(int64_t(s.page_table.get(1)) * 2 + 1, std::numeric_limits<double>::quiet_NaN());
  expect_arg("v_scale", [&] { append(f.view()); });

  // FP8 is a cache format only: not a plan / query dtype, nor an input of the contiguous ops.
  const int32_t ql[] = {1}, kl[] = {9};
  expect_arg("dtype", [&] { paged_plan(s.p.cfg, ql, kl, 1, DType::fp8_e4m3, Device::cpu()); });
  HostTensor q8(DType::fp8_e4m3, {s.p.total_q(), 4, 64});
  expect_arg("q", [&] {
    paged_run(plan, s.batch(), q8.view(), s.p.qi.view(), f.view(), o.out.view(), o.lse.view(),
              o.topk.view(), ctx);
  });
  HostTensor qi8(DType::fp8_e4m3, {s.p.total_q(), 2, 32});
  HostTensor ki8(DType::fp8_e4m3, {29, 32});
  try {
    index_topk(s.p.cfg, s.p.varlen, qi8.view(), ki8.view(), o.topk.view(), TensorView{});
    ADD_FAILURE() << "index_topk accepted float8_e4m3fn";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("float8_e4m3fn"), std::string::npos) << e.what();
  }
  EXPECT_EQ(dtype_size(DType::fp8_e4m3), 1u);
  EXPECT_STREQ(dtype_name(DType::fp8_e4m3), "float8_e4m3fn");
}

}  // namespace
}  // namespace msa
