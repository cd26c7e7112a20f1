// Problem configuration and varlen lengths, shared by every operation and backend.
#pragma once

#include <cmath>
#include <cstdint>

#include "msa/tensor.h"

namespace msa {

struct Config {
  int num_q_heads = 64;      // Hq
  int num_kv_heads = 4;      // Hkv: one GQA group, and one index-query head, per KV head
  int head_dim = 128;        // D
  int index_head_dim = 128;  // Di
  int block_size = 128;      // B, tokens per key/value block
  int topk = 16;             // k, blocks selected per (query, group), the local block included
  float scale = 0.f;         // main-branch softmax scale; 0 means D^-0.5
  float index_scale = 0.f;   // index-branch scale; 0 means Di^-0.5

  int group_size() const { return num_q_heads / num_kv_heads; }
  float softmax_scale() const { return scale != 0.f ? scale : 1.f / std::sqrt(float(head_dim)); }
  float index_softmax_scale() const {
    return index_scale != 0.f ? index_scale : 1.f / std::sqrt(float(index_head_dim));
  }

  // Throws ArgumentError naming the field when the configuration is not usable.
  void validate() const;
};

// Packed variable-length batch, as in FlashAttention's varlen API. Sequence b has
// Lq_b = cu_seqlens_q[b+1] - cu_seqlens_q[b] queries and Lk_b keys, Lk_b >= Lq_b; its queries are the
// causal suffix of its keys.
//
// cu_seqlens_q / cu_seqlens_k: int32 [batch + 1] on the same device as the tensors.
// max_seqlen_q / max_seqlen_k: host-side bounds (size GPU grids without a device round trip); 0 means
// "compute them", which on a GPU costs a copy to the host and is not graph-capturable.
// host_cu_seqlens_q / host_cu_seqlens_k: optional host copies of the prefix sums. The CPU backend
// reads the tensors directly; on a GPU, when given, they are validated before launch.
struct Varlen {
  TensorView cu_seqlens_q;
  TensorView cu_seqlens_k;
  int max_seqlen_q = 0;
  int max_seqlen_k = 0;
  const int32_t* host_cu_seqlens_q = nullptr;
  const int32_t* host_cu_seqlens_k = nullptr;

  int batch() const { return cu_seqlens_q.ndim == 1 ? int(cu_seqlens_q.shape[0]) - 1 : 0; }
};

}  // namespace msa
