// The one definition of MSA's rules (SPEC.md): positions of suffix queries, block math, causal
// visibility, which blocks are candidates, the selection order and the layout of a top-k row.
// Every code path (oracle, CPU backend, CUDA kernels) calls these instead of restating them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSA_HOST_DEVICE inline
#endif

namespace msa {
namespace rules {

// Query i of a sequence with lq queries and lk keys sits at absolute position lk - lq + i.
MSA_HOST_DEVICE int64_t query_position(int64_t lq, int64_t lk, int64_t i) { return lk - lq + i; }

// Key t is causally visible to a query at position p iff t <= p.
MSA_HOST_DEVICE bool causally_visible(int64_t t, int64_t p) { return t <= p; }

MSA_HOST_DEVICE int64_t block_of(int64_t t, int block_size) { return t / block_size; }
MSA_HOST_DEVICE int64_t num_blocks(int64_t num_keys, int block_size) {
  return (num_keys + block_size - 1) / block_size;
}
MSA_HOST_DEVICE int64_t block_begin(int64_t block, int block_size) { return block * block_size; }
MSA_HOST_DEVICE int32_t block_begin(int32_t block, int block_size) { return block * block_size; }  // 32-bit form
// One past the last key of `block` that a query at position p may see.
MSA_HOST_DEVICE int64_t visible_block_end(int64_t block, int block_size, int64_t p) {
  const int64_t end = (block + 1) * block_size;
  return end < p + 1 ? end : p + 1;
}

// The local block of a query at position p; it is always selected.
MSA_HOST_DEVICE int64_t local_block(int64_t p, int block_size) { return p / block_size; }
// 32-bit form, for kernels whose lengths are known to fit (a 64-bit division is a subroutine call on
// the GPU).
MSA_HOST_DEVICE int32_t local_block(int32_t p, int block_size) { return p / block_size; }

// Candidates are the blocks 0..local-1, all fully visible. n = min(local, k - 1) of them are chosen.
MSA_HOST_DEVICE int num_nonlocal_selected(int64_t local, int k) {
  return local < int64_t(k - 1) ? int(local) : k - 1;
}
// Slots used in a top-k row: the n non-local ids, then the local block in slot n; -1 after.
MSA_HOST_DEVICE int num_selected(int64_t local, int k) { return num_nonlocal_selected(local, k) + 1; }
MSA_HOST_DEVICE int local_slot(int64_t local, int k) { return num_nonlocal_selected(local, k); }

constexpr int32_t kUnusedSlot = -1;

// Selection order: a larger block score ranks first; ties go to the smaller block id.
MSA_HOST_DEVICE bool ranks_before(float score_a, int64_t id_a, float score_b, int64_t id_b) {
  return score_a > score_b || (score_a == score_b && id_a < id_b);
}
MSA_HOST_DEVICE bool ranks_before(double score_a, int64_t id_a, double score_b, int64_t id_b) {
  return score_a > score_b || (score_a == score_b && id_a < id_b);
}

// GQA: query head h belongs to group h / G.
MSA_HOST_DEVICE int group_of_head(int head, int group_size) { return head / group_size; }

}  // namespace rules
}  // namespace msa
