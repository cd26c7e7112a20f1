// The public operations of MSA (SPEC.md). Each call validates its arguments (ArgumentError names
// the argument at fault) and runs on the backend where the tensors live (CPU or CUDA), chosen in one
// place (src/core/dispatch.cpp).
//
// Layouts (packed varlen, innermost dimension contiguous):
//   q   [total_q, Hq, D]     k, v [total_k, Hkv, D]     out [total_q, Hq, D]     lse [total_q, Hq] f32
//   qi  [total_q, Hkv, Di]   ki   [total_k, Di]
//   topk [Hkv, total_q, k] int32, -1 for unused slots; selected_lse [Hkv, total_q] f32
// Floating tensors of one call share one dtype (f32, f16, bf16; f64 on the CPU for gradient checks,
// where lse/selected_lse/loss are f64 too). Accumulation is f32 (f64 for f64 inputs).
#pragma once

#include <cstddef>

#include "msa/config.h"
#include "msa/tensor.h"

namespace msa {

// Scratch memory a caller can plan once and pass to every call. With data == nullptr the backend
// allocates what it needs itself (convenient, but not free of allocations on the hot path).
struct Workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

// Per-call execution settings.
struct Context {
  void* stream = nullptr;      // cudaStream_t for the CUDA backend; ignored on the CPU
  Workspace workspace;         // see Workspace
  bool deterministic = false;  // bitwise-reproducible reductions in backward passes
  int num_threads = 0;         // CPU backend: 0 means all hardware threads
};

enum class Op : int {
  index_topk,
  sparse_forward,
  sparse_backward,
  kl_alignment,
  dense_forward,
  dense_backward,
};

// Bytes of workspace `op` needs for this problem on `device` with inputs of `dtype` (scratch tiles
// follow the accumulator width, so f64 inputs need more).
std::size_t workspace_bytes(Op op, const Config& cfg, const Varlen& varlen, int64_t total_q,
                            int64_t total_k, Device device, int num_threads = 0,
                            DType dtype = DType::f32);

// 1. Index branch: top-k block ids per (group, query), and optionally the selected LSE.
//    `selected_lse` may be undefined (data == nullptr). `temperature` rescales only selected_lse:
//    logsumexp(s / T); ranking never depends on it.
void index_topk(const Config& cfg, const Varlen& varlen, const TensorView& qi, const TensorView& ki,
                const TensorView& topk, const TensorView& selected_lse, float temperature = 1.f,
                const Context& ctx = {});

// 2. Sparse attention forward over the selected blocks.
void sparse_attention_forward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                              const TensorView& k, const TensorView& v, const TensorView& topk,
                              const TensorView& out, const TensorView& lse, const Context& ctx = {});

// 3. Sparse attention backward for the fixed selection. dq, dk, dv are overwritten.
void sparse_attention_backward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                               const TensorView& k, const TensorView& v, const TensorView& topk,
                               const TensorView& out, const TensorView& lse, const TensorView& dout,
                               const TensorView& dq, const TensorView& dk, const TensorView& dv,
                               const Context& ctx = {});

// 4. KL alignment of the index branch to the main branch. Teacher: main-branch probabilities
//    recomputed from q, k and the main-branch `lse`, averaged over the G heads of a group. Student:
//    softmax of the index scores over the same tokens. With `topk` undefined the KL runs over all
//    visible tokens (dense warmup; pass the dense main-branch lse). Writes loss [1] (already scaled
//    by coeff and averaged over (query, group)) and overwrites dqi, dki with its gradients. Nothing
//    flows into q, k, v: the teacher is a constant.
void kl_alignment(const Config& cfg, const Varlen& varlen, const TensorView& q, const TensorView& k,
                  const TensorView& lse, const TensorView& qi, const TensorView& ki,
                  const TensorView& topk, float coeff, const TensorView& loss,
                  const TensorView& dqi, const TensorView& dki, const Context& ctx = {});

// 5. Dense causal GQA attention (the warmup main branch and the baseline): exactly the k = infinity
//    case of the sparse operations.
void dense_attention_forward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                             const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& lse, const Context& ctx = {});
void dense_attention_backward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                              const TensorView& k, const TensorView& v, const TensorView& out,
                              const TensorView& lse, const TensorView& dout, const TensorView& dq,
                              const TensorView& dk, const TensorView& dv, const Context& ctx = {});

// Backends compiled into this build.
bool cuda_available();
int cuda_device_count();

}  // namespace msa
