// A random serving step on the host: the contiguous varlen problem (TestProblem) and the same tokens
// in a paged cache with a shuffled page table. The prefix (kv_len - q_len tokens) is written into the
// pages directly; the step's new tokens are left for paged_append_kv. Unwritten cache slots hold NaN,
// so a kernel that reads past kv_len fails. K / V pages are token-major or head-major in memory
// (KvLayout); the API sees both as the same logical [num_pages, B, Hkv, D] tensor.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/host_tensor.h"
#include "kernel_env.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

// How K / V pages lie in memory. token_major: [num_pages, B, Hkv, D], the contiguous logical shape.
// head_major: [num_pages, Hkv, B, D] (FlashInfer's HND, TensorRT-LLM's pages), each (page, head)
// one contiguous run of B rows, passed as the logical shape with dims 1 and 2 swapped in the strides.
enum class KvLayout { token_major, head_major };

inline const char* kv_layout_name(KvLayout l) { return l == KvLayout::head_major ? "head_major" : "token_major"; }

// Physical shape of a K / V cache in `layout`.
inline std::vector<int64_t> kv_storage_shape(KvLayout layout, int64_t pages, int B, int hkv, int D) {
  return layout == KvLayout::head_major ? std::vector<int64_t>{pages, hkv, B, D}
                                        : std::vector<int64_t>{pages, B, hkv, D};
}

// The logical [num_pages, B, Hkv, D] view of a K / V cache stored in `layout` (host or device);
// head-major through the public helper, msa::head_major_kv_cache.
inline TensorView kv_logical_view(const TensorView& stored, KvLayout layout) {
  if (layout == KvLayout::token_major) return stored;
  return head_major_kv_cache(stored.data, stored.dtype, stored.shape[0], int(stored.shape[2]),
                             int(stored.shape[1]), int(stored.shape[3]), stored.device);
}

// Element index of (page, slot, head, d) in a K / V cache stored in `layout`.
inline int64_t kv_element(KvLayout layout, int64_t page, int64_t slot, int h, int d, int B, int hkv, int D) {
  return layout == KvLayout::head_major ? ((page * hkv + h) * B + slot) * D + d
                                        : ((page * B + slot) * hkv + h) * D + d;
}

struct PagedStep {
  std::vector<int32_t> q_lens, kv_lens;
  TestProblem p;  // contiguous: queries [total_q], keys [sum kv_len]
  int64_t num_pages = 0, width = 0;
  HostTensor k_cache, v_cache, ki_cache, page_table, cu_q, kv;
  HostTensor k_new, v_new, ki_new;  // the new tokens, packed like q
  KvLayout layout = KvLayout::token_major;

