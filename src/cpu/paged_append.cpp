// CPU paged_append_kv: copies each new token's k / v / ki rows into the page slot of its position;
// FP8 caches get the rows quantised with the page's scale (docs/serving.md "FP8 caches").
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/paged_backend.h"
#include "cpu/cpu_ops.h"
#include "cpu/element.h"
#include "cpu/paged_fp8.h"
#include "cpu/paged_layout.h"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cpu {

namespace {

// Where each new token goes: page and slot of its position.
struct Slot {
  int64_t page, slot;
};
Slot slot_of(const PagedPlan& plan, const PagedBatch& batch, int64_t row) {
  const int B = plan.cfg.block_size;
  const int r = int(std::upper_bound(plan.cu_seqlens_q.begin(), plan.cu_seqlens_q.end(),
                                     int32_t(row)) - plan.cu_seqlens_q.begin()) - 1;
  const SequenceSpan s = paged::request_span(plan, r);
  const int64_t pos = s.query_position(row - s.q_begin);
  return {paged::page_of(batch.page_table, r, rules::block_of(pos, B)),
          pos - rules::block_begin(rules::block_of(pos, B), B)};
}

// The scales of the pages this step writes must be usable divisors (checked before any write).
void check_scales(const PagedPlan& plan, const PagedBatch& batch, const PagedKVCache& cache) {
  auto check = [](const TensorView& scale, const char* name, int64_t page, int64_t head) {
    const float s = paged::page_scale(scale, page, head);
    MSA_CHECK_ARG(std::isfinite(s) && s > 0.f, name,
                  "entry for page " + std::to_string(page) + (scale.ndim == 2 ? ", head " + std::to_string(head) : std::string()) +
                      " is " + std::to_string(s) + "; a page written by paged_append_kv needs a "
                      "finite positive scale");
  };
  for (int64_t row = 0; row < plan.total_q; ++row) {
    const Slot at = slot_of(plan, batch, row);
    for (int g = 0; g < plan.cfg.num_kv_heads; ++g) {
      if (paged::is_fp8(cache.k)) check(cache.k_scale, "k_scale", at.page, g);
      if (paged::is_fp8(cache.v)) check(cache.v_scale, "v_scale", at.page, g);
    }
    if (paged::is_fp8(cache.ki)) check(cache.ki_scale, "ki_scale", at.page, 0);
  }
}

// One row of n elements of the query dtype T into a cache row: copied, or quantised for FP8.
template <class T>
void write_row(const T* src, int n, const TensorView& cache, const TensorView& scale, int64_t page,
               int64_t head, void* dst) {
  if (paged::is_fp8(cache))
    paged::quantise_row<T>(src, n, paged::page_scale(scale, page, head), static_cast<uint8_t*>(dst));
  else
    std::memcpy(dst, src, sizeof(T) * std::size_t(n));
}

template <class T>
void append_impl(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                 const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache) {
  const int hkv = plan.cfg.num_kv_heads, D = plan.cfg.head_dim, Di = plan.cfg.index_head_dim;
  auto at = [](const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0) {
    return static_cast<unsigned char*>(t.data) +
           dtype_size(t.dtype) * std::size_t(i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2]);
  };
#pragma omp parallel for num_threads(plan.num_threads) schedule(static)
  for (int64_t row = 0; row < plan.total_q; ++row) {
    const Slot s = slot_of(plan, batch, row);
    for (int g = 0; g < hkv; ++g) {
      write_row<T>(row3<const T>(k_new, row, g), D, cache.k, cache.k_scale, s.page, g,
                   at(cache.k, s.page, s.slot, g));
      write_row<T>(row3<const T>(v_new, row, g), D, cache.v, cache.v_scale, s.page, g,
                   at(cache.v, s.page, s.slot, g));
    }
    write_row<T>(row2<const T>(ki_new, row), Di, cache.ki, cache.ki_scale, s.page, 0,
                 at(cache.ki, s.page, s.slot));
  }
}

}  // namespace

void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache) {
  if (paged::is_fp8(cache.k) || paged::is_fp8(cache.v) || paged::is_fp8(cache.ki))
    check_scales(plan, batch, cache);
  MSA_CPU_DISPATCH_FLOAT(plan.dtype, [&] {
    if constexpr (std::is_same_v<scalar_t, double>)
      throw Error("msa: paged serving has no float64 path");
    else
      append_impl<scalar_t>(plan, batch, k_new, v_new, ki_new, cache);
  });
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
