// Host side of the CUDA attention forward (sparse over topk, or dense causal when topk is undefined):
// checks what the kernel needs beyond the common validation, sizes the grid and shared memory, and
// launches the wgmma kernel (attention_forward_wgmma.cuh) on sm_90 when it is compiled in, else (or
// with MSA_ATTENTION_KERNEL=mma) attention_forward_kernel (attention_forward_kernel.cuh).
//
// Known limitation: ids in topk outside [0, local block of their query] (other than -1) are skipped,
// never read out of bounds and never reported; a duplicated id counts once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_forward_wgmma.cuh"
#include "cuda/attention_host.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

template <class T, int D>
void launch(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  const std::size_t smem = AttentionSmem<D>::bytes(params.bitmap_words, params.union_cap);
  allow_dynamic_smem(reinterpret_cast<const void*>(attention_forward_kernel<T, D>), smem, "attention forward");
  const int64_t tiles = (int64_t(max_q) * params.group_size + kAttnRows - 1) / kAttnRows;
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  MSA_CHECK_ARG(tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const dim3 grid(unsigned(tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch));
  attention_forward_kernel<T, D><<<grid, kAttnThreads, smem, stream>>>(params);
  MSA_CUDA_CHECK_LAUNCH();
}

// The wgmma (sm_90a warpgroup) kernel, 64-row tiles of one warpgroup, is compiled in with
// -DMSA_EXPERIMENTAL_WGMMA_ATTENTION (ON by default) and selected by MSA_ATTENTION_KERNEL=wgmma. It is
// not the default: on the H100 (commit 5a06e48, bench_prefill / bench_training) it was slower than
// the mma.sync kernel both sparse (128K, Hq64/Hkv4: 72.2 vs 66.4 ms) and dense (1698 vs 1552 ms).
bool wgmma_requested() {
#if defined(MSA_EXPERIMENTAL_WGMMA_ATTENTION)
  const char* e = std::getenv("MSA_ATTENTION_KERNEL");
  if (e == nullptr || std::string(e) != "wgmma") return false;
  // The kernel is built for sm_90a only: any other device takes the mma.sync kernel.
  int dev = 0, major = 0, minor = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

template <class T, int D>
void launch_wgmma(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  using Ring = wgmma::Ring<typename wgmma::CuteElem<T>::type, D>;
  const std::size_t smem = Ring::bytes(params.bitmap_words, params.union_cap);
  allow_dynamic_smem(reinterpret_cast<const void*>(wgmma::attention_forward_wgmma_kernel<T, D>), smem,
                     "attention forward (wgmma)");
  const int64_t tiles = (int64_t(max_q) * params.group_size + wgmma::kTileRows - 1) / wgmma::kTileRows;
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  MSA_CHECK_ARG(tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const dim3 grid(unsigned(tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch));
  wgmma::attention_forward_wgmma_kernel<T, D><<<grid, wgmma::kTileThreads, smem, stream>>>(params);
  MSA_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dim(const Problem& p, const AttentionParams& params, int max_q, bool use_wgmma, cudaStream_t stream) {
  if (use_wgmma) {
    if (p.cfg.head_dim == 128) return launch_wgmma<T, 128>(p, params, max_q, stream);
    return launch_wgmma<T, 64>(p, params, max_q, stream);
  }
  if (p.cfg.head_dim == 128) return launch<T, 128>(p, params, max_q, stream);
  return launch<T, 64>(p, params, max_q, stream);
}

}  // namespace

std::size_t attention_forward_workspace_bytes(const Problem&) { return 0; }

void attention_forward(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& topk, const TensorView& out, const TensorView& lse,
                       const Context& ctx) {
  check_attention_support(p, "forward");
  check_aligned_rows(q, "q", "forward");
  check_aligned_rows(k, "k", "forward");
  check_aligned_rows(v, "v", "forward");
  check_aligned_pairs(out, "out", "forward");
  if (p.total_q == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);

  const bool use_wgmma = wgmma_requested();
  AttentionParams a{};
  set_shared_params(a, p, q, k, v, topk, out, lse);
  a.scale_log2 = a.scale * 1.4426950408889634f;
  if (a.topk) {
    // The longest sequence is bounded by total_k when the caller gave no max_seqlen_k.
    const int64_t max_k = p.varlen.max_seqlen_k > 0 ? p.varlen.max_seqlen_k : p.total_k;
    set_union_capacity(a, max_k, use_wgmma ? wgmma::kTileRows : kAttnRows, p.cfg);
  }
  const int max_q =
      max_length(p, p.varlen.max_seqlen_q, p.varlen.cu_seqlens_q, p.varlen.host_cu_seqlens_q, stream);
  if (max_q == 0) return;
  if (p.dtype == DType::bf16) return launch_dim<__nv_bfloat16>(p, a, max_q, use_wgmma, stream);
  return launch_dim<__half>(p, a, max_q, use_wgmma, stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
