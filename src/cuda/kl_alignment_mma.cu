// Host side of the tensor-core KL alignment (kl_alignment_mma_kernel.cuh): workspace plan, the
// key -> query lists (sparse; key_query_lists.cuh, as the attention backward), the student LSE
// (sparse: key-major partials and their merge, kl_student_lse.cuh), the query-major kernel (student
// LSE in dense mode, loss parts, dqi; skipped where dqi partials fit), the key-major kernel (dki, and
// dqi partials and loss where they fit), the reduces and the loss sum in a fixed order.
// Ids outside [0, local block of their query] other than -1 are skipped, and a duplicated id counts
// once, as in the CUDA attention forward and backward (the CPU backend rejects both).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "cuda/attention_backward_kernel.cuh"  // kLog2e
#include "cuda/attention_host.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/key_splits.h"
#include "cuda/query_partials.cuh"
#include "cuda/rows_aligned.h"
#include "cuda/kl_alignment_mma.h"
#include "cuda/kl_alignment_key_wide.cuh"
#include "cuda/kl_alignment_mma_kernel.cuh"
#include "cuda/kl_student_lse.cuh"
#include "cuda/workspace.cuh"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

// CTAs per key tile of the key-major kernel (kl_alignment_mma_kernel.cuh): key_splits_within
// (key_splits.h) over its dki partials (total_k x Di floats a split).
int kl_key_splits(const Problem& p) {
  return key_splits_within(std::size_t(p.total_k) * p.cfg.index_head_dim * sizeof(float));
}

// dqi and the loss from the key-major kernel (sparse, where the per-query partials fit), or from
// walk 2 of the query-major kernel over tile unions (MSA_KL_KERNEL=tiles forces it; tests cover both).
bool kl_dqi_from_partials(const Problem& p, bool sparse) {
  if (!sparse ||
      !query_partials_fit(p.total_q, p.cfg.num_kv_heads, p.cfg.topk, p.cfg.block_size, p.cfg.index_head_dim))
    return false;
  const char* e = std::getenv("MSA_KL_KERNEL");
  return e == nullptr || std::string(e) != "tiles";
}

// The key-major kernel over 256-row tiles (kl_alignment_key_wide.cuh) where the group fits it;
// MSA_KL_KERNEL=narrow keeps the 64-row one (tests run both).
bool kl_key_wide(int G) {
  const char* e = std::getenv("MSA_KL_KERNEL");
  return kl_wide_group(G) && (e == nullptr || std::string(e) != "narrow");
}

// Workspace: student LSE and loss parts per (query, group), the key-major kernel's dki partials
// (key_splits > 1), then (sparse) the key -> query lists, the student LSE's partials and, with dqi
// partials, those and the key tiles' loss parts.
struct KlMmaLayout {
  int key_splits = 1;
  bool sparse = false;
  bool dqi_partials = false;
  std::size_t total = 0;

  KlMmaLayout(const Problem& p, const KeyQueryListPlan* lists)
      : key_splits(kl_key_splits(p)), sparse(lists != nullptr), dqi_partials(kl_dqi_from_partials(p, sparse)) {
    const std::size_t qg = std::size_t(p.total_q) * p.cfg.num_kv_heads;
    total = align_up(qg * sizeof(float)) + align_up(qg * sizeof(double)) +
            align_up(partial_floats(p) * sizeof(float)) + (lists ? lists->bytes() : 0) +
            align_up(dqi_partial_floats(p) * sizeof(float)) + align_up(key_loss_parts(p) * sizeof(double)) +
            align_up(student_partial_floats(p) * sizeof(float));
  }
  std::size_t student_partial_floats(const Problem& p) const {
    return sparse ? std::size_t(p.total_q) * p.cfg.num_kv_heads * partials_per_row(p.cfg.topk, p.cfg.block_size) : 0;
  }
  std::size_t dqi_partial_floats(const Problem& p) const {
    return dqi_partials ? std::size_t(p.total_q) * p.cfg.num_kv_heads *
                              partials_per_row(p.cfg.topk, p.cfg.block_size) * std::size_t(p.cfg.index_head_dim)
                        : 0;
  }
  std::size_t key_loss_parts(const Problem& p) const {
    return dqi_partials ? (std::size_t(p.total_k) / kAttnKeys + p.batch + 1) * std::size_t(key_splits) : 0;
  }
  std::size_t partial_floats(const Problem& p) const {
    return key_splits > 1 ? std::size_t(key_splits) * std::size_t(p.total_k) * p.cfg.index_head_dim : 0;
  }
};

// The loss: the query-major kernel's parts or the key-major kernel's (whichever computed it),
// summed in a fixed order.
__global__ void kl_mma_loss_kernel(const double* part, int64_t n, const double* key_part, int64_t key_n, double norm,
                                   float* loss) {
  __shared__ double red[256];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 256) s += part[i];
  for (int64_t i = threadIdx.x; i < key_n; i += 256) s += key_part[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = float(red[0] * norm);
}