  PagedStep(const Config& cfg, std::vector<int32_t> ql, std::vector<int32_t> kl, DType dt,
            uint64_t seed, int spare_pages = 3, KvLayout kv_layout = KvLayout::token_major)
      : q_lens(std::move(ql)), kv_lens(std::move(kl)), p(cfg, q_lens, kv_lens, dt, seed), layout(kv_layout) {
    const int B = cfg.block_size, hkv = cfg.num_kv_heads, D = cfg.head_dim, Di = cfg.index_head_dim;
    const int batch = int(q_lens.size());
    for (int r = 0; r < batch; ++r) {
      const int64_t nb = rules::num_blocks(kv_lens[r], B);
      num_pages += nb;
      width = std::max(width, nb);
    }
    num_pages += spare_pages;
    width += 1;  // a wider table than needed is allowed
    std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
    std::vector<int32_t> perm(static_cast<size_t>(num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);

    k_cache = HostTensor(dt, kv_storage_shape(layout, num_pages, B, hkv, D));
    v_cache = HostTensor(dt, kv_storage_shape(layout, num_pages, B, hkv, D));
    ki_cache = HostTensor(dt, {num_pages, B, Di});
    k_cache.poison();
    v_cache.poison();
    ki_cache.poison();
    page_table = HostTensor(DType::i32, {batch, width});
    cu_q = HostTensor(DType::i32, {batch + 1});
    kv = HostTensor(DType::i32, {batch});
    const int64_t tq = p.total_q();
    k_new = HostTensor(dt, {tq, hkv, D});
    v_new = HostTensor(dt, {tq, hkv, D});
    ki_new = HostTensor(dt, {tq, Di});

    size_t next = 0;
    for (int r = 0; r < batch; ++r) {
      cu_q.set(r + 1, p.lens.cu_q[r + 1]);
      kv.set(r, kv_lens[r]);
      for (int64_t j = 0; j < width; ++j)
        page_table.set(int64_t(r) * width + j,
                       j < rules::num_blocks(kv_lens[r], B) ? perm[next++] : -1);
      const int64_t k0 = p.lens.cu_k[r], prefix = kv_lens[r] - q_lens[r];
      for (int64_t t = 0; t < kv_lens[r]; ++t) {
        const int64_t page = int64_t(page_table.get(int64_t(r) * width + t / B)), slot = t % B;
        const bool cached = t < prefix;
        const int64_t nrow = p.lens.cu_q[r] + (t - prefix);  // packed row of a new token
        for (int h = 0; h < hkv; ++h)
          for (int d = 0; d < D; ++d) {
            const int64_t src = ((k0 + t) * hkv + h) * D + d;
            const int64_t dst = kv_element(layout, page, slot, h, d, B, hkv, D);
            if (cached) {
              k_cache.set(dst, p.k.get(src));
              v_cache.set(dst, p.v.get(src));
            } else {
              k_new.set((nrow * hkv + h) * D + d, p.k.get(src));
              v_new.set((nrow * hkv + h) * D + d, p.v.get(src));
            }
          }
        for (int d = 0; d < Di; ++d) {
          if (cached)
            ki_cache.set((page * B + slot) * Di + d, p.ki.get((k0 + t) * Di + d));
          else
            ki_new.set(nrow * Di + d, p.ki.get((k0 + t) * Di + d));
        }
      }
    }
  }

  // Element index of (page, slot, head, d) in k_cache / v_cache.
  int64_t kv_index(int64_t page, int64_t slot, int h, int d) const {
    return kv_element(layout, page, slot, h, d, p.cfg.block_size, p.cfg.num_kv_heads, p.cfg.head_dim);
  }
  PagedKVCache cache() {
    return {kv_logical_view(k_cache.view(), layout), kv_logical_view(v_cache.view(), layout), ki_cache.view(),
            {}, {}, {}};
  }
  PagedBatch batch() { return {cu_q.view(), kv.view(), page_table.view()}; }
  PagedPlan plan(const PagedOptions& opt = {}) {
    return paged_plan(p.cfg, q_lens.data(), kv_lens.data(), int(q_lens.size()), p.dtype,
                      Device::cpu(), opt);
  }
};

// The CPU index's tile-unit cases: pages of 64 and 128 keys, index head dims 64 / 128 (read in place)
// and 40 (a staged partial tile), each with AMX on and off (MSA_CPU_AMX); `run(c)` gets `base` with
// that block size and index head dim, under a trace naming the case.
template <class Run>
void for_each_tile_unit_case(const Config& base, Run run) {
  struct Shape {
    int block, index_dim;
  };
  for (const char* amx : {"1", "0"}) {
    ScopedKernelEnv env("MSA_CPU_AMX", amx);
    for (const Shape sh : {Shape{64, 64}, Shape{128, 128}, Shape{64, 40}}) {
      SCOPED_TRACE(std::string("MSA_CPU_AMX=") + amx + " block " + std::to_string(sh.block) + " Di " +
                   std::to_string(sh.index_dim));
      Config c = base;
      c.block_size = sh.block;
      c.index_head_dim = sh.index_dim;
      run(c);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

}  // namespace testing
}  // namespace msa
