// The query tile a paged kernel's CTA works on. Every paged grid is laid out request-major, then
// query tile, then the kernel's own inner indices (groups, key splits, block chunks): a kernel
// divides those off blockIdx.x and passes the rest here.
#pragma once

#include <cstdint>

#include "msa/paged.h"

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

// The plan's host maxima, which sized every grid, tensor and workspace region a kernel touches.
struct PlanBounds {
  int64_t total_q = 0;    // rows of q / out / topk and the new k / v / ki rows
  int64_t max_q_len = 0;  // the tiles' shared-memory rows are sized by it
  int64_t max_kv_len = 0; // page_table has at least num_blocks(max_kv_len) columns (checked on the host)
};
inline PlanBounds bounds_of(const PagedPlan& plan) { return {plan.total_q, plan.max_q_len, plan.max_kv_len}; }

// Request r's rows and length as the kernels use them: the device's cu_seqlens_q / kv_lens clamped to
// the plan's maxima. A batch must hold the plan's lengths (paged.h); clamping makes one that does not
// stay inside every buffer (rows < total_q, tile rows <= max_q_len, blocks < the page table's width)
// instead of reading or writing past them.
struct RequestSpan {
  int64_t q_begin, q_len, kv;
};
__device__ __forceinline__ RequestSpan request_span(const int32_t* cu_q, const int32_t* kv_lens, int r,
                                                    const PlanBounds& b) {
  RequestSpan s;
  s.q_begin = min(max(int64_t(cu_q[r]), int64_t(0)), b.total_q);
  s.q_len = min(min(max(int64_t(cu_q[r + 1]), s.q_begin), b.total_q) - s.q_begin, b.max_q_len);
  s.kv = min(int64_t(kv_lens[r]), b.max_kv_len);
  return s;
}

struct QueryTile {
  int r;        // request
  int q_len;    // its new tokens, packed from row qbase
  int q0, nq;   // the tile's queries [q0, q0 + nq); nq == 0: the tile lies past the request's queries
  int64_t qbase;
  int64_t kv;   // its cached tokens, the new ones included
};

__device__ __forceinline__ QueryTile query_tile(int64_t id, int tiles, int tile_q, const int32_t* cu_q,
                                                const int32_t* kv_lens, const PlanBounds& b) {
  QueryTile t;
  t.r = int(id / tiles);
  const RequestSpan s = request_span(cu_q, kv_lens, t.r, b);
  t.qbase = s.q_begin;
  t.q_len = int(s.q_len);
  t.q0 = int(id % tiles) * tile_q;
  t.nq = t.q0 < t.q_len ? min(tile_q, t.q_len - t.q0) : 0;
  t.kv = s.kv;
  return t;
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
