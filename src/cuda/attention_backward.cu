// Host side of the CUDA attention backward (sparse over topk, or dense causal when topk is
// undefined): checks what the kernels need beyond the common validation, plans the workspace, builds
// the key -> query lists on the device (key_query_lists.cuh: no host round trip) and launches the
// delta, dQ and dK/dV kernels (attention_backward_kernel.cuh; dQ on Hopper: attention_backward_dq_tma.cuh).
//
// Every launch is deterministic (no floating-point atomics, fixed accumulation orders), so results
// are bitwise identical run to run whatever Context::deterministic says.
// Known limitation, as in the forward: ids outside [0, local block of their query] (other than -1)
// are skipped, never read out of bounds and never reported; a duplicated id counts once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/attention_backward_dkdv_wgmma.cuh"
#include "cuda/attention_backward_dq_tma.cuh"
#include "cuda/attention_backward_kernel.cuh"
#include "cuda/attention_host.cuh"
#include "cuda/attention_tma_host.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"
#include "cuda/key_query_lists.cuh"
#include "cuda/key_splits.h"
#include "cuda/query_partials.cuh"
#include "cuda/workspace.cuh"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

// CTAs per key tile of the dK/dV kernel: key_splits_within (key_splits.h) over its partials
// (total_k x Hkv x 2D floats a split), and at most 65535 in grid z with the sequences.
int dkdv_key_splits(const Problem& p) {
  const int splits =
      key_splits_within(std::size_t(p.total_k) * p.cfg.num_kv_heads * 2 * p.cfg.head_dim * sizeof(float));
  return std::max(1, std::min(splits, 65535 / std::max(1, p.batch)));
}

// dQ from partials written by the dK/dV kernel (sparse, where they fit), or by a query-major dQ
// kernel over tile unions, whose memory does not grow with k. MSA_ATTENTION_DQ=tiles or =mma forces
// the query-major path (tests use them to cover every kernel).
bool dq_from_partials(const Problem& p, bool sparse) {
  if (!sparse || !query_partials_fit(p.total_q, p.cfg.num_q_heads, p.cfg.topk, p.cfg.block_size, p.cfg.head_dim))
    return false;
  const char* e = std::getenv("MSA_ATTENTION_DQ");
  return e == nullptr || (std::string(e) != "tiles" && std::string(e) != "mma");
}

// The query-major dQ: the TMA kernel (attention_backward_dq_tma.cuh) on sm_90 where its 128-row tiles
// apply, else (or with MSA_ATTENTION_DQ=mma) the 64-row mma.sync kernel.
bool dq_tma(const Problem& p, bool sparse) {
  const char* e = std::getenv("MSA_ATTENTION_DQ");
  if (e != nullptr && std::string(e) == "mma") return false;
  if (!is_sm90()) return false;
  return tma_tiles_applicable(p, sparse, [&](int record_bytes) {
    using E = cute::bfloat16_t;  // sizes are those of any 16-bit type
    return p.cfg.head_dim == 128 ? tma::DqSmem<E, 128>::bytes(record_bytes) : tma::DqSmem<E, 64>::bytes(record_bytes);
  });
}

// dK/dV on wgmma (attention_backward_dkdv_wgmma.cuh) on sm_90 where the dK/dV kernel writes no dQ
// partials; MSA_ATTENTION_DKDV=mma keeps the mma.sync kernel (tests run both).
bool dkdv_wgmma(bool dq_partials) {
  if (dq_partials || !is_sm90()) return false;
  const char* e = std::getenv("MSA_ATTENTION_DKDV");
  return e == nullptr || std::string(e) != "mma";
}

// Workspace plan: delta, the dK/dV split partials (key_splits > 1), then (sparse) the key -> query
// lists and, where they fit, the dQ partials, or the TMA dQ's union records.
struct BackwardLayout {
  int key_splits = 1;
  bool dq_partials = false;
  bool dq_tma = false;
  std::size_t total = 0;

  BackwardLayout(const Problem& p, const KeyQueryListPlan* lists)
      : key_splits(dkdv_key_splits(p)),
        dq_partials(dq_from_partials(p, lists != nullptr)),
        dq_tma(!dq_partials && cuda::dq_tma(p, lists != nullptr)) {
    total = align_up(std::size_t(p.total_q) * p.cfg.num_q_heads * sizeof(float)) +
            align_up(partial_floats(p) * sizeof(float)) + (lists ? lists->bytes() : 0) +
            align_up(dq_partial_floats(p) * sizeof(float)) + (dq_tma ? TmaTileLayout(p, lists != nullptr).bytes : 0);
  }
  std::size_t dq_partial_floats(const Problem& p) const {
    return dq_partials ? std::size_t(p.total_q) * p.cfg.num_q_heads *
                             partials_per_row(p.cfg.topk, p.cfg.block_size) * std::size_t(p.cfg.head_dim)
                       : 0;
  }
  std::size_t partial_floats(const Problem& p) const {
    return key_splits > 1 ? std::size_t(key_splits) * std::size_t(p.total_k) * p.cfg.num_kv_heads * 2 *
                                std::size_t(p.cfg.head_dim)
                          : 0;
  }
};

