// Host side of the tensor-core KL alignment (kl_alignment_mma_kernel.cuh): workspace plan, the
// key -> query-tile lists (sparse; built exactly as the attention backward builds them, with its
// list kernels, so both walk the same tiles), the query-major kernel (student LSE, loss parts, dqi),
// the key-major kernel (dki) and the loss sum in a fixed order.
// Ids outside [0, local block of their query] other than -1 are skipped, and a duplicated id counts
// once, as in the CUDA attention forward and backward (the CPU backend rejects both).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/attention_backward_kernel.cuh"  // list kernels, tiles_per_query_span
#include "cuda/attention_host.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/key_splits.h"
#include "cuda/kl_alignment_mma.h"
#include "cuda/kl_alignment_mma_kernel.cuh"
#include "cuda/workspace.cuh"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

using u64 = unsigned long long;

// CTAs per key tile of the key-major kernel (kl_alignment_mma_kernel.cuh): key_splits_within
// (workspace.cuh) over its dki partials (total_k x Di floats a split).
int kl_key_splits(const Problem& p) {
  return key_splits_within(std::size_t(p.total_k) * p.cfg.index_head_dim * sizeof(float));
}

// Workspace: student LSE and loss parts per (query, group), the key-major kernel's dki partials
// (key_splits > 1), then (sparse) the list entries twice, the unique count, CUB's temporary storage
// and the list ranges.
struct KlMmaLayout {
  int64_t num_entries = 0;
  int64_t num_list_blocks = 0;
  int key_splits = 1;
  std::size_t cub_bytes = 0;
  std::size_t total = 0;

  KlMmaLayout(const Problem& p, bool sparse) : key_splits(kl_key_splits(p)) {
    const std::size_t qg = std::size_t(p.total_q) * p.cfg.num_kv_heads;
    total = align_up(qg * sizeof(float)) + align_up(qg * sizeof(double)) + align_up(partial_floats(p) * sizeof(float));
    if (!sparse) return;
    num_entries = int64_t(p.cfg.num_kv_heads) * p.total_q * p.cfg.topk * tiles_per_query_span(p.cfg.group_size());
    num_list_blocks = p.total_k / p.cfg.block_size + p.batch + 1;
    std::size_t sort_bytes = 0, unique_bytes = 0;
    const int n = int(std::min<int64_t>(num_entries, INT32_MAX));
    MSA_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, sort_bytes, static_cast<const u64*>(nullptr),
                                                  static_cast<u64*>(nullptr), n));
    MSA_CUDA_CHECK(cub::DeviceSelect::Unique(nullptr, unique_bytes, static_cast<const u64*>(nullptr),
                                             static_cast<u64*>(nullptr), static_cast<int*>(nullptr), n));
    cub_bytes = std::max(sort_bytes, unique_bytes);
    const std::size_t lists = std::size_t(p.cfg.num_kv_heads) * std::size_t(num_list_blocks);
    total += 2 * align_up(std::size_t(num_entries) * sizeof(u64)) + align_up(sizeof(int)) + align_up(cub_bytes) +
             2 * align_up(lists * sizeof(int));
  }
  std::size_t partial_floats(const Problem& p) const {
    return key_splits > 1 ? std::size_t(key_splits) * std::size_t(p.total_k) * p.cfg.index_head_dim : 0;
  }
};

bool aligned_rows(const TensorView& t, int outer_dims) {
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int d = 0; d < outer_dims; ++d)
    if (t.stride[d] % 8 != 0) return false;
  return true;
}

__global__ void kl_mma_loss_kernel(const double* part, int64_t n, double norm, float* loss) {
  __shared__ double red[256];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 256) s += part[i];
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
  if (q_tiles > 0) {
    const std::size_t smem = S::query_bytes(kl_query_tiles(a.G), a.bitmap_words, a.union_cap);
    allow_dynamic_smem(reinterpret_cast<const void*>(kl_mma_query_kernel<T, D, Di>), smem, "KL alignment");
    kl_mma_query_kernel<T, D, Di>
        <<<dim3(unsigned(q_tiles), unsigned(a.hkv), unsigned(p.batch)), kAttnThreads, smem, stream>>>(a);
    MSA_CUDA_CHECK_LAUNCH();
  }
  const int64_t k_tiles = (int64_t(max_k) + kAttnKeys - 1) / kAttnKeys;
  if (k_tiles > 0) {
    const std::size_t smem = S::key_bytes(kl_query_tiles(a.G));
    allow_dynamic_smem(reinterpret_cast<const void*>(kl_mma_key_kernel<T, D, Di>), smem, "KL alignment");
    kl_mma_key_kernel<T, D, Di>
        <<<dim3(unsigned(k_tiles), unsigned(p.batch), unsigned(a.key_splits)), kAttnThreads, smem, stream>>>(a);
    MSA_CUDA_CHECK_LAUNCH();
    if (a.key_splits > 1) {
      const int64_t n = p.total_k * Di;
      const unsigned grid = unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 65535)));
      kl_mma_dki_reduce_kernel<T, Di><<<grid, 256, 0, stream>>>(a);
      MSA_CUDA_CHECK_LAUNCH();
    }
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
         G >= 1 && G <= kAttnRows && kAttnRows % G == 0 && aligned_rows(q, 2) && aligned_rows(k, 2) &&
         aligned_rows(qi, 2) && aligned_rows(ki, 1);
}

