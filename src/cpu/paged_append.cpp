// CPU paged_append_kv: copies each new token's k / v / ki rows into the page slot of its position.
#include <algorithm>
#include <cstring>

#include "core/paged_backend.h"
#include "cpu/cpu_ops.h"
#include "cpu/paged_layout.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cpu {

void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache) {
  const int B = plan.cfg.block_size, hkv = plan.cfg.num_kv_heads;
  const std::size_t esz = dtype_size(plan.dtype);
  const std::size_t kv_bytes = esz * std::size_t(plan.cfg.head_dim);
  const std::size_t ki_bytes = esz * std::size_t(plan.cfg.index_head_dim);
  auto at = [esz](const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0) {
    return static_cast<unsigned char*>(t.data) +
           esz * std::size_t(i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2]);
  };
#pragma omp parallel for num_threads(plan.num_threads) schedule(static)
  for (int64_t row = 0; row < plan.total_q; ++row) {
    const int r = int(std::upper_bound(plan.cu_seqlens_q.begin(), plan.cu_seqlens_q.end(),
                                       int32_t(row)) - plan.cu_seqlens_q.begin()) - 1;
    const SequenceSpan s = paged::request_span(plan, r);
    const int64_t pos = s.query_position(row - s.q_begin);
    const int64_t page = paged::page_of(batch.page_table, r, rules::block_of(pos, B));
    const int64_t slot = pos - rules::block_begin(rules::block_of(pos, B), B);
    for (int g = 0; g < hkv; ++g) {
      std::memcpy(at(cache.k, page, slot, g), at(k_new, row, g), kv_bytes);
      std::memcpy(at(cache.v, page, slot, g), at(v_new, row, g), kv_bytes);
    }
    std::memcpy(at(cache.ki, page, slot), at(ki_new, row), ki_bytes);
  }
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
