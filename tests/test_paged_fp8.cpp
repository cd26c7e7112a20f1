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
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "common/float_convert.h"
#include "msa/error.h"
#include "msa/ops.h"
#include "msa/paged.h"
#include "paged_fixture.h"

namespace msa {
namespace {

using testing::PagedStep;

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

Config fp8_config(int hq, int hkv) {
  Config c;
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.head_dim = 64;
  c.index_head_dim = 32;
  c.block_size = 16;
  c.topk = 8;
  return c;
}

enum class ScalePolicy {
  page_amax,  // amax of the page's tokens (per head) / 448: the scale a caller knowing the page gets
  head_amax,  // amax of the head over the whole cache / 448: one calibrated scale per head
};

// FP8 copies of a step's bf16 caches: scales from the tokens' values by `policy`, the prefix slots
// quantised (the unwritten ones stay NaN), the new tokens left for paged_append_kv.
struct Fp8Cache {
  HostTensor k, v, ki, k_scale, v_scale, ki_scale;
  PagedKVCache view() {
    return {k.view(), v.view(), ki.view(), k_scale.view(), v_scale.view(), ki_scale.view()};
  }

  Fp8Cache(PagedStep& s, ScalePolicy policy) {
    const Config& c = s.p.cfg;
    const int B = c.block_size, hkv = c.num_kv_heads, D = c.head_dim, Di = c.index_head_dim;
    const int64_t P = s.num_pages;
    std::vector<double> ak(size_t(P * hkv), 0), av(size_t(P * hkv), 0), aki(size_t(P), 0);
    for (size_t r = 0; r < s.kv_lens.size(); ++r)
      for (int64_t t = 0; t < s.kv_lens[r]; ++t) {
        const int64_t page = int64_t(s.page_table.get(int64_t(r) * s.width + t / B));
        const int64_t tok = s.p.lens.cu_k[r] + t;
        const int64_t slot = policy == ScalePolicy::page_amax ? page : 0;
        for (int h = 0; h < hkv; ++h)
          for (int d = 0; d < D; ++d) {
            double& mk = ak[size_t(slot * hkv + h)];
            double& mv = av[size_t(slot * hkv + h)];
            mk = std::max(mk, std::fabs(s.p.k.get((tok * hkv + h) * D + d)));
            mv = std::max(mv, std::fabs(s.p.v.get((tok * hkv + h) * D + d)));
          }
        for (int d = 0; d < Di; ++d)
          aki[size_t(slot)] = std::max(aki[size_t(slot)], std::fabs(s.p.ki.get(tok * Di + d)));
      }
    auto scale = [&](const std::vector<double>& amax, int64_t page, int h, int heads) {
      const double a = amax[size_t((policy == ScalePolicy::page_amax ? page : 0) * heads + h)];
      return a > 0 ? float(a / 448.0) : 1.f;
    };
    k_scale = HostTensor(DType::f32, {P, hkv});
    v_scale = HostTensor(DType::f32, {P, hkv});
    ki_scale = HostTensor(DType::f32, {P});
    for (int64_t p = 0; p < P; ++p) {
      for (int h = 0; h < hkv; ++h) {
        k_scale.set(p * hkv + h, scale(ak, p, h, hkv));
        v_scale.set(p * hkv + h, scale(av, p, h, hkv));
      }
      ki_scale.set(p, scale(aki, p, 0, 1));
    }
    k = HostTensor(DType::fp8_e4m3, {P, B, hkv, D});
    v = HostTensor(DType::fp8_e4m3, {P, B, hkv, D});
    ki = HostTensor(DType::fp8_e4m3, {P, B, Di});
    for (int64_t i = 0; i < k.numel(); ++i) {
      const int64_t p = i / (int64_t(B) * hkv * D), h = (i / D) % hkv;
      k.set(i, float(s.k_cache.get(i)) / float(k_scale.get(p * hkv + h)));
      v.set(i, float(s.v_cache.get(i)) / float(v_scale.get(p * hkv + h)));
    }
    for (int64_t i = 0; i < ki.numel(); ++i)
      ki.set(i, float(s.ki_cache.get(i)) / float(ki_scale.get(i / (int64_t(B) * Di))));
  }
};

struct Outputs {
  HostTensor out, lse, topk;
  Outputs(const Config& c, int64_t tq, DType dt)
      : out(dt, {tq, c.num_q_heads, c.head_dim}),
        lse(DType::f32, {tq, c.num_q_heads}),
        topk(DType::i32, {c.num_kv_heads, tq, c.topk}) {
    out.poison();
    lse.poison();
    topk.poison();
  }
};

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
PagedStep make_step(int hq, int hkv, uint64_t seed) {
  return PagedStep(fp8_config(hq, hkv), {1, 3, 16, 40, 5}, {1000, 517, 700, 300, 17}, DType::bf16,
                   seed);
}

TEST(PagedFp8, AppendQuantisesTheNewRowsWithThePageScale) {
  PagedStep s = make_step(8, 2, 1);
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
          const int64_t at = ((page * B + pos % B) * hkv + h) * D + d;
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

}  // namespace
}  // namespace msa
