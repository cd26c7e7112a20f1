// Addressing of the paged cache and the workspace regions of a plan, shared by the CPU paged kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/problem.h"
#include "msa/paged.h"

namespace msa {
namespace detail {
namespace cpu {
namespace paged {

// Physical page of logical block j of request r.
inline int32_t page_of(const TensorView& page_table, int r, int64_t j) {
  return page_table.ptr<const int32_t>()[r * page_table.stride[0] + j * page_table.stride[1]];
}
// Row (page, slot, head) of a k/v cache [num_pages, B, Hkv, D].
template <class T>
inline T* kv_row(const TensorView& cache, int64_t page, int64_t slot, int64_t head) {
  return static_cast<T*>(cache.data) + page * cache.stride[0] + slot * cache.stride[1] +
         head * cache.stride[2];
}
// Row (page, slot) of the index-key cache [num_pages, B, Di].
template <class T>
inline T* ki_row(const TensorView& cache, int64_t page, int64_t slot) {
  return static_cast<T*>(cache.data) + page * cache.stride[0] + slot * cache.stride[1];
}

// A request as the varlen kernels see it: queries at packed rows q_begin.., keys 0..kv_len-1.
inline SequenceSpan request_span(const PagedPlan& plan, int r) {
  SequenceSpan s;
  s.q_begin = plan.cu_seqlens_q[r];
  s.q_len = plan.cu_seqlens_q[r + 1] - plan.cu_seqlens_q[r];
  s.k_begin = 0;
  s.k_len = plan.kv_lens[r];
  return s;
}

// Block scores of request r: [q_len][Hkv][num_blocks(kv_len)].
inline float* block_scores(unsigned char* ws, const PagedPlan& plan, int r) {
  return reinterpret_cast<float*>(ws + plan.scores_offset) + plan.score_offset[r];
}
inline float* partials(unsigned char* ws, const PagedPlan& plan, int64_t offset) {
  return reinterpret_cast<float*>(ws + plan.partials_offset) + offset;
}
inline unsigned char* thread_scratch(unsigned char* ws, const PagedPlan& plan, int thread) {
  return ws + plan.thread_offset + plan.thread_bytes * std::size_t(thread);
}

}  // namespace paged
}  // namespace cpu
}  // namespace detail
}  // namespace msa
