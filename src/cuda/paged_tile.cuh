// The query tile a paged kernel's CTA works on. Every paged grid is laid out request-major, then
// query tile, then the kernel's own inner indices (groups, key splits, block chunks): a kernel
// divides those off blockIdx.x and passes the rest here.
#pragma once

#include <cstdint>

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

struct QueryTile {
  int r;        // request
  int q_len;    // its new tokens, packed from row qbase
  int q0, nq;   // the tile's queries [q0, q0 + nq); nq == 0: the tile lies past the request's queries
  int64_t qbase;
  int64_t kv;   // its cached tokens, the new ones included
};

__device__ __forceinline__ QueryTile query_tile(int64_t id, int tiles, int tile_q, const int32_t* cu_q,
                                                const int32_t* kv_lens) {
  QueryTile t;
  t.r = int(id / tiles);
  t.qbase = cu_q[t.r];
  t.q_len = cu_q[t.r + 1] - int(t.qbase);
  t.q0 = int(id % tiles) * tile_q;
  t.nq = t.q0 < t.q_len ? min(tile_q, t.q_len - t.q0) : 0;
  t.kv = kv_lens[t.r];
  return t;
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
