// CUDA paged_run: (1) block scores (paged_index_mma.cuh, paged_index_stream.cuh or
// paged_index.cuh), (2) top-k selection with the contiguous index branch's select kernel
// (index_select.cuh), (3) sparse or dense attention (paged_attention_mma.cuh or paged_attention.cuh),
// (4) the LSE merge of key splits. Grids come from the plan's host maxima (paged_layout.h); every
// length is read on the device, nothing is allocated or synchronised: the call is graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "core/paged_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/grid_dependency.cuh"
// index_select.cuh defines its kernel out of line and index_topk.cu already has a copy: this
// translation unit takes its own copy of the same kernel under another name.
#define select_topk_kernel paged_select_topk_kernel
#include "cuda/index_select.cuh"
#undef select_topk_kernel
#include "cuda/paged_attention.cuh"
#include "cuda/paged_attention_mma.cuh"
#include "cuda/paged_index.cuh"
#include "cuda/paged_index_mma.cuh"
#include "cuda/paged_index_stream.cuh"
#include "cuda/paged_layout.h"
#include "cuda/rows_aligned.h"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

int max_smem_per_block() {
  int dev = 0, bytes = 0;  // cheap attribute queries, legal inside a capture
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

// What one kernel has been allowed of dynamic shared memory, per device (the attribute is set per
// device: a record shared by all devices let a launch on a second GPU go without it).
struct SmemAllowed {
  static constexpr int kDevices = 64;
  std::size_t bytes[kDevices] = {};
};

// Opts a kernel into `bytes` of dynamic shared memory (an attribute, not a stream operation).
// `allowed` must be the one record of this kernel: the attribute is per kernel, so two records of one
// kernel (index_scores_kernel<T> is shared by the D = 64 and D = 128 paths) could lower it under
// the other's launch (seen on the H100: "invalid argument" at that launch).
template <class Kernel>
void allow_smem(Kernel kernel, std::size_t bytes, const char* what, SmemAllowed& allowed) {
  // Set once per kernel, device and size: later calls (inside a graph capture too) make no runtime
  // call but cudaGetDevice.
  int dev = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  std::size_t none = 0;
  std::size_t& mine = dev < SmemAllowed::kDevices ? allowed.bytes[dev] : none;
  if (bytes <= mine) return;
  if (bytes > std::size_t(max_smem_per_block()))
    throw NotSupportedError(std::string("msa: CUDA paged ") + what + " needs " + std::to_string(bytes) +
                            " bytes of shared memory, more than the device has per block");
  MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  mine = bytes;
}

int64_t byte_stride(const TensorView& t, int dim) { return t.stride[dim] * int64_t(dtype_size(t.dtype)); }

// Whether the kernel-selection variable `var` is set to `value` (read at every run: tests and
// benchmarks switch variants between calls).
bool env_is(const char* var, const char* value) {
  const char* e = std::getenv(var);
  return e != nullptr && std::string(e) == value;
}

// The tensor-core attention kernel serves bf16/f16 by default (faster on the H100, docs/serving.md
// "CUDA backend"); MSA_PAGED_ATTENTION_KERNEL=ffma keeps the FFMA kernel.
bool paged_mma_requested() { return !env_is("MSA_PAGED_ATTENTION_KERNEL", "ffma"); }

// CTAs of the mma attention (launch bound: 2) that fit on an SM with `bytes` of shared memory each.
int mma_ctas_per_sm(std::size_t bytes) {
  int dev = 0, per_sm = 0, reserved = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
  return int(std::min<std::size_t>(2, std::size_t(per_sm) / (bytes + std::size_t(reserved))));
}

// Whether an attention whose K and V caches are both FP8 reads its mma fragments from the raw FP8
// tiles (register mode, paged_attention_mma.cuh) instead of widening each chunk into a 16-bit tile.
// By default only where a query tile is one 16-row m-tile (q_len x G <= 16, e.g. decode with G 16):
// measured on the H100 at 32 x 128K (4556bb3), the register mode's step is 2% faster there and 19%
// slower at q_len 4 x G 16 (four m-tiles share each K/V word widening). MSA_PAGED_ATTENTION_FP8 =
// registers / widened forces either (tests run both).
bool paged_fp8_registers(int row_cap) {
  if (env_is("MSA_PAGED_ATTENTION_FP8", "registers")) return true;
  if (env_is("MSA_PAGED_ATTENTION_FP8", "widened")) return false;
  return paged::one_m_tile(row_cap);
}

// MSA_PAGED_ATTENTION_STAGE_PAGES=0 makes the mma attention read page ids per chunk (the path very
// long requests take when staging them does not fit), so tests can run it at small sizes.
bool paged_stage_pages_requested() { return !env_is("MSA_PAGED_ATTENTION_STAGE_PAGES", "0"); }

// Dynamic shared memory of the mma attention for `a`, deciding a.stage_pages: staging the split's page
// ids costs 4 (FP8: 12) bytes per block a tile can attend to (a.union_cap), so it is dropped only
// where it would not fit or would cost a CTA per SM (before the union sizing, when it cost that much
// per block of the longest request, bf16 at 512K ran 1.6x slower on the H200 with it).
template <int D>
std::size_t mma_attention_smem(paged::AttentionArgs& a, paged::MmaMode mode) {
  using namespace paged;
  const std::size_t smem_max = std::size_t(max_smem_per_block()), fixed = mma_static_smem(mode);
  const std::size_t with =
      attention_mma_smem_bytes<D>(a.row_cap, a.list_cap, a.union_cap, a.k_fp8, a.v_fp8, true, mode);
  const std::size_t without =
      attention_mma_smem_bytes<D>(a.row_cap, a.list_cap, a.union_cap, a.k_fp8, a.v_fp8, false, mode);
  const bool stage = paged_stage_pages_requested() && with + fixed <= smem_max &&
                     mma_ctas_per_sm(with + fixed) >= mma_ctas_per_sm(without + fixed);
  a.stage_pages = stage ? 1 : 0;
  const std::size_t bytes = stage ? with : without;
  if (bytes + fixed > smem_max)
    throw NotSupportedError("msa: CUDA paged attention (mma) needs " + std::to_string(bytes + fixed) +
                            " bytes of shared memory, more than the device has per block");
  return bytes;
}

// The mma attention in `kMode`, its one-m-tile instance where every query tile is one m-tile (each
// instance with its own record of the shared memory it was allowed).
template <class T, int D, paged::MmaMode kMode, bool kOneTile>
void launch_mma_attention_instance(paged::AttentionArgs& aa, int64_t ctas, cudaStream_t stream) {
  static SmemAllowed allowed;
  const std::size_t bytes = mma_attention_smem<D>(aa, kMode);
  auto* kernel = paged::attention_mma_kernel<T, D, kMode, kOneTile>;
  allow_smem(kernel, bytes, "attention (mma)", allowed);
  launch_chained(kernel, unsigned(ctas), paged::kThreads, bytes, stream, aa);
}
template <class T, int D, paged::MmaMode kMode>
void launch_mma_attention(paged::AttentionArgs& aa, int64_t ctas, cudaStream_t stream) {
  if (paged::one_m_tile(aa.row_cap))
    launch_mma_attention_instance<T, D, kMode, true>(aa, ctas, stream);
  else
    launch_mma_attention_instance<T, D, kMode, false>(aa, ctas, stream);
}

template <class T>
SmemAllowed& index_smem_allowed() {
  static SmemAllowed allowed;
  return allowed;
}

template <class T, int D>
void run_impl(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q, const TensorView& qi,
              const PagedKVCache& cache, const TensorView& out, const TensorView& lse,
              const TensorView& topk, const Context& ctx) {
  using namespace paged;
  const Config& c = plan.cfg;
  const Layout lay = layout_of(plan);
  cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);
  const std::uintptr_t base0 = reinterpret_cast<std::uintptr_t>(ctx.workspace.data);
  unsigned char* ws = static_cast<unsigned char*>(ctx.workspace.data) + (align_up(base0) - base0);
  const int32_t* cu_q = batch.cu_seqlens_q.ptr<const int32_t>();
  const int32_t* kv_lens = batch.kv_lens.ptr<const int32_t>();
  const int32_t* pt = batch.page_table.ptr<const int32_t>();
  const int64_t num_pages = cache.k.shape[0];
  // The tensor-core attention serves 16-bit queries unless the FFMA kernel is asked for.
  const bool mma_attention = sizeof(T) == 2 && paged_mma_requested();

  if (!plan.options.dense) {
    float* scores = reinterpret_cast<float*>(ws + lay.scores_offset);

    IndexArgs ia{};
    ia.qi = qi.data;
    ia.qi_s0 = qi.stride[0];
    ia.qi_s1 = qi.stride[1];
    ia.ki = static_cast<const unsigned char*>(cache.ki.data);
    ia.ki_s0 = byte_stride(cache.ki, 0);
    ia.ki_s1 = byte_stride(cache.ki, 1);
    ia.ki_fp8 = cache.ki.dtype == DType::fp8_e4m3;
    ia.ki_scale = ia.ki_fp8 ? cache.ki_scale.ptr<const float>() : nullptr;
    ia.kis_s0 = ia.ki_fp8 ? cache.ki_scale.stride[0] : 0;
    ia.cu_q = cu_q;
    ia.kv_lens = kv_lens;
    ia.page_table = pt;
    ia.pt_s0 = batch.page_table.stride[0];
    ia.pt_s1 = batch.page_table.stride[1];
    ia.num_pages = num_pages;
    ia.scores = scores;
    ia.ld = lay.score_ld;
    ia.hkv = c.num_kv_heads;
    ia.di = c.index_head_dim;
    ia.block_size = c.block_size;
    ia.iscale = c.index_softmax_scale();
    ia.tile_q = lay.index_tile_q;
    ia.tiles = lay.index_tiles;
    ia.chunk = lay.index_chunk;
    ia.chunks = lay.index_chunks;
    ia.row_cap = std::min(lay.index_tile_q, std::max(1, plan.max_q_len)) * c.num_kv_heads;
    ia.bounds = bounds_of(plan);
    const int64_t icta = int64_t(plan.batch) * lay.index_tiles * lay.index_chunks;
    // Decode-sized plans take the tensor-core kernel (paged_index_mma.cuh) or, where it does not
    // apply, the streaming kernel (paged_index_stream.cuh); same grid and score layout.
    if (mma_index_requested() && mma_index_supported(plan.max_q_len, int(sizeof(T)), c.index_head_dim, ia.ki_fp8,
                                                     c.block_size, ia.ki, ia.ki_s0, ia.ki_s1)) {
      if constexpr (sizeof(T) == 2) {
        if (ia.ki_fp8)
          launch_mma_index<T, true>(ia, ia.row_cap, unsigned(icta), stream);
        else
          launch_mma_index<T, false>(ia, ia.row_cap, unsigned(icta), stream);
      }
    } else if (stream_index_requested() &&
               stream_index_supported(plan.max_q_len, c.index_head_dim, ia.ki_fp8 ? 1 : int(sizeof(T)), ia.ki,
                                      ia.ki_s0, ia.ki_s1)) {
      if (ia.ki_fp8)
        launch_stream_index<T, true>(ia, unsigned(icta), stream);
      else
        launch_stream_index<T, false>(ia, unsigned(icta), stream);
    } else {
      const std::size_t ismem =
          index_smem_bytes(ia.row_cap, c.index_head_dim, ia.ki_fp8 ? 1 : int(sizeof(T)));
      allow_smem(index_scores_kernel<T>, ismem, "index", index_smem_allowed<T>());
      launch_chained(index_scores_kernel<T>, unsigned(icta), kThreads, ismem, stream, ia);
    }
    MSA_CUDA_CHECK_LAUNCH();

    index::SelectArgs sa{};
    sa.scores = scores;
    sa.lses = nullptr;
    sa.ld = lay.score_ld;
    sa.cu_q = cu_q;
    sa.cu_k = nullptr;
    sa.k_lens = kv_lens;
    sa.batch = plan.batch;
    sa.num_kv_heads = c.num_kv_heads;
    sa.block_size = c.block_size;
    sa.k = c.topk;
    sa.total_q = plan.total_q;
    sa.topk = topk.ptr<int32_t>();
    sa.topk_s0 = topk.stride[0];
    sa.topk_s1 = topk.stride[1];
    sa.selected_lse = nullptr;
    const int64_t select_rows = int64_t(c.num_kv_heads) * plan.total_q;
    if (index::select_split_rows(select_rows, sa.ld, c.topk, lay.workers))
      launch_chained(index::select_topk_split_kernel<index::kSelectWarps>, unsigned(select_rows),
                     index::kSelectWarps * 32, 0, stream, sa);
    else
      launch_chained(index::paged_select_topk_kernel,
                     unsigned((select_rows + index::kSelectWarps - 1) / index::kSelectWarps),
                     index::kSelectWarps * 32, 0, stream, sa);
    MSA_CUDA_CHECK_LAUNCH();
  }

  AttentionArgs aa{};
  aa.q = q.data;
  aa.q_s0 = q.stride[0];
  aa.q_s1 = q.stride[1];
  aa.k = static_cast<const unsigned char*>(cache.k.data);
  aa.v = static_cast<const unsigned char*>(cache.v.data);
  aa.k_s0 = byte_stride(cache.k, 0);
  aa.k_s1 = byte_stride(cache.k, 1);
  aa.k_s2 = byte_stride(cache.k, 2);
  aa.v_s0 = byte_stride(cache.v, 0);
  aa.v_s1 = byte_stride(cache.v, 1);
  aa.v_s2 = byte_stride(cache.v, 2);
  aa.k_fp8 = cache.k.dtype == DType::fp8_e4m3;
  aa.v_fp8 = cache.v.dtype == DType::fp8_e4m3;
  if (aa.k_fp8) {
    aa.k_scale = cache.k_scale.ptr<const float>();
    aa.ks_s0 = cache.k_scale.stride[0];
    aa.ks_s1 = cache.k_scale.stride[1];
  }
  if (aa.v_fp8) {
    aa.v_scale = cache.v_scale.ptr<const float>();
    aa.vs_s0 = cache.v_scale.stride[0];
    aa.vs_s1 = cache.v_scale.stride[1];
  }
  aa.cu_q = cu_q;
  aa.kv_lens = kv_lens;
  aa.page_table = pt;
  aa.pt_s0 = batch.page_table.stride[0];
  aa.pt_s1 = batch.page_table.stride[1];
  aa.num_pages = num_pages;
  if (!plan.options.dense) {
    aa.topk = topk.ptr<const int32_t>();
    aa.tk_s0 = topk.stride[0];
    aa.tk_s1 = topk.stride[1];
  }
  aa.topk_k = c.topk;
  aa.out = out.data;
  aa.o_s0 = out.stride[0];
  aa.o_s1 = out.stride[1];
  aa.lse = lse.ptr<float>();
  aa.l_s0 = lse.stride[0];
  aa.l_s1 = lse.stride[1];
  aa.part_o = reinterpret_cast<float*>(ws + lay.partials_offset);
  aa.part_ml = aa.part_o + int64_t(lay.splits) * plan.total_q * c.num_q_heads * D;
  aa.max_blocks = lay.max_blocks;
  aa.hkv = c.num_kv_heads;
  aa.G = c.group_size();
  aa.Hq = c.num_q_heads;
  aa.block_size = c.block_size;
  aa.qscale = float(double(c.softmax_scale()) * 1.4426950408889634);
  aa.tile_q = lay.attn_tile_q;
  aa.tiles = lay.attn_tiles;
  aa.splits = lay.splits;
  aa.row_cap = std::min(lay.attn_tile_q, std::max(1, plan.max_q_len)) * aa.G;
  aa.bounds = bounds_of(plan);
  aa.stage_esize = int(std::max(aa.k_fp8 ? std::size_t(1) : sizeof(T), aa.v_fp8 ? std::size_t(1) : sizeof(T)));
  aa.list_cap = plan.options.dense ? 0 : lay.max_blocks;
  aa.union_cap = plan.options.dense ? 0 : lay.max_union;
  const int64_t acta = int64_t(plan.batch) * lay.attn_tiles * c.num_kv_heads * lay.splits;
  if constexpr (sizeof(T) == 2) {  // the tensor-core kernel (paged_attention_mma.cuh), 16-bit only
    if (mma_attention) {
      if (aa.k_fp8 && aa.v_fp8 && paged_fp8_registers(aa.row_cap))
        launch_mma_attention<T, D, MmaMode::fp8_registers>(aa, acta, stream);
      else if (aa.k_fp8 || aa.v_fp8)
        launch_mma_attention<T, D, MmaMode::fp8_widened>(aa, acta, stream);
      else
        launch_mma_attention<T, D, MmaMode::sixteen_bit>(aa, acta, stream);
    }
  }
  if (!mma_attention) {
    const std::size_t asmem = attention_smem_bytes<D>(aa.row_cap, aa.list_cap, aa.stage_esize);
    static SmemAllowed attention_allowed;
    allow_smem(attention_kernel<T, D>, asmem, "attention", attention_allowed);
    launch_chained(attention_kernel<T, D>, unsigned(acta), kThreads, asmem, stream, aa);
  }
  MSA_CUDA_CHECK_LAUNCH();
  if (lay.splits > 1) {
    const int64_t rows = plan.total_q * c.num_q_heads;
    const int64_t per = kThreads / 32;
    launch_chained(merge_kernel<T, D>, unsigned((rows + per - 1) / per), kThreads, 0, stream, aa);
    MSA_CUDA_CHECK_LAUNCH();
  }
}

