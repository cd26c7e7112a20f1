// CUDA backend of the serving API (msa/paged.h) against the CPU backend on the same random step
// (tests/paged_fixture.h: shuffled page tables, ragged lengths, NaN in unwritten cache slots):
//  - paged_append_kv writes the same cache bytes (bf16 copies; FP8 encoded by the shared rule);
//  - topk rows have the rules.h layout and the CPU's block sets, except where the deciding block
//    scores (recomputed here in float64 from the cache) are tied within rounding;
//  - out / lse equal the CPU's (relative error < 1e-2 bf16, < 1e-5 f32) on rows whose selections agree;
//  - dense mode, one key split and many (options.num_workers), FP8 caches, chunked prefill, graph capture;
//  - every case under both attention kernels (MSA_PAGED_ATTENTION_KERNEL: "ffma", "mma" = default).
// Every failure names the case, the first bad index, got vs expected and the max error.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/float_convert.h"
#include "cuda/device_tensor.h"
#include "kernel_env.h"
#include "msa/ops.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "paged_fixture.h"
#include "paged_fp8_cache.h"

namespace msa {
namespace {

using testing::DeviceTensor;
using testing::KvLayout;
using testing::PagedStep;

using testing::make_config;

struct Case {
  std::string name;
  Config cfg;
  std::vector<int32_t> q_lens, kv_lens;
  DType dtype = DType::bf16;
  bool fp8 = false, dense = false;
  int num_workers = 0;  // 0: the default (132); 1: one key split; large: many splits
  uint64_t seed = 1;
  KvLayout layout = KvLayout::token_major;  // of the K / V pages in memory
  // Pass q / qi / out / lse / topk / the new rows as torch's DLPack export gives them: every
  // extent-1 dimension with stride 1 (a batch-1 single-token decode's q is [1, Hq, D], strides (1, D, 1)).
  bool unit_dim_strides = false;
  int device = 0;  // of the tensors and the plan; the calls are made with device 0 current
};

// A cache to run on: the step's own (query dtype) or its FP8 copies with per-page amax / 448 scales
// (the CPU FP8 tests' quantisation, paged_fp8_cache.h).
struct HostCache {
  HostTensor k, v, ki, k_scale, v_scale, ki_scale;
  bool fp8 = false;
  KvLayout layout;
  HostCache(PagedStep& s, bool to_fp8) : fp8(to_fp8), layout(s.layout) {
    if (!fp8) {
      k = s.k_cache;
      v = s.v_cache;
      ki = s.ki_cache;
      return;
    }
    testing::Fp8Cache f(s, testing::ScalePolicy::page_amax);
    k = std::move(f.k);
    v = std::move(f.v);
    ki = std::move(f.ki);
    k_scale = std::move(f.k_scale);
    v_scale = std::move(f.v_scale);
    ki_scale = std::move(f.ki_scale);
  }
  PagedKVCache view() {
    const TensorView kl = testing::kv_logical_view(k.view(), layout), vl = testing::kv_logical_view(v.view(), layout);
    if (!fp8) return {kl, vl, ki.view(), {}, {}, {}};
    return {kl, vl, ki.view(), k_scale.view(), v_scale.view(), ki_scale.view()};
  }
  // Dequantised ki element (page, slot, d).
  double ki_at(int64_t page, int64_t slot, int64_t d, int B, int Di) const {
    const int64_t i = (page * B + slot) * Di + d;
    return fp8 ? ki.get(i) * ki_scale.get(page) : ki.get(i);
  }
};

struct Result {
  HostTensor out, lse, topk;
  Result(const Config& c, int64_t tq, DType dt)
      : out(dt, {tq, c.num_q_heads, c.head_dim}), lse(DType::f32, {tq, c.num_q_heads}),
        topk(DType::i32, {c.num_kv_heads, tq, c.topk}) {
    out.poison();
    lse.poison();
    topk.poison();
  }
};

Result run_cpu(PagedStep& s, HostCache& cache, const PagedOptions& opt) {
  const PagedPlan plan = s.plan(opt);
  std::vector<unsigned char> ws(plan.workspace_bytes);
  Context ctx;
  ctx.workspace = {ws.data(), ws.size()};
  paged_append_kv(plan, s.batch(), s.k_new.view(), s.v_new.view(), s.ki_new.view(), cache.view(), ctx);
  Result r(s.p.cfg, s.p.total_q(), s.p.dtype);
  paged_run(plan, s.batch(), s.p.q.view(), s.p.qi.view(), cache.view(), r.out.view(), r.lse.view(),
            r.topk.view(), ctx);
  return r;
}

// Device mirrors of everything a step touches.
struct DeviceStep {
  DeviceTensor k, v, ki, pt, cu_q, kv, q, qi, k_new, v_new, ki_new;
  std::unique_ptr<DeviceTensor> k_scale, v_scale, ki_scale;
  KvLayout layout;
  DeviceStep(PagedStep& s, HostCache& c)
      : k(c.k), v(c.v), ki(c.ki), pt(s.page_table), cu_q(s.cu_q), kv(s.kv), q(s.p.q), qi(s.p.qi),
        k_new(s.k_new), v_new(s.v_new), ki_new(s.ki_new), layout(c.layout) {
    if (c.fp8) {
      k_scale.reset(new DeviceTensor(c.k_scale));
      v_scale.reset(new DeviceTensor(c.v_scale));
      ki_scale.reset(new DeviceTensor(c.ki_scale));
    }
  }
  PagedKVCache cache() const {
    PagedKVCache pc{testing::kv_logical_view(k.view(), layout), testing::kv_logical_view(v.view(), layout),
                    ki.view(), {}, {}, {}};
    if (k_scale) {
      pc.k_scale = k_scale->view();
      pc.v_scale = v_scale->view();
      pc.ki_scale = ki_scale->view();
    }
    return pc;
  }
  PagedBatch batch() const { return {cu_q.view(), kv.view(), pt.view()}; }
};

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(std::size_t n) {
    if (cudaMalloc(&p, n ? n : 1) != cudaSuccess) throw std::runtime_error("cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(p); }
};

// First differing element of two equally sized host tensors (bytewise; NaN poison compares equal).
std::string first_byte_difference(HostTensor& got, HostTensor& want) {
  const std::size_t n = std::size_t(want.numel()) * dtype_size(want.dtype());
  const auto* a = static_cast<const uint8_t*>(got.data());
  const auto* b = static_cast<const uint8_t*>(want.data());
  for (std::size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) {
      const int64_t e = int64_t(i / dtype_size(want.dtype()));
      std::ostringstream os;
      os << "element " << e << ": got " << got.get(e) << " want " << want.get(e);
      return os.str();
    }
  return "";
}

// Block score of (query row, group, block j) in float64 from the cache the CPU appended into.
double ref_block_score(PagedStep& s, const HostCache& c, int r, int64_t row, int g, int64_t j) {
  const Config& cfg = s.p.cfg;
  const int B = cfg.block_size, Di = cfg.index_head_dim, hkv = cfg.num_kv_heads;
  const int64_t page = int64_t(s.page_table.get(int64_t(r) * s.width + j));
  const double iscale = cfg.index_softmax_scale();
  double best = -INFINITY;
  for (int t = 0; t < B; ++t) {
    double dot = 0;
    for (int d = 0; d < Di; ++d)
      dot += double(float(s.p.qi.get((row * hkv + g) * Di + d)) * float(iscale)) * c.ki_at(page, t, d, B, Di);
    best = std::max(best, dot);
  }
  return best;
}

void run_case_once(const Case& tc, bool capture) {
  const char* kernel = std::getenv("MSA_PAGED_ATTENTION_KERNEL");
  const char* fp8 = std::getenv("MSA_PAGED_ATTENTION_FP8");
  SCOPED_TRACE(tc.name + " [MSA_PAGED_ATTENTION_KERNEL=" + (kernel ? kernel : "unset") +
               " MSA_PAGED_ATTENTION_FP8=" + (fp8 ? fp8 : "unset") + "]");
  const Config& cfg = tc.cfg;
  PagedStep cpu_step(cfg, tc.q_lens, tc.kv_lens, tc.dtype, tc.seed, 3, tc.layout);
  PagedStep gpu_step(cfg, tc.q_lens, tc.kv_lens, tc.dtype, tc.seed, 3, tc.layout);
  HostCache cpu_cache(cpu_step, tc.fp8), gpu_cache(gpu_step, tc.fp8);
  PagedOptions opt;
  opt.dense = tc.dense;
  const Result want = [&] { return run_cpu(cpu_step, cpu_cache, opt); }();

  PagedOptions gopt = opt;
  gopt.num_workers = tc.num_workers;
  const PagedPlan plan = paged_plan(cfg, tc.q_lens.data(), tc.kv_lens.data(), int(tc.q_lens.size()),
                                    tc.dtype, Device::cuda(tc.device), gopt);
  MSA_TEST_CUDA(cudaSetDevice(tc.device));  // the tensors, workspace and stream live there
  const int64_t tq = plan.total_q;
  DeviceStep d(gpu_step, gpu_cache);
  Result got(cfg, tq, tc.dtype);
  DeviceTensor out(got.out), lse(got.lse), topk(got.topk);
  DeviceBuffer ws(plan.workspace_bytes);
  cudaStream_t stream;
  MSA_TEST_CUDA(cudaStreamCreate(&stream));
  Context ctx;
  ctx.stream = stream;
  ctx.workspace = {ws.p, plan.workspace_bytes};
  auto exported = [&](TensorView t) {
    for (int i = 0; tc.unit_dim_strides && i < t.ndim; ++i)
      if (t.shape[i] == 1) t.stride[i] = 1;
    return t;
  };
  const TensorView q = exported(d.q.view()), qi = exported(d.qi.view()), out_v = exported(out.view()),
                   lse_v = exported(lse.view()), topk_v = exported(topk.view());
  MSA_TEST_CUDA(cudaSetDevice(0));  // the library makes the tensors' device current for each call
  paged_append_kv(plan, d.batch(), exported(d.k_new.view()), exported(d.v_new.view()),
                  exported(d.ki_new.view()), d.cache(), ctx);
  MSA_TEST_CUDA(cudaStreamSynchronize(stream));
  if (capture) {  // warm-up outside the capture, then the captured run writes the compared outputs
    paged_run(plan, d.batch(), q, qi, d.cache(), out_v, lse_v, topk_v, ctx);
    MSA_TEST_CUDA(cudaStreamSynchronize(stream));
    got.out.poison();
    got.lse.poison();
    got.topk.poison();
    out.upload();
    lse.upload();
    topk.upload();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    MSA_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    paged_run(plan, d.batch(), q, qi, d.cache(), out_v, lse_v, topk_v, ctx);
    MSA_TEST_CUDA(cudaStreamEndCapture(stream, &graph));
    MSA_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    MSA_TEST_CUDA(cudaGraphLaunch(exec, stream));
    MSA_TEST_CUDA(cudaStreamSynchronize(stream));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } else {
    paged_run(plan, d.batch(), q, qi, d.cache(), out_v, lse_v, topk_v, ctx);
  }
  MSA_TEST_CUDA(cudaStreamSynchronize(stream));
  MSA_TEST_CUDA(cudaStreamDestroy(stream));
  int current = -1;
  MSA_TEST_CUDA(cudaGetDevice(&current));
  EXPECT_EQ(current, 0) << "a call left the tensors' device current";

  // 1. Append: the same cache bytes.
  d.k.download();
  d.v.download();
  d.ki.download();
  EXPECT_EQ(first_byte_difference(gpu_cache.k, cpu_cache.k), "") << "k_cache after append";
  EXPECT_EQ(first_byte_difference(gpu_cache.v, cpu_cache.v), "") << "v_cache after append";
  EXPECT_EQ(first_byte_difference(gpu_cache.ki, cpu_cache.ki), "") << "ki_cache after append";

  out.download();
  lse.download();
  topk.download();
  const int hkv = cfg.num_kv_heads, K = cfg.topk, G = cfg.group_size(), D = cfg.head_dim;
  const int B = cfg.block_size;

  // 2. Selections: layout exact; sets equal unless the deciding scores are tied within rounding.
  std::vector<char> agree(size_t(tq * hkv), 1);
  int64_t near_ties = 0;
  if (!tc.dense) {
    for (int r = 0; r < int(tc.q_lens.size()); ++r)
      for (int i = 0; i < tc.q_lens[r]; ++i) {
        const int64_t row = cpu_step.p.lens.cu_q[r] + i;
        const int64_t local = rules::local_block(rules::query_position(tc.q_lens[r], tc.kv_lens[r], i), B);
        const int n = rules::num_nonlocal_selected(local, K);
        for (int g = 0; g < hkv; ++g) {
          auto at = [&](const HostTensor& t, int slot) { return int32_t(t.get((int64_t(g) * tq + row) * K + slot)); };
          std::ostringstream where;
          where << "topk[g=" << g << ", row=" << row << " (request " << r << ", query " << i << ")] local "
                << local << ": got";
          for (int s = 0; s < K; ++s) where << ' ' << at(got.topk, s);
          where << " want";
          for (int s = 0; s < K; ++s) where << ' ' << at(want.topk, s);
          ASSERT_EQ(at(got.topk, n), local) << where.str();
          for (int s = n + 1; s < K; ++s) ASSERT_EQ(at(got.topk, s), rules::kUnusedSlot) << where.str();
          std::set<int32_t> gs, ws_;
          for (int s = 0; s < n; ++s) {
            ASSERT_TRUE(at(got.topk, s) >= 0 && at(got.topk, s) < local) << where.str();
            gs.insert(at(got.topk, s));
            ws_.insert(at(want.topk, s));
          }
          ASSERT_EQ(int(gs.size()), n) << "duplicate ids in " << where.str();
          if (gs == ws_) continue;
          // Every id only the GPU chose must score within rounding of the CPU's weakest choice.
          double weakest = INFINITY;
          for (int32_t j : ws_) weakest = std::min(weakest, ref_block_score(cpu_step, cpu_cache, r, row, g, j));
          for (int32_t j : gs)
            if (!ws_.count(j)) {
              const double sj = ref_block_score(cpu_step, cpu_cache, r, row, g, j);
              ASSERT_GE(sj, weakest - 1e-4 * (1 + std::fabs(weakest)))
                  << where.str() << ": block " << j << " scores " << sj << " below the weakest CPU choice "
                  << weakest;
            }
          agree[size_t(row * hkv + g)] = 0;
          ++near_ties;
        }
      }
    EXPECT_LE(near_ties, std::max<int64_t>(2, tq * hkv / 20)) << "too many near-tied selections";
  }

  // 3. Out / lse on rows whose selections agree.
  const double tol = tc.dtype == DType::f32 ? 1e-5 : 1e-2;
  double num = 0, den = 0, max_lse_err = 0;
  std::string first_bad;
  for (int64_t row = 0; row < tq; ++row)
    for (int h = 0; h < cfg.num_q_heads; ++h) {
      if (!agree[size_t(row * hkv + rules::group_of_head(h, G))]) continue;
      for (int e = 0; e < D; ++e) {
        const int64_t idx = (row * cfg.num_q_heads + h) * D + e;
        const double a = got.out.get(idx), b = want.out.get(idx);
        if (!std::isfinite(a) && first_bad.empty()) {
          std::ostringstream os;
          os << "out[" << row << ", " << h << ", " << e << "] = " << a << " (want " << b << ")";
          first_bad = os.str();
        }
        num += (a - b) * (a - b);
        den += b * b;
      }
      const double la = got.lse.get(row * cfg.num_q_heads + h), lb = want.lse.get(row * cfg.num_q_heads + h);
      const double le = std::isfinite(la) ? std::fabs(la - lb) : INFINITY;
      if (le > max_lse_err) {
        max_lse_err = le;
        if (le > 10 * tol && first_bad.empty()) {
          std::ostringstream os;
          os << "lse[" << row << ", " << h << "] = " << la << " want " << lb;
          first_bad = os.str();
        }
      }
    }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  EXPECT_TRUE(first_bad.empty()) << first_bad;
  EXPECT_LT(rel, tol) << "out relative error " << rel << " (rows with equal selections; near ties skipped: "
                      << near_ties << ")";
  EXPECT_LT(max_lse_err, 10 * tol) << "max |lse - cpu lse|";
}

// Every case runs under both attention kernels (MSA_PAGED_ATTENTION_KERNEL): the FFMA kernel and the
// default tensor-core "mma" kernel (f32 steps keep the FFMA one), each on a fresh step; FP8 cases run
// the mma kernel in both its modes (MSA_PAGED_ATTENTION_FP8: widening into 16-bit tiles, and the
// register mode), whichever the default would pick for the case's query tile.
void run_case(const Case& tc, bool capture = false) {
  MSA_SKIP_WITHOUT_GPU();
  for (const char* kernel : {"ffma", "mma"}) {
    testing::ScopedKernelEnv env("MSA_PAGED_ATTENTION_KERNEL", kernel);
    testing::ScopedKernelEnv fp8_mode("MSA_PAGED_ATTENTION_FP8", "widened");
    run_case_once(tc, capture);
  }
  if (tc.fp8) {
    testing::ScopedKernelEnv env("MSA_PAGED_ATTENTION_FP8", "registers");
    run_case_once(tc, capture);
  }
}

// The case over caches in its query dtype, then over FP8 copies of them.
void run_case_then_fp8(Case c) {
  run_case(c);
  c.name += ", FP8";
  c.fp8 = true;
  run_case(c);
}

// Random decode q_lens 1..16 under ragged kv lens (1, B-1, B, B+1, below k*B, long).
Case decode_case(std::string name, Config cfg, uint64_t seed) {
  Case c;
  c.name = std::move(name);
  c.cfg = cfg;
  c.seed = seed;
  const int B = cfg.block_size;
  const std::vector<int32_t> kv = {1, B - 1, B, B + 1, 3 * B + 5, 20 * B + 7, 37, 64 * B + 3};
  std::mt19937 rng{unsigned(seed)};
  for (int32_t k : kv) {
    c.kv_lens.push_back(k);
    c.q_lens.push_back(std::min<int32_t>(k, 1 + int32_t(rng() % 16)));
  }
  return c;
}

// The index-relevant cases run under the three paged index kernels: the shared-memory kernel ("smem"),
// the streaming kernel ("stream", paged_index_stream.cuh) and the default tensor-core kernel ("mma",
// paged_index_mma.cuh; plans it does not apply to fall back to the streaming kernel).
class PagedCudaIndex : public ::testing::TestWithParam<const char*> {
 protected:
  msa::testing::ScopedKernelEnv env_{"MSA_PAGED_INDEX_KERNEL", GetParam()};
};

TEST_P(PagedCudaIndex, DecodeGroup16Bf16) {
  run_case(decode_case("Hq16/Hkv1 D64", make_config(16, 1, 64, 32, 16, 8), 11));
}
TEST_P(PagedCudaIndex, DecodeGroup4Bf16) {
  run_case(decode_case("Hq8/Hkv2 D128", make_config(8, 2, 128, 64, 16, 6), 12));
}
TEST_P(PagedCudaIndex, DecodeLayerShapeBf16) {
  run_case(decode_case("Hq64/Hkv4 D128 B32", make_config(64, 4, 128, 64, 32, 8), 13));
}
TEST_P(PagedCudaIndex, DecodeGroup1F32) {
  Case c = decode_case("Hq4/Hkv4 D64 f32", make_config(4, 4, 64, 32, 16, 4), 14);
  c.dtype = DType::f32;
  run_case(c);
}
TEST_P(PagedCudaIndex, DecodeF16) {
  Case c = decode_case("Hq8/Hkv2 D64 f16", make_config(8, 2, 64, 32, 16, 4), 15);
  c.dtype = DType::f16;
  run_case(c);
}
TEST_P(PagedCudaIndex, DecodeOneSplitAndManySplits) {
  for (int workers : {1, 4096}) {
    Case c = decode_case("splits workers=" + std::to_string(workers), make_config(8, 2, 64, 32, 16, 4), 16);
    c.num_workers = workers;
    run_case(c);
  }
}
TEST_P(PagedCudaIndex, DecodeSingleTokenBatch1LongContext) {
  Case c;
  c.name = "q_len 1, 3000 tokens";
  c.cfg = make_config(16, 2, 128, 64, 16, 8);
  c.q_lens = {1};
  c.kv_lens = {3000};
  run_case(c);
  c.name += ", extent-1 dims with stride 1";
  c.unit_dim_strides = true;
  run_case(c);
}
// Few, long index rows (10 rows of up to 2500 blocks, fewer than the SMs): the top-k select runs one
// CTA a row (select_topk_split_kernel), each warp over a part of the row. The 165-token request has
// 10 candidates for 7 picks, so its parts (4 candidates each) hold fewer than n and pass all of theirs.
TEST_P(PagedCudaIndex, DecodeLongRowsSplitSelect) {
  Case c;
  c.name = "long rows, split select";
  c.cfg = make_config(16, 2, 128, 64, 16, 8);
  c.q_lens = {1, 1, 2, 1};
  c.kv_lens = {40000, 165, 33000, 3};
  run_case_then_fp8(c);
}
// Tensors on device 1 while device 0 is current: each call runs on the tensors' device and gives
// device 0 back (skipped with fewer than two GPUs).
TEST(PagedCuda, TensorsOnAnotherDeviceThanTheCurrentOne) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) GTEST_SKIP() << "needs two CUDA devices";
  Case c = decode_case("on cuda:1", make_config(16, 2, 128, 64, 16, 4), 31);
  c.device = 1;
  run_case_then_fp8(c);
}
TEST(PagedCuda, DecodeGroup1Bf16) {  // up to 32 one-head queries a tile: two m-tiles of the mma kernel
  run_case(decode_case("Hq4/Hkv4 D128 bf16", make_config(4, 4, 128, 32, 16, 4), 22));
}
TEST(PagedCuda, ChunkedPrefill) {
  Case c;
  c.name = "chunk of 100 over a prefix, with decodes";
  c.cfg = make_config(8, 2, 64, 32, 16, 6);
  c.q_lens = {100, 1, 16, 37};
  c.kv_lens = {357, 40, 16, 37};
  run_case(c);
}
TEST_P(PagedCudaIndex, RequestsWithoutNewTokens) {
  Case c;
  c.name = "q_len 0 requests between others";
  c.cfg = make_config(8, 2, 64, 32, 16, 4);
  c.q_lens = {0, 2, 0, 5};
  c.kv_lens = {30, 18, 5, 200};
  run_case(c);
}
TEST_P(PagedCudaIndex, Fp8CachesDecodeAndPrefill) {
  Case c = decode_case("fp8 Hq16/Hkv2 D64", make_config(16, 2, 64, 32, 16, 6), 17);
  c.fp8 = true;
  run_case(c);
  Case p;
  p.name = "fp8 chunked prefill D128";
  p.cfg = make_config(8, 2, 128, 64, 16, 6);
  p.q_lens = {70, 3};
  p.kv_lens = {250, 90};
  p.fp8 = true;
  run_case(p);
}
TEST(PagedCuda, DenseMode) {
  Case c = decode_case("dense Hq8/Hkv2 D64", make_config(8, 2, 64, 32, 16, 4), 18);
  c.dense = true;
  run_case(c);
  Case f = decode_case("dense fp8 many splits", make_config(16, 1, 128, 32, 16, 4), 19);
  f.dense = true;
  f.fp8 = true;
  f.num_workers = 1000;
  run_case(f);
}
// bench_decode.py's first case (b=1, L=8192, q=1, Hq64/Hkv4 D128 Di128 B128 k16), sparse and dense:
// 64 full blocks of 128 keys fill the whole K/V staging buffer (the B = 16 cases above fill half of
// it), and 132 workers give the dense plan 64 key splits. The dense kernel used to place its staging
// buffer behind a block list that its shared memory did not count (an illegal address on the H100).
TEST_P(PagedCudaIndex, BenchDecodeShapeSparseAndDense) {
  for (bool dense : {false, true}) {
    Case c;
    c.name = std::string("bench b=1 L=8192 q=1 ") + (dense ? "dense" : "sparse");
    c.cfg = make_config(64, 4, 128, 128, 128, 16);
    c.q_lens = {1};
    c.kv_lens = {8192};
    c.dense = dense;
    c.num_workers = 132;
    c.seed = 21;
    run_case(c);
  }
}
// FP8 index keys with Di 64 and 128 (the tensor-core kernel's FP8 instances need Di a multiple of 64;
// the Di 32 FP8 case above takes the streaming kernel), both 16-bit query dtypes.
TEST_P(PagedCudaIndex, Fp8DecodeWideIndexKeys) {
  Case c = decode_case("fp8 Hq64/Hkv4 D128 Di128 B32", make_config(64, 4, 128, 128, 32, 8), 23);
  c.fp8 = true;
  run_case(c);
  Case h = decode_case("fp8 f16 Hq8/Hkv2 D64 Di64 B16", make_config(8, 2, 64, 64, 16, 6), 24);
  h.fp8 = true;
  h.dtype = DType::f16;
  run_case(h);
}
// The mma attention's per-chunk page-table path (taken when staging the split's page ids would not
// fit in shared memory, e.g. FP8 caches near 1M tokens), forced at small sizes, bf16 and FP8.
TEST(PagedCuda, AttentionPageIdsReadPerChunk) {
  msa::testing::ScopedKernelEnv env("MSA_PAGED_ATTENTION_STAGE_PAGES", "0");
  run_case(decode_case("per-chunk page ids Hq16/Hkv2 D128", make_config(16, 2, 128, 64, 32, 6), 25));
  Case f = decode_case("per-chunk page ids fp8 Hq64/Hkv4 D128", make_config(64, 4, 128, 128, 32, 8), 26);
  f.fp8 = true;
  run_case(f);
}
// Head-major K / V pages ([num_pages, Hkv, B, D] in memory, passed as the logical shape with swapped
// strides; FlashInfer's HND): every decode query count and ragged lengths, bf16 and FP8, chunked
// prefill and dense mode, under both attention kernels.
TEST(PagedCuda, HeadMajorPages) {
  Case c = decode_case("head-major Hq64/Hkv4 D128 B32", make_config(64, 4, 128, 128, 32, 8), 27);
  c.layout = KvLayout::head_major;
  run_case(c);
  c.name = "head-major fp8 Hq64/Hkv4 D128 B32";
  c.fp8 = true;
  run_case(c);
  Case p;
  p.name = "head-major chunked prefill";
  p.cfg = make_config(8, 2, 64, 32, 16, 6);
  p.q_lens = {100, 1, 16, 37};
  p.kv_lens = {357, 40, 16, 37};
  p.layout = KvLayout::head_major;
  run_case(p);
  Case d = decode_case("head-major dense Hq16/Hkv1 D64", make_config(16, 1, 64, 32, 16, 4), 28);
  d.layout = KvLayout::head_major;
  d.dense = true;
  run_case(d);
}
// Every other case runs the kernel chain with programmatic dependent launch (the default); this one
// pins plain stream order (MSA_PAGED_PDL=0), eager and captured, with key splits (merge kernel).
TEST(PagedCuda, WithoutProgrammaticLaunch) {
  msa::testing::ScopedKernelEnv env("MSA_PAGED_PDL", "0");
  Case c = decode_case("plain launches Hq64/Hkv4 D128", make_config(64, 4, 128, 128, 32, 8), 29);
  run_case(c);
  run_case(c, /*capture=*/true);
}
TEST_P(PagedCudaIndex, GraphCapturedRun) {
  Case c = decode_case("captured", make_config(8, 2, 64, 32, 16, 4), 20);
  run_case(c, /*capture=*/true);
}

INSTANTIATE_TEST_SUITE_P(IndexKernels, PagedCudaIndex, ::testing::Values("smem", "stream", "mma"),
                         [](const ::testing::TestParamInfo<const char*>& i) { return std::string(i.param); });

}  // namespace
}  // namespace msa
