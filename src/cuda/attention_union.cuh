// The union of the blocks selected by the queries of one attention tile (rows = (query, head) pairs
// of one GQA group, queries i_first..i_last of one sequence), shared by the forward and the backward
// kernels so that both walk exactly the same keys.
#pragma once

#include <cstdint>

#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

// Shared-memory bookkeeping of the union (capacities chosen by the host: union_cap ranks, enough
// bitmap words for the longest sequence's blocks).
struct TileUnionSmem {
  int* count;                // number of blocks in the union
  unsigned long long* mask;  // [union_cap] per rank: bit (i - i_first) set when query i selected it
  int* blocks;               // [union_cap] the union, sorted ascending
  uint32_t* bits;            // [bitmap_words] the union as a bitmap
  uint32_t* prefix;          // [bitmap_words] blocks in the words before each word
};

// Builds the union of a tile's selected blocks and returns its size; every thread of the CTA calls it
// (it synchronizes). A bitmap gives the union sorted and deduplicated, a prefix count gives each block
// its rank, and each rank gets the bit mask of the tile's queries that selected it. Ids outside
// [0, local] of their query (malformed rows) are skipped, never read.
template <int Threads>
__device__ __forceinline__ int build_tile_union(const int32_t* topk, int64_t topk_s0, int64_t topk_s1,
                                                int topk_k, int union_cap, int g, int64_t q_begin,
                                                int64_t lq, int64_t lk, int B, int64_t i_first,
                                                int64_t i_last, int64_t local_last, TileUnionSmem u) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int words = int(local_last / 32 + 1);
  const int nq = int(i_last - i_first + 1);
  const int entries = nq * topk_k;
  for (int w = tid; w < words; w += Threads) u.bits[w] = 0;
  for (int r = tid; r < union_cap; r += Threads) u.mask[r] = 0;
  __syncthreads();
  for (int e = tid; e < entries; e += Threads) {
    const int64_t i = i_first + e / topk_k;
    const int id = topk[int64_t(g) * topk_s0 + (q_begin + i) * topk_s1 + e % topk_k];
    if (id >= 0 && id <= rules::local_block(rules::query_position(lq, lk, i), B))
      atomicOr(&u.bits[id >> 5], 1u << (id & 31));
  }
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < words; base += 32) {
      const int w = base + lane;
      const int c = w < words ? __popc(u.bits[w]) : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      if (w < words) u.prefix[w] = carry + incl - c;
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) *u.count = carry;
  }
  __syncthreads();
  const int num_union = *u.count;
  for (int w = tid; w < words; w += Threads) {
    uint32_t bits = u.bits[w];
    int r = u.prefix[w];
    while (bits) {
      u.blocks[r++] = w * 32 + __ffs(bits) - 1;
      bits &= bits - 1;
    }
  }
  for (int e = tid; e < entries; e += Threads) {
    const int64_t i = i_first + e / topk_k;
    const int id = topk[int64_t(g) * topk_s0 + (q_begin + i) * topk_s1 + e % topk_k];
    if (id >= 0 && id <= rules::local_block(rules::query_position(lq, lk, i), B)) {
      const int rank = u.prefix[id >> 5] + __popc(u.bits[id >> 5] & ((1u << (id & 31)) - 1u));
      atomicOr(&u.mask[rank], 1ull << (i - i_first));
    }
  }
  __syncthreads();
  return num_union;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