template <class T, int D, int Di>
void launch(const Problem& p, const KlMmaParams& a, int max_q, int max_k, cudaStream_t stream) {
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA KL alignment takes at most 65535 sequences");
  MSA_CHECK_ARG(p.cfg.num_kv_heads <= 65535, "num_kv_heads", "the CUDA KL alignment takes at most 65535 groups");
  using S = KlMmaSmem<D, Di>;
  const int64_t q_tiles = (int64_t(max_q) * a.G + kAttnRows - 1) / kAttnRows;
  MSA_CHECK_ARG(q_tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const int64_t k_tiles = (int64_t(max_k) + kAttnKeys - 1) / kAttnKeys;
  const int64_t rows = p.total_q * a.hkv;
  if (a.student_part) {  // sparse: student LSE key-major, then merged
    if (k_tiles > 0) {
      constexpr std::size_t smem = KlStudentSmem<Di>::kBytes;
      allow_dynamic_smem(reinterpret_cast<const void*>(kl_student_lse_partials_kernel<T, Di>), smem, "KL alignment");
      kl_student_lse_partials_kernel<T, Di>
          <<<dim3(unsigned(k_tiles), unsigned(p.batch), unsigned(a.key_splits)), kAttnThreads, smem, stream>>>(a);
      MSA_CUDA_CHECK_LAUNCH();
    }
    if (rows > 0) {
      kl_student_lse_merge_kernel<<<unsigned((rows + 3) / 4), 128, 0, stream>>>(a, p.batch, rows);
      MSA_CUDA_CHECK_LAUNCH();
    }
  }
  if (!a.dqi_part && q_tiles > 0) {  // dqi and the loss over tile unions (and the student LSE, dense)
    const std::size_t smem = S::query_bytes(kl_query_tiles(a.G), a.bitmap_words, a.union_cap);
    allow_dynamic_smem(reinterpret_cast<const void*>(kl_mma_query_kernel<T, D, Di>), smem, "KL alignment");
    kl_mma_query_kernel<T, D, Di>
        <<<dim3(unsigned(q_tiles), unsigned(a.hkv), unsigned(p.batch)), kAttnThreads, smem, stream>>>(a);
    MSA_CUDA_CHECK_LAUNCH();
  }
  if (k_tiles > 0) {
    const dim3 grid(unsigned(k_tiles), unsigned(p.batch), unsigned(a.key_splits));
    if (kl_key_wide(a.G)) {
      constexpr std::size_t smem = KlWideSmem<D, Di>::kBytes;
      allow_dynamic_smem(reinterpret_cast<const void*>(kl_mma_key_wide_kernel<T, D, Di>), smem, "KL alignment");
      kl_mma_key_wide_kernel<T, D, Di><<<grid, kKlWideThreads, smem, stream>>>(a);
    } else {
      const std::size_t smem = S::key_bytes(kl_query_tiles(a.G));
      allow_dynamic_smem(reinterpret_cast<const void*>(kl_mma_key_kernel<T, D, Di>), smem, "KL alignment");
      kl_mma_key_kernel<T, D, Di><<<grid, kAttnThreads, smem, stream>>>(a);
    }
    MSA_CUDA_CHECK_LAUNCH();
    if (a.key_splits > 1) {
      const int64_t n = p.total_k * Di;
      const unsigned grid = unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 65535)));
      kl_mma_dki_reduce_kernel<T, Di><<<grid, 256, 0, stream>>>(a);
      MSA_CUDA_CHECK_LAUNCH();
    }
  }
  if (a.dqi_part && rows > 0) {
    kl_mma_dqi_reduce_kernel<T, Di><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(a, p.batch, rows);
    MSA_CUDA_CHECK_LAUNCH();
  }
}

template <class T>
void launch_dims(const Problem& p, const KlMmaParams& a, int max_q, int max_k, cudaStream_t stream) {
  const int D = p.cfg.head_dim, Di = p.cfg.index_head_dim;
  if (D == 128 && Di == 128) return launch<T, 128, 128>(p, a, max_q, max_k, stream);
  if (D == 128 && Di == 64) return launch<T, 128, 64>(p, a, max_q, max_k, stream);
  if (D == 64 && Di == 128) return launch<T, 64, 128>(p, a, max_q, max_k, stream);
  return launch<T, 64, 64>(p, a, max_q, max_k, stream);
}

}  // namespace

bool kl_alignment_mma_supports(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& qi,
                               const TensorView& ki) {
  const int G = p.cfg.group_size();
  return (p.dtype == DType::bf16 || p.dtype == DType::f16) && (p.cfg.head_dim == 64 || p.cfg.head_dim == 128) &&
         (p.cfg.index_head_dim == 64 || p.cfg.index_head_dim == 128) && p.cfg.block_size % kAttnKeys == 0 &&
         G >= 1 && G <= kAttnRows && kAttnRows % G == 0 && rows_aligned(q, 16) && rows_aligned(k, 16) &&
         rows_aligned(qi, 16) && rows_aligned(ki, 16);
}

std::size_t kl_alignment_mma_workspace_bytes(const Problem& p) {
  const KeyQueryListPlan lists(p, "KL alignment");
  return KlMmaLayout(p, &lists).total;
}