// The TMA dQ; false (nothing launched) when the driver cannot describe a tensor.
template <class T, int D>
bool launch_dq_tma(const Problem& p, const BackwardParams& a, const TensorView& q, const TensorView& k,
                   const TensorView& v, const TensorView& topk, const TensorView& out, const TensorView& lse,
                   const TensorView& dout, int max_q, ScratchArena& arena, cudaStream_t stream) {
  const TmaTileLayout lay(p, topk.defined());
  tma::TmaDqParams dp{};
  set_shared_params(dp.t.a, p, q, k, v, topk, out, lse);
  dp.t.a.scale_log2 = a.scale_log2;
  dp.t.a.bitmap_words = lay.caps.bitmap_words;
  dp.t.a.union_cap = lay.caps.union_cap;
  if (!encode_query_rows_map(&dp.do_map, p, dout) ||
      !prepare_tma_tiles(p, dp.t, q, k, v, tma::kDqKeys, max_q, lay, arena, stream))
    return false;
  dp.delta = a.delta;
  dp.dq = a.dq;
  dp.dq_s0 = a.dq_s0;
  dp.dq_s1 = a.dq_s1;
  dp.num_q_heads = a.num_q_heads;
  const std::size_t smem = tma::DqSmem<typename wgmma::CuteElem<T>::type, D>::bytes(lay.record_bytes);
  allow_dynamic_smem(reinterpret_cast<const void*>(tma::attention_backward_dq_tma_kernel<T, D>), smem,
                     "attention backward (tma dq)");
  tma::attention_backward_dq_tma_kernel<T, D><<<tma_ctas(dp.t), tma::kThreads, smem, stream>>>(dp);
  MSA_CUDA_CHECK_LAUNCH();
  return true;
}

