// FP8 E4M3 copies of a paged test step's caches (tests/paged_fixture.h), shared by the CPU and CUDA
// paged tests so both quantise exactly alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/host_tensor.h"
#include "msa/paged.h"
#include "paged_fixture.h"

namespace msa {
namespace testing {

enum class ScalePolicy {
  page_amax,  // amax of the page's tokens (per head) / 448: the scale a caller knowing the page gets
  head_amax,  // amax of the head over the whole cache / 448: one calibrated scale per head
};

// FP8 copies of a step's bf16 caches: scales from the tokens' values by `policy`, the prefix slots
// quantised (the unwritten ones stay NaN), the new tokens left for paged_append_kv.
struct Fp8Cache {
  HostTensor k, v, ki, k_scale, v_scale, ki_scale;
  KvLayout layout;  // of k and v: the step's
  PagedKVCache view() {
    return {kv_logical_view(k.view(), layout), kv_logical_view(v.view(), layout), ki.view(), k_scale.view(),
            v_scale.view(), ki_scale.view()};
  }

  Fp8Cache(PagedStep& s, ScalePolicy policy) : layout(s.layout) {
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
    k = HostTensor(DType::fp8_e4m3, kv_storage_shape(layout, P, B, hkv, D));
    v = HostTensor(DType::fp8_e4m3, kv_storage_shape(layout, P, B, hkv, D));
    ki = HostTensor(DType::fp8_e4m3, {P, B, Di});
    for (int64_t p = 0; p < P; ++p)
      for (int slot = 0; slot < B; ++slot)
        for (int h = 0; h < hkv; ++h)
          for (int d = 0; d < D; ++d) {
            const int64_t i = s.kv_index(p, slot, h, d);
            k.set(i, float(s.k_cache.get(i)) / float(k_scale.get(p * hkv + h)));
            v.set(i, float(s.v_cache.get(i)) / float(v_scale.get(p * hkv + h)));
          }
    for (int64_t i = 0; i < ki.numel(); ++i)
      ki.set(i, float(s.ki_cache.get(i)) / float(ki_scale.get(i / (int64_t(B) * Di))));
  }
};

}  // namespace testing
}  // namespace msa