void check_supported(const PagedPlan& plan, const PagedBatch& batch, const PagedKVCache& cache,
                     std::initializer_list<const TensorView*> rows) {
  const Config& c = plan.cfg;
  auto unsupported = [](const std::string& why) {
    throw NotSupportedError("msa: CUDA paged backend: " + why);
  };
  if (c.num_kv_heads > paged::kMaxRows || c.group_size() > paged::kMaxRows)
    unsupported("Hkv and Hq/Hkv must be at most " + std::to_string(paged::kMaxRows));
  if (c.head_dim % 8 || c.index_head_dim % 8) unsupported("D and Di must be multiples of 8");
  // Vector loads: 8 elements (16 bytes of a 16-bit dtype) per access; K / V pages are staged by
  // 16-byte copies whatever their dtype (FP8 included).
  auto vec = [](const TensorView& t) { return std::size_t(8) * dtype_size(t.dtype); };
  for (const TensorView* t : rows)
    if (!rows_aligned(*t, vec(*t))) unsupported("rows must be 8-element aligned (pointer and outer strides)");
  if (!rows_aligned(cache.ki, vec(cache.ki)))
    unsupported("ki_cache rows must be 8-element aligned (pointer and strides)");
  for (const TensorView* t : {&cache.k, &cache.v})
    if (!rows_aligned(*t, std::max<std::size_t>(16, vec(*t))))
      unsupported("K / V cache rows must be 16-byte and 8-element aligned (pointer and strides)");
  (void)batch;
}

}  // namespace

int paged_default_workers(int device_index) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // no device: leave no sticky error, plan for an H100
    return 132;
  }
  return sms;
}

void paged_run(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
               const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
               const TensorView& lse, const TensorView& topk, const Context& ctx) {
  check_supported(plan, batch, cache, {&q, &qi, &out});
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (plan.cfg.head_dim) {
      case 64: return run_impl<T, 64>(plan, batch, q, qi, cache, out, lse, topk, ctx);
      case 128: return run_impl<T, 128>(plan, batch, q, qi, cache, out, lse, topk, ctx);
      default:
        throw NotSupportedError("msa: CUDA paged attention supports head_dim 64 and 128, got " +
                                std::to_string(plan.cfg.head_dim));
    }
  };
  switch (plan.dtype) {
    case DType::bf16: return by_dim(__nv_bfloat16{});
    case DType::f16: return by_dim(__half{});
    case DType::f32: return by_dim(float{});
    default: throw NotSupportedError("msa: CUDA paged run: unsupported dtype");
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