// Delta, dQ (the TMA kernel when `dq_tma()` launches it, else the mma.sync kernel unless the dK/dV
// kernel writes dQ partials), dK/dV and the reduces.
template <class T, int D, class DqTma>
void launch(const Problem& p, const BackwardParams& a, int max_q, int max_k, DqTma&& dq_tma, cudaStream_t stream) {
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention backward takes at most 65535 sequences");
  const int64_t rows = p.total_q * p.cfg.num_q_heads;
  if (rows > 0) {
  attention_backward_delta_kernel<T, D><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(a, rows);
  MSA_CUDA_CHECK_LAUNCH();
  }

  const int64_t q_tiles = (int64_t(max_q) * a.group_size + kAttnRows - 1) / kAttnRows;
  MSA_CHECK_ARG(q_tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const bool dq_partials = a.dq_part != nullptr;
  if (q_tiles > 0 && !dq_partials && !dq_tma()) {
  const std::size_t dq_smem = BackwardSmem<D>::dq_bytes(a.bitmap_words, a.union_cap);
  allow_dynamic_smem(reinterpret_cast<const void*>(attention_backward_dq_kernel<T, D>), dq_smem, "attention backward");
  attention_backward_dq_kernel<T, D>
      <<<dim3(unsigned(q_tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch)), kAttnThreads, dq_smem,
         stream>>>(a);
  MSA_CUDA_CHECK_LAUNCH();
  }

  const int64_t k_tiles = (int64_t(max_k) + kAttnKeys - 1) / kAttnKeys;
  if (k_tiles == 0) return;
  const dim3 grid(unsigned(k_tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch * a.key_splits));
  if (dkdv_wgmma(dq_partials)) {
    // A warpgroup per 64 keys: two over the 128 keys of one block where blocks hold 128.
    auto run = [&](auto warpgroups) {
      constexpr int kW = decltype(warpgroups)::value;
      constexpr std::size_t smem = DkdvWgmmaSmem<typename wgmma::CuteElem<T>::type, D, kW>::kBytes;
      const auto kernel = attention_backward_dkdv_wgmma_kernel<T, D, kW>;
      allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, "attention backward (wgmma dK/dV)");
      const unsigned key_tiles = unsigned((int64_t(max_k) + 64 * kW - 1) / (64 * kW));
      kernel<<<dim3(key_tiles, grid.y, grid.z), 128 * kW, smem, stream>>>(a);
    };
    if (p.cfg.block_size % 128 == 0)
      run(std::integral_constant<int, 2>{});
    else
      run(std::integral_constant<int, 1>{});
  } else {
    const std::size_t kv_smem = BackwardSmem<D>::dkdv_bytes(dq_partials);
    const void* dkdv = dq_partials ? reinterpret_cast<const void*>(attention_backward_dkdv_kernel<T, D, true>)
                                   : reinterpret_cast<const void*>(attention_backward_dkdv_kernel<T, D, false>);
    allow_dynamic_smem(dkdv, kv_smem, "attention backward");
    if (dq_partials)
      attention_backward_dkdv_kernel<T, D, true><<<grid, kAttnThreads, kv_smem, stream>>>(a);
    else
      attention_backward_dkdv_kernel<T, D, false><<<grid, kAttnThreads, kv_smem, stream>>>(a);
  }
  MSA_CUDA_CHECK_LAUNCH();
  if (a.key_splits > 1) {
    const int64_t n = p.total_k * p.cfg.num_kv_heads * 2 * D;
    const unsigned rgrid = unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 65535)));
    attention_backward_dkdv_reduce_kernel<T, D><<<rgrid, 256, 0, stream>>>(a);
    MSA_CUDA_CHECK_LAUNCH();
  }
  if (dq_partials && rows > 0) {
    attention_backward_dq_reduce_kernel<T, D><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(a, p.batch, rows);
    MSA_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

std::size_t attention_backward_workspace_bytes(const Problem& p, bool sparse) {
  if (!sparse) return BackwardLayout(p, nullptr).total;
  const KeyQueryListPlan lists(p, "attention backward");
  return BackwardLayout(p, &lists).total;
}

void attention_backward(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& topk, const TensorView& out, const TensorView& lse,
                        const TensorView& dout, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, const Context& ctx) {
  check_attention_support(p, "backward");
  check_aligned_rows(q, "q", "backward");
  check_aligned_rows(k, "k", "backward");
  check_aligned_rows(v, "v", "backward");
  check_aligned_rows(dout, "dout", "backward");
  check_aligned_pairs(dq, "dq", "backward");
  check_aligned_pairs(dk, "dk", "backward");
  check_aligned_pairs(dv, "dv", "backward");
  const bool sparse = topk.defined();
  const cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);
  const int max_q = p.total_q == 0 ? 0
                                   : max_length(p, p.varlen.max_seqlen_q, p.varlen.cu_seqlens_q,
                                                p.varlen.host_cu_seqlens_q, stream);
  const int max_k = p.total_k == 0 ? 0
                                   : max_length(p, p.varlen.max_seqlen_k, p.varlen.cu_seqlens_k,
                                                p.varlen.host_cu_seqlens_k, stream);
  const int64_t D = p.cfg.head_dim;
  if (max_k == 0) return;  // no key: dq has no row either (Lk >= Lq)

  std::unique_ptr<KeyQueryListPlan> list_plan;
  if (sparse) list_plan = std::make_unique<KeyQueryListPlan>(p, "attention backward");
  const BackwardLayout lay(p, list_plan.get());
  ScratchArena arena(ctx, lay.total);

  BackwardParams a{};
  set_shared_params(a, p, q, k, v, topk, out, lse);
  a.dout = dout.data;
  a.dq = dq.data;
  a.dk = dk.data;
  a.dv = dv.data;
  a.delta = arena.take<float>(std::size_t(p.total_q) * p.cfg.num_q_heads);
  a.key_splits = lay.key_splits;
  a.dkdv_part = lay.key_splits > 1 ? arena.take<float>(lay.partial_floats(p)) : nullptr;
  a.total_k = p.total_k;
  a.num_kv_heads = p.cfg.num_kv_heads;
  a.do_s0 = dout.stride[0], a.do_s1 = dout.stride[1];
  a.dq_s0 = dq.stride[0], a.dq_s1 = dq.stride[1];
  a.dk_s0 = dk.stride[0], a.dk_s1 = dk.stride[1];
  a.dv_s0 = dv.stride[0], a.dv_s1 = dv.stride[1];
  a.num_q_heads = p.cfg.num_q_heads;
  a.scale_log2 = a.scale * kLog2e;

  if (sparse) {
    set_union_capacity(a, max_k, kAttnRows, p.cfg);  // as the forward's HMMA tiles
    a.lists = list_plan->build(p, a.topk, a.topk_s0, a.topk_s1, arena, stream);
    if (lay.dq_partials) {
      a.dq_part = arena.take<float>(lay.dq_partial_floats(p));
      a.dq_partials_per_row = partials_per_row(p.cfg.topk, p.cfg.block_size);
    }
  }

  // The TMA dQ runs after delta (launched first by `launch`), so it is launched from there through
  // this hook; `launch` skips the mma.sync dQ when it ran.
  auto run = [&](auto t_tag, auto d_tag) {
    using T = decltype(t_tag);
    constexpr int kD = decltype(d_tag)::value;
    launch<T, kD>(p, a, max_q, max_k, [&] {
      return lay.dq_tma && max_q > 0 && launch_dq_tma<T, kD>(p, a, q, k, v, topk, out, lse, dout, max_q, arena, stream);
    }, stream);
  };
  if (p.dtype == DType::bf16) {
    if (D == 128) return run(__nv_bfloat16{}, std::integral_constant<int, 128>{});
    return run(__nv_bfloat16{}, std::integral_constant<int, 64>{});
  }
  if (D == 128) return run(__half{}, std::integral_constant<int, 128>{});
  return run(__half{}, std::integral_constant<int, 64>{});
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