std::size_t kl_alignment_mma_workspace_bytes(const Problem& p) { return KlMmaLayout(p, true).total; }

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
  const KlMmaLayout lay(p, sparse);
  MSA_CHECK_ARG(lay.num_entries < (int64_t(1) << 31), "topk",
                "too many (group, query, slot) entries for the CUDA KL alignment");
  MSA_CHECK_ARG(uint64_t(p.cfg.num_kv_heads) * uint64_t(lay.num_list_blocks) < 0xffffffffull, "ki",
                "too many key blocks for the CUDA KL alignment");
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
  a.num_list_blocks = lay.num_list_blocks;

  if (qg > 0) MSA_CUDA_CHECK(cudaMemsetAsync(a.loss_part, 0, qg * sizeof(double), stream));
  if (sparse && max_k > 0) {
    // The union capacity of the query-major tiles (as the HMMA forward's).
    const int64_t blocks = (int64_t(max_k) + a.B - 1) / a.B + 1;
    const int64_t tile_queries = (kAttnRows - 1) / a.G + 2;
    a.bitmap_words = int(blocks / 32 + 1);
    a.union_cap = int(std::min<int64_t>(std::min<int64_t>(tile_queries, kAttnRows) * a.topk_k, blocks));

    u64* entries = arena.take<u64>(std::size_t(lay.num_entries));
    u64* sorted = arena.take<u64>(std::size_t(lay.num_entries));
    int* num_unique = arena.take<int>(1);
    void* cub_tmp = arena.take<unsigned char>(lay.cub_bytes);
    const std::size_t lists = std::size_t(a.hkv) * std::size_t(lay.num_list_blocks);
    int* begin = arena.take<int>(lists);
    int* end = arena.take<int>(lists);
    MSA_CUDA_CHECK(cudaMemsetAsync(begin, 0, lists * sizeof(int), stream));
    MSA_CUDA_CHECK(cudaMemsetAsync(end, 0, lists * sizeof(int), stream));
    const int n = int(lay.num_entries);
    if (n > 0) {
      // The backward's list kernels read only these fields of its parameters.
      BackwardParams lp{};
      lp.topk = a.topk;
      lp.cu_q = a.cu_q;
      lp.cu_k = a.cu_k;
      lp.topk_s0 = a.topk_s0;
      lp.topk_s1 = a.topk_s1;
      lp.topk_k = a.topk_k;
      lp.group_size = a.G;
      lp.block_size = a.B;
      lp.num_list_blocks = lay.num_list_blocks;
      const int64_t slots = int64_t(a.hkv) * p.total_q * a.topk_k;
      const unsigned grid = unsigned(std::max<int64_t>(1, std::min<int64_t>((slots + 255) / 256, 65535)));
      attention_backward_list_entries_kernel<<<grid, 256, 0, stream>>>(lp, p.batch, p.total_q, a.hkv, entries);
      MSA_CUDA_CHECK_LAUNCH();
      std::size_t tmp = lay.cub_bytes;
      MSA_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(cub_tmp, tmp, entries, sorted, n, 0, 64, stream));
      tmp = lay.cub_bytes;
      MSA_CUDA_CHECK(cub::DeviceSelect::Unique(cub_tmp, tmp, sorted, entries, num_unique, n, stream));
      const unsigned rgrid = unsigned(std::max<int64_t>(1, std::min<int64_t>((lay.num_entries + 255) / 256, 65535)));
      attention_backward_list_ranges_kernel<<<rgrid, 256, 0, stream>>>(entries, num_unique, begin, end);
      MSA_CUDA_CHECK_LAUNCH();
    }
    a.lists = entries;
    a.list_begin = begin;
    a.list_end = end;
  }

  if (p.dtype == DType::bf16)
    launch_dims<__nv_bfloat16>(p, a, max_q, max_k, stream);
  else
    launch_dims<__half>(p, a, max_q, max_k, stream);
  kl_mma_loss_kernel<<<1, 256, 0, stream>>>(a.loss_part, int64_t(qg), double(norm), loss.ptr<float>());
  MSA_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
