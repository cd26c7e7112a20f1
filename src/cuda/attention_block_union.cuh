// The sorted union of the key blocks that the queries of one attention row tile selected, built in
// shared memory by the whole CTA: a bitmap gives the union sorted and deduplicated, a prefix count
// gives each block its rank, and each rank gets a bit mask of the tile's queries that selected it
// (kMaskWords 64-bit words per rank: bit i - i_first for query i). Ids outside [0, local block] of
// their query (malformed rows) are skipped, never read. Used by the wgmma attention forward kernel
// (kMaskWords words) and by the HMMA forward and backward kernels (one word: tiles of at most 64
// queries), so that all of them walk exactly the same keys.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

// Shared-memory bookkeeping of the union, carved from one byte range: count, masks, union, bitmap,
// bitmap prefix counts.
template <int kMaskWords>
struct BlockUnionSmem {
  int* count;
  unsigned long long* mask;  // [union_cap][kMaskWords]
  int* blocks;               // [union_cap], ascending block ids
  uint32_t* bits;            // [bitmap_words]
  uint32_t* prefix;          // [bitmap_words]

  static std::size_t bytes(int bitmap_words, int union_cap) {
    return 16 + std::size_t(union_cap) * 8 * kMaskWords + std::size_t(union_cap) * 4 +
           std::size_t(bitmap_words) * 8 + 64;
  }
  __device__ static BlockUnionSmem carve(unsigned char* tail, int bitmap_words, int union_cap) {
    BlockUnionSmem s;
    s.count = reinterpret_cast<int*>(tail);
    s.mask = reinterpret_cast<unsigned long long*>(tail + 16);
    s.blocks = reinterpret_cast<int*>(s.mask + std::size_t(union_cap) * kMaskWords);
    s.bits = reinterpret_cast<uint32_t*>(s.blocks + union_cap);
    s.prefix = s.bits + bitmap_words;
    (void)bitmap_words;
    return s;
  }
};

// Builds the union for queries i_first..i_last (sequence-local) of group g; returns its size. Every
// thread of the CTA (kThreads of them, at least one warp) must call it; ends with a barrier.
template <int kThreads, int kMaskWords>
__device__ __forceinline__ int build_block_union(const BlockUnionSmem<kMaskWords>& s, const int32_t* topk, int64_t topk_s0,
                                 int64_t topk_s1, int topk_k, int union_cap, int g, int64_t q_begin,
                                 int64_t lq, int64_t lk, int B, int64_t i_first, int64_t i_last,
                                 int64_t local_last) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int words = int(local_last / 32 + 1);
  const int nq = int(i_last - i_first + 1);
  const int entries = nq * topk_k;
  for (int w = tid; w < words; w += kThreads) s.bits[w] = 0;
  for (int u = tid; u < union_cap * kMaskWords; u += kThreads) s.mask[u] = 0;
  __syncthreads();
  for (int e = tid; e < entries; e += kThreads) {
    const int64_t i = i_first + e / topk_k;
    const int id = topk[int64_t(g) * topk_s0 + (q_begin + i) * topk_s1 + e % topk_k];
    if (id >= 0 && id <= rules::local_block(rules::query_position(lq, lk, i), B))
      atomicOr(&s.bits[id >> 5], 1u << (id & 31));
  }
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < words; base += 32) {
      const int w = base + lane;
      const int c = w < words ? __popc(s.bits[w]) : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      if (w < words) s.prefix[w] = carry + incl - c;
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) *s.count = carry;
  }
  __syncthreads();
  const int num_union = *s.count;
  for (int w = tid; w < words; w += kThreads) {
    uint32_t bits = s.bits[w];
    int r = s.prefix[w];
    while (bits) {
      s.blocks[r++] = w * 32 + __ffs(bits) - 1;
      bits &= bits - 1;
    }
  }
  for (int e = tid; e < entries; e += kThreads) {
    const int64_t i = i_first + e / topk_k;
    const int id = topk[int64_t(g) * topk_s0 + (q_begin + i) * topk_s1 + e % topk_k];
    if (id >= 0 && id <= rules::local_block(rules::query_position(lq, lk, i), B)) {
      const int rank = s.prefix[id >> 5] + __popc(s.bits[id >> 5] & ((1u << (id & 31)) - 1u));
      if constexpr (kMaskWords == 1) {
        atomicOr(&s.mask[rank], 1ull << (i - i_first));
      } else {
        const int bit = int(i - i_first);
        atomicOr(&s.mask[rank * kMaskWords + (bit >> 6)], 1ull << (bit & 63));
      }
    }
  }
  __syncthreads();
  return num_union;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