void kl_alignment_mma(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& lse,
                      const TensorView& qi, const TensorView& ki, const TensorView& topk, float coeff,
                      const TensorView& loss, const TensorView& dqi, const TensorView& dki, const Context& ctx) {
  const bool sparse = topk.defined();
  const cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);
  const int max_q = p.total_q == 0 ? 0
                                   : max_length(p, p.varlen.max_seqlen_q, p.varlen.cu_seqlens_q,
                                                p.varlen.host_cu_seqlens_q, stream);
  const int max_k = p.total_k == 0 ? 0
                                   : max_length(p, p.varlen.max_seqlen_k, p.varlen.cu_seqlens_k,
                                                p.varlen.host_cu_seqlens_k, stream);
  std::unique_ptr<KeyQueryListPlan> list_plan;
  if (sparse) list_plan = std::make_unique<KeyQueryListPlan>(p, "KL alignment");
  const KlMmaLayout lay(p, list_plan.get());
  ScratchArena arena(ctx, lay.total);

  KlMmaParams a{};
  a.q = q.data;
  a.k = k.data;
  a.lse = lse.ptr<float>();
  a.qi = qi.data;
  a.ki = ki.data;
  a.topk = sparse ? topk.ptr<int32_t>() : nullptr;
  a.cu_q = p.varlen.cu_seqlens_q.ptr<int32_t>();
  a.cu_k = p.varlen.cu_seqlens_k.ptr<int32_t>();
  a.dqi = dqi.data;
  a.dki = dki.data;
  const std::size_t qg = std::size_t(p.total_q) * p.cfg.num_kv_heads;
  a.student_lse = arena.take<float>(qg);
  a.loss_part = arena.take<double>(qg);
  a.key_splits = lay.key_splits;
  a.total_k = p.total_k;
  a.dki_part = lay.key_splits > 1 ? arena.take<float>(lay.partial_floats(p)) : nullptr;
  a.q_s0 = q.stride[0], a.q_s1 = q.stride[1];
  a.k_s0 = k.stride[0], a.k_s1 = k.stride[1];
  a.lse_s0 = lse.stride[0], a.lse_s1 = lse.stride[1];
  a.qi_s0 = qi.stride[0], a.qi_s1 = qi.stride[1];
  a.ki_s0 = ki.stride[0];
  a.topk_s0 = sparse ? topk.stride[0] : 0;
  a.topk_s1 = sparse ? topk.stride[1] : 0;
  a.dqi_s0 = dqi.stride[0], a.dqi_s1 = dqi.stride[1];
  a.dki_s0 = dki.stride[0];
  a.hkv = p.cfg.num_kv_heads;
  a.G = p.cfg.group_size();
  a.B = p.cfg.block_size;
  a.topk_k = p.cfg.topk;
  a.scale_log2 = p.cfg.softmax_scale() * kLog2e;
  a.iscale = p.cfg.index_softmax_scale();
  // As the CPU backend: norm = coeff / (Hkv total_q), rounded once to f32.
  const float norm = p.total_q > 0 ? float(double(coeff) / (double(a.hkv) * double(p.total_q))) : 0.f;
  a.grad_scale = norm * a.iscale;

  if (sparse && max_k > 0) {
    // The union capacity of the query-major tiles (as the HMMA forward's).
    const int64_t blocks = (int64_t(max_k) + a.B - 1) / a.B + 1;
    const int64_t tile_queries = (kAttnRows - 1) / a.G + 2;
    a.bitmap_words = int(blocks / 32 + 1);
    a.union_cap = int(std::min<int64_t>(std::min<int64_t>(tile_queries, kAttnRows) * a.topk_k, blocks));

    a.lists = list_plan->build(p, a.topk, a.topk_s0, a.topk_s1, arena, stream);
    a.partials_per_row = partials_per_row(a.topk_k, a.B);
    a.student_part = arena.take<float>(lay.student_partial_floats(p));
    if (lay.dqi_partials) {
      a.dqi_part = arena.take<float>(lay.dqi_partial_floats(p));
      a.key_loss_part = arena.take<double>(lay.key_loss_parts(p));
      MSA_CUDA_CHECK(cudaMemsetAsync(a.key_loss_part, 0, lay.key_loss_parts(p) * sizeof(double), stream));
    }
  }
  // The query-major kernel's loss parts (a tile's at its first query): only when it runs.
  if (!a.dqi_part && qg > 0) MSA_CUDA_CHECK(cudaMemsetAsync(a.loss_part, 0, qg * sizeof(double), stream));

  if (p.dtype == DType::bf16)
    launch_dims<__nv_bfloat16>(p, a, max_q, max_k, stream);
  else
    launch_dims<__half>(p, a, max_q, max_k, stream);
  kl_mma_loss_kernel<<<1, 256, 0, stream>>>(a.loss_part, a.dqi_part ? 0 : int64_t(qg), a.key_loss_part,
                                            a.dqi_part ? int64_t(lay.key_loss_parts(p)) : 0, double(norm),
                                            loss.ptr<float>());
  MSA_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
