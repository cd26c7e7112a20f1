// Probe of the two wgmma products of the Hopper attention forward (src/cuda/attention_forward_wgmma.cuh),
// stage by stage, with the kernel's 128-byte swizzle atoms and P V product (the probe fixtures of that
// header: wgmma::Smem, wgmma::Mmas, product_s, product_o), on one CTA of two warpgroups and fixed
// random tiles (the kernel itself now takes Q as a register operand of S = Q K^T; its fragment map is
// checked on the host by bench/attention_wgmma_layout_check.cu),
// against a float64 CPU product of the same 16-bit inputs:
//   S = Q K^T  (Q 128 x D: both warpgroups' slices; K 64 x D in pipeline stage 1)
//   O = P V    (P 128 x 64 given as the S accumulator, as the kernel has it; V 64 x D in stage 1)
// for bf16 and f16, D = 64 and 128. Each line prints the max error and the first bad (row, col) with
// got / expected, so one run localises a wrong stage. Side by side it also runs variants:
//   S: the loader as in the kernel (writes through the swizzled CuTe tensor, &sQ(row, d, wg)),
//      the old loader (evaluating the layout, i.e. the swizzle applied to element offsets: must be BAD),
//      and the kernel's loader with the result stored through CuTe's partition_C coordinates instead
//      of the kernel's fragment formula;
//   P V: V MN-major SW128 tiled D-first (the kernel's), MN-major SW128 tiled keys-first, and a
//      transposed copy of V in the K-major SW128 layout (B K-major).
// Before the device stages two host checks run (and only they, with no GPU): the loader's addresses
// follow the 128-byte swizzle of the PTX canonical layouts (16-byte chunk index XOR row within the
// 8-row atom), and both products emulated on the CPU from the descriptors CuTe builds for the
// kernel's tensors (start, LBO, SBO, per warpgroup, k-block and stage) over a host copy of shared
// memory filled at the loader's addresses match the CPU product (and the old loader's do not).
// Exit status: 0 when the host check and the kernel's own variants pass (the other variants are
// informational), 1 otherwise, 2 when there is no GPU.
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc \
//        -I.deps/python/cutlass_library/source/include bench/attention_wgmma_probe.cu \
//        -o /tmp/attention_wgmma_probe && /tmp/attention_wgmma_probe
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/attention_forward_wgmma.cuh"

namespace wg = msa::detail::cuda::wgmma;
namespace mma = msa::detail::cuda::mma;

#define PROBE_CHECK(x)                                                                             \
  do {                                                                                             \
    cudaError_t err_ = (x);                                                                        \
    if (err_ != cudaSuccess) {                                                                     \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, __LINE__,     \
                  cudaGetErrorString(err_));                                                       \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

constexpr int kRows = 64 * wg::kWarpgroups;  // 128: the probe runs two warpgroups of 64 rows
constexpr int kKeys = wg::kKeys;  // 64

// The kernel's accumulator fragment map (top of attention_forward_wgmma.cuh).
__host__ __device__ inline int frag_row(int t, int e) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((e >> 1) & 1); }
__host__ __device__ inline int frag_col(int t, int e) { return 8 * (e >> 2) + 2 * (t % 4) + (e & 1); }

__device__ inline unsigned char* aligned_smem() {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
}

enum SMode { kThroughTensor = 0, kLayoutEvaluated = 1, kStoreByPartitionC = 2 };

// S = Q K^T, out[row][key] (128 x 64, fp32).
template <class E, int D, int kMode>
__global__ void __launch_bounds__(256) probe_s(const uint16_t* q, const uint16_t* k, float* out) {
  using namespace cute;
  using S = wg::Smem<E, D>;
  E* pQ = reinterpret_cast<E*>(aligned_smem());
  E* pK = pQ + S::kQElems;
  Tensor sQ = make_tensor(make_smem_ptr(pQ), typename S::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(pK), typename S::LayoutK{});
  const auto lq = typename S::LayoutQ{};
  const auto lk = typename S::LayoutK{};
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < kRows * kChunks; i += 256) {
    const int r = i / kChunks, c = i % kChunks;
    E* dst = kMode == kLayoutEvaluated ? pQ + lq(r % 64, c * 8, r / 64) : &sQ(r % 64, c * 8, r / 64);
    mma::cp_async_16(mma::smem_addr(dst), q + r * D + c * 8, 16);
  }
  for (int i = threadIdx.x; i < kKeys * kChunks; i += 256) {
    const int r = i / kChunks, c = i % kChunks;
    E* dst = kMode == kLayoutEvaluated ? pK + lk(r, c * 8, 1) : &sK(r, c * 8, 1);
    mma::cp_async_16(mma::smem_addr(dst), k + r * D + c * 8, 16);
  }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  wg::fence_async_shared();
  __syncthreads();

  const int w = threadIdx.x / 128, t = threadIdx.x % 128;
  typename wg::Mmas<E, D>::S mma_s;
  auto thr = mma_s.get_thread_slice(t);
  Tensor tSrQ = thr.partition_fragment_A(sQ);
  Tensor tSrK = thr.partition_fragment_B(sK);
  Tensor acc = partition_fragment_C(mma_s, Shape<_64, Int<kKeys>>{});
  wg::product_s(mma_s, tSrQ(_, _, _, w), tSrK(_, _, _, 1), acc);
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<_64, Int<kKeys>>{}));
  for (int e = 0; e < size(acc); ++e) {
    const int row = kMode == kStoreByPartitionC ? int(get<0>(coord(e))) : frag_row(t, e);
    const int col = kMode == kStoreByPartitionC ? int(get<1>(coord(e))) : frag_col(t, e);
    out[(w * 64 + row) * kKeys + col] = acc(e);
  }
}

// O = P V, out[row][d] (128 x D, fp32); P (128 x 64) enters as the S accumulator.
template <class E, int D, class MmaO, class LayoutV, bool kMnMajorCopy>
__global__ void __launch_bounds__(256) probe_o(const uint16_t* pm, const uint16_t* v, float* out) {
  using namespace cute;
  E* pV = reinterpret_cast<E*>(aligned_smem());
  Tensor sV = make_tensor(make_smem_ptr(pV), LayoutV{});  // (d, key, stage)
  if (kMnMajorCopy) {
    for (int i = threadIdx.x; i < kKeys * (D / 8); i += 256) {
      const int r = i / (D / 8), c = i % (D / 8);
      mma::cp_async_16(mma::smem_addr(&sV(c * 8, r, 1)), v + r * D + c * 8, 16);
    }
  } else {
    // Transposed copy: keys are contiguous, element by element.
    for (int i = threadIdx.x; i < kKeys * D; i += 256) {
      const int r = i / D, d = i % D;
      *reinterpret_cast<uint16_t*>(&sV(d, r, 1)) = v[r * D + d];
    }
  }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  wg::fence_async_shared();
  __syncthreads();

  const int w = threadIdx.x / 128, t = threadIdx.x % 128;
  typename wg::Mmas<E, D>::S mma_s;
  MmaO mma_o;
  auto thr = mma_o.get_thread_slice(t);
  Tensor tOrV = thr.partition_fragment_B(sV);
  Tensor s = partition_fragment_C(mma_s, Shape<_64, Int<kKeys>>{});
  for (int e = 0; e < size(s); ++e) {
    const uint16_t bits = pm[(w * 64 + frag_row(t, e)) * kKeys + frag_col(t, e)];
    s(e) = float(reinterpret_cast<const E&>(bits));
  }
  Tensor p = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, Int<kKeys>>{}));
  Tensor o = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  clear(o);
  wg::product_o(mma_o, s, p, tOrV(_, _, _, 1), o);
  for (int e = 0; e < size(o); ++e) out[(w * 64 + frag_row(t, e)) * D + frag_col(t, e)] = o(e);
}

// ---- host ----

template <class E>
float to_float(uint16_t b) {
  return float(reinterpret_cast<const E&>(b));
}
template <class E>
uint16_t from_float(float f) {
  const E e(f);
  return reinterpret_cast<const uint16_t&>(e);
}

template <class E>
std::vector<uint16_t> random_bits(std::size_t n, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<uint16_t> r(n);
  for (auto& x : r) x = from_float<E>(u(rng));
  return r;
}

// got (rows x cols) against a (rows x inner) times b^T-or-b; b_at(j, x) gives B's element for output
// column j and inner index x. Tolerance: 1e-5 of the sum of |products| (fp32 accumulation of exact
// 16-bit products) plus 1e-6.
template <class E, class BAt>
bool compare(const char* name, const std::vector<float>& got, const std::vector<uint16_t>& a, BAt b_at, int rows,
             int cols, int inner, bool must_pass) {
  double max_err = 0;
  long bad = 0;
  int br = -1, bc = -1;
  double bgot = 0, bref = 0;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) {
      double ref = 0, mag = 0;
      for (int x = 0; x < inner; ++x) {
        const double pr = double(to_float<E>(a[r * inner + x])) * double(b_at(j, x));
        ref += pr;
        mag += std::fabs(pr);
      }
      const double g = got[r * cols + j];
      const double err = std::fabs(g - ref);
      const bool ok = std::isfinite(g) && err <= 1e-5 * mag + 1e-6;
      if (!(err <= max_err) || !std::isfinite(g)) max_err = std::isfinite(g) ? err : INFINITY;
      if (!ok && bad++ == 0) br = r, bc = j, bgot = g, bref = ref;
    }
  if (bad == 0)
    std::printf("  %-66s ok    max abs err %.3g\n", name, max_err);
  else
    std::printf("  %-66s BAD   %ld of %d wrong, max abs err %.3g, first (row %d, col %d): got %.6g expected %.6g%s\n",
                name, bad, rows * cols, max_err, br, bc, bgot, bref, must_pass ? "" : " (informational)");
  return bad == 0 || !must_pass;
}

template <class Kernel>
void launch(Kernel kernel, std::size_t smem, const void* a, const void* b, float* out) {
  PROBE_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<1, 256, smem>>>(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), out);
  PROBE_CHECK(cudaGetLastError());
  PROBE_CHECK(cudaDeviceSynchronize());
}

// Host check of the loader's addresses against the PTX canonical 128-byte swizzle: within each
// 1024-byte atom, row (MN index for K-major, K index for MN-major) i of 8 sits at byte 128 i and its
// 16-byte chunk c at chunk c ^ i. The layout evaluated directly (the old loader) is reported too.
template <class E, int D>
bool host_address_check() {
  using namespace cute;
  using S = wg::Smem<E, D>;
  static unsigned char buffer[(S::kQElems + S::kKElems + S::kVElems) * 2 + 1024];
  E* base = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(buffer) + 1023) & ~uintptr_t(1023));
  Tensor sQ = make_tensor(make_smem_ptr(base), typename S::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(base + S::kQElems), typename S::LayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(base + S::kQElems + S::kKElems), typename S::LayoutV{});
  const auto lq = typename S::LayoutQ{};
  long bad_tensor = 0, bad_layout = 0;
  // (row, contiguous index, byte offset from the tile base)
  auto swizzle_ok = [](int row, int inner, std::ptrdiff_t off) {
    return (off % 1024) / 128 == row % 8 && (off % 128) / 16 == (((inner % 64) / 8) ^ (row % 8)) &&
           off % 16 == (inner % 8) * 2;
  };
  for (int x = 0; x < 2; ++x)
    for (int r = 0; r < 64; ++r)
      for (int d = 0; d < D; ++d) {
        const std::ptrdiff_t oq = reinterpret_cast<char*>(&sQ(r, d, x)) - reinterpret_cast<char*>(base);
        const std::ptrdiff_t ok = reinterpret_cast<char*>(&sK(r, d, x)) - reinterpret_cast<char*>(&sK(0, 0, 0));
        const std::ptrdiff_t ov = reinterpret_cast<char*>(&sV(d, r, x)) - reinterpret_cast<char*>(&sV(0, 0, 0));
        if (!swizzle_ok(r, d, oq) || !swizzle_ok(r, d, ok) || !swizzle_ok(r, d, ov)) ++bad_tensor;
        if (!swizzle_ok(r, d, std::ptrdiff_t(lq(r, d, x)) * 2)) ++bad_layout;
      }
  std::printf("  %-66s %s\n", "loader addresses through the CuTe tensors (kernel)",
              bad_tensor ? "BAD: not the canonical 128-byte swizzle" : "ok");
  std::printf("  %-66s %s\n", "layout evaluated on element offsets (old loader)",
              bad_layout ? "differs from the canonical swizzle (expected)" : "matches (unexpected)");
  return bad_tensor == 0;
}

// Host emulation of the two products as wgmma would compute them from the kernel's descriptors
// (built by CuTe here on the host, where their start address is the tile base: 0) reading a host
// copy of shared memory filled at the loader's addresses. Addressing per the PTX canonical 128-byte
// swizzled layouts (descriptor offsets in 16-byte units):
//   K-major (Q, K):  row m, k of a k-block: start + (m / 8) SBO + (m % 8) 128 + 2 k
//   MN-major (V):    n (= d), k (= key):    start + (n / 64) LBO + (k / 8) SBO + (k % 8) 128 + 2 (n % 64)
// then bits 4-6 of the byte address ^= bits 7-9. With old_loader the tiles are filled as the first
// version of the kernel did (must fail: shows the emulation tells the two apart).
struct Silence {  // CuTe prints an error when it makes a descriptor address on the host
  int saved = -1;
  Silence() {
    std::fflush(stdout);
    saved = dup(1);
    const int null = open("/dev/null", O_WRONLY);
    dup2(null, 1);
    close(null);
  }
  ~Silence() {
    std::fflush(stdout);
    dup2(saved, 1);
    close(saved);
  }
};

inline std::size_t swizzle128(std::size_t a) { return a ^ (((a >> 7) & 7) << 4); }

template <class E, int D>
bool host_descriptor_emulation(bool old_loader) {
  using namespace cute;
  using S = wg::Smem<E, D>;
  static unsigned char buffer[(S::kQElems + S::kKElems + S::kVElems) * 2 + 1024];
  std::memset(buffer, 0, sizeof(buffer));
  E* base = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(buffer) + 1023) & ~uintptr_t(1023));
  E* pQ = base;
  E* pK = pQ + S::kQElems;
  E* pV = pK + S::kKElems;
  Tensor sQ = make_tensor(make_smem_ptr(pQ), typename S::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(pK), typename S::LayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(pV), typename S::LayoutV{});
  std::mt19937 rng(77 + D);
  const auto q = random_bits<E>(std::size_t(kRows) * D, -1.f, 1.f, rng);
  const auto k = random_bits<E>(std::size_t(kKeys) * D, -1.f, 1.f, rng);
  const auto pm = random_bits<E>(std::size_t(kRows) * kKeys, 0.f, 1.f, rng);
  const auto v = random_bits<E>(std::size_t(kKeys) * D, -1.f, 1.f, rng);
  // The loaders: 16-byte chunks of 8 d; K and V into stage 1.
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < D / 8; ++c) {
      E* dst = old_loader ? pQ + typename S::LayoutQ{}(r % 64, c * 8, r / 64) : &sQ(r % 64, c * 8, r / 64);
      std::memcpy(dst, &q[r * D + c * 8], 16);
    }
  for (int r = 0; r < kKeys; ++r)
    for (int c = 0; c < D / 8; ++c) {
      E* dk = old_loader ? pK + typename S::LayoutK{}(r, c * 8, 1) : &sK(r, c * 8, 1);
      E* dv = old_loader ? pV + typename S::LayoutV{}(c * 8, r, 1) : &sV(c * 8, r, 1);
      std::memcpy(dk, &k[r * D + c * 8], 16);
      std::memcpy(dv, &v[r * D + c * 8], 16);
    }
  typename wg::Mmas<E, D>::S mma_s;
  typename wg::Mmas<E, D>::O mma_o;
  auto read = [](const E* tile, std::size_t byte) {
    uint16_t bits;
    std::memcpy(&bits, reinterpret_cast<const unsigned char*>(tile) + swizzle128(byte), 2);
    return double(to_float<E>(bits));
  };
  bool ok = true;
  for (int t : {0, 127}) {  // every thread of a warpgroup holds the same descriptors
    std::vector<float> s_got(std::size_t(kRows) * kKeys, 0.f), o_got(std::size_t(kRows) * D, 0.f);
    {
      Silence quiet;
      auto thr_s = mma_s.get_thread_slice(t);
      auto thr_o = mma_o.get_thread_slice(t);
      Tensor tSrQ = thr_s.partition_fragment_A(sQ);
      Tensor tSrK = thr_s.partition_fragment_B(sK);
      Tensor tOrV = thr_o.partition_fragment_B(sV);
      for (int w = 0; w < 2; ++w)
        for (int kb = 0; kb < D / 16; ++kb) {
          const cute::GmmaDescriptor dq = tSrQ(0, 0, kb, w), dk = tSrK(0, 0, kb, 1);
          for (int m = 0; m < 64; ++m)
            for (int n = 0; n < kKeys; ++n) {
              double acc = 0;
              for (int x = 0; x < 16; ++x) {
                const std::size_t aq = 16 * std::size_t(dq.bitfield.start_address_) +
                                       16 * std::size_t(dq.bitfield.stride_byte_offset_) * (m / 8) + 128 * (m % 8) + 2 * x;
                const std::size_t ak = 16 * std::size_t(dk.bitfield.start_address_) +
                                       16 * std::size_t(dk.bitfield.stride_byte_offset_) * (n / 8) + 128 * (n % 8) + 2 * x;
                acc += read(pQ, aq) * read(pK, ak);
              }
              s_got[(w * 64 + m) * kKeys + n] += float(acc);
            }
        }
      for (int kb = 0; kb < kKeys / 16; ++kb) {
        const cute::GmmaDescriptor dv = tOrV(0, 0, kb, 1);
        for (int r = 0; r < kRows; ++r)
          for (int n = 0; n < D; ++n) {
            double acc = 0;
            for (int x = 0; x < 16; ++x) {
              const std::size_t av = 16 * std::size_t(dv.bitfield.start_address_) +
                                     16 * std::size_t(dv.bitfield.leading_byte_offset_) * (n / 64) +
                                     16 * std::size_t(dv.bitfield.stride_byte_offset_) * (x / 8) + 128 * (x % 8) +
                                     2 * (n % 64);
              acc += double(to_float<E>(pm[r * kKeys + kb * 16 + x])) * read(pV, av);
            }
            o_got[r * D + n] += float(acc);
          }
      }
    }
    char name[96];
    std::snprintf(name, sizeof name, "emulated S = Q K^T from the descriptors (thread %d)%s", t,
                  old_loader ? ", old loader" : "");
    auto k_at = [&](int j, int x) { return to_float<E>(k[j * D + x]); };
    auto v_at = [&](int j, int x) { return to_float<E>(v[x * D + j]); };
    ok &= compare<E>(name, s_got, q, k_at, kRows, kKeys, D, !old_loader);
    std::snprintf(name, sizeof name, "emulated O = P V from the descriptors (thread %d)%s", t,
                  old_loader ? ", old loader" : "");
    ok &= compare<E>(name, o_got, pm, v_at, kRows, D, kKeys, !old_loader);
    if (old_loader) break;
  }
  return ok;
}

template <class E, int D>
bool run(const char* type_name, bool have_gpu) {
  using namespace cute;
  std::printf("%s D=%d\n", type_name, D);
  bool ok = host_address_check<E, D>();
  ok &= host_descriptor_emulation<E, D>(false);
  host_descriptor_emulation<E, D>(true);
  if (!have_gpu) return ok;
  std::mt19937 rng(1234 + D);
  const auto q = random_bits<E>(std::size_t(kRows) * D, -1.f, 1.f, rng);
  const auto k = random_bits<E>(std::size_t(kKeys) * D, -1.f, 1.f, rng);
  const auto pm = random_bits<E>(std::size_t(kRows) * kKeys, 0.f, 1.f, rng);
  const auto v = random_bits<E>(std::size_t(kKeys) * D, -1.f, 1.f, rng);
  uint16_t *dq, *dk, *dp, *dv;
  float* dout;
  PROBE_CHECK(cudaMalloc(&dq, q.size() * 2));
  PROBE_CHECK(cudaMalloc(&dk, k.size() * 2));
  PROBE_CHECK(cudaMalloc(&dp, pm.size() * 2));
  PROBE_CHECK(cudaMalloc(&dv, v.size() * 2));
  PROBE_CHECK(cudaMalloc(&dout, std::size_t(kRows) * D * sizeof(float)));
  PROBE_CHECK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  PROBE_CHECK(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  PROBE_CHECK(cudaMemcpy(dp, pm.data(), pm.size() * 2, cudaMemcpyHostToDevice));
  PROBE_CHECK(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  std::vector<float> got;
  auto fetch = [&](int n) {
    got.assign(n, NAN);
    PROBE_CHECK(cudaMemcpy(got.data(), dout, n * sizeof(float), cudaMemcpyDeviceToHost));
    PROBE_CHECK(cudaMemset(dout, 0xff, std::size_t(kRows) * D * sizeof(float)));  // NaN poison
  };
  PROBE_CHECK(cudaMemset(dout, 0xff, std::size_t(kRows) * D * sizeof(float)));

  using Sm = wg::Smem<E, D>;
  const std::size_t smem_s = 1024 + std::size_t(Sm::kQElems + Sm::kKElems) * 2;
  auto k_at = [&](int j, int x) { return to_float<E>(k[j * D + x]); };
  launch(probe_s<E, D, kThroughTensor>, smem_s, dq, dk, dout);
  fetch(kRows * kKeys);
  ok &= compare<E>("S = Q K^T, loader through tensors (kernel)", got, q, k_at, kRows, kKeys, D, true);
  launch(probe_s<E, D, kStoreByPartitionC>, smem_s, dq, dk, dout);
  fetch(kRows * kKeys);
  ok &= compare<E>("S = Q K^T, stored by partition_C coordinates", got, q, k_at, kRows, kKeys, D, true);
  launch(probe_s<E, D, kLayoutEvaluated>, smem_s, dq, dk, dout);
  fetch(kRows * kKeys);
  compare<E>("S = Q K^T, old loader (layout evaluated; expect BAD)", got, q, k_at, kRows, kKeys, D, false);

  auto v_at = [&](int j, int x) { return to_float<E>(v[x * D + j]); };
  using MmaMn = typename wg::Mmas<E, D>::O;
  using MmaK = decltype(make_tiled_mma(GMMA::rs_op_selector<E, E, float, Shape<_64, Int<D>, Int<kKeys>>,
                                                            GMMA::Major::K, GMMA::Major::K>()));
  using VKeysFirst = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<D>, Int<kKeys>, _2>{},
                                            Step<_2, _1, _3>{}));
  using VtKMajor = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<D>, Int<kKeys>, _2>{}));
  const std::size_t smem_v = 1024 + std::size_t(Sm::kVElems) * 2;
  launch(probe_o<E, D, MmaMn, typename Sm::LayoutV, true>, smem_v, dp, dv, dout);
  fetch(kRows * D);
  ok &= compare<E>("O = P V, V MN-major SW128 D-first (kernel)", got, pm, v_at, kRows, D, kKeys, true);
  launch(probe_o<E, D, MmaMn, VKeysFirst, true>, smem_v, dp, dv, dout);
  fetch(kRows * D);
  compare<E>("O = P V, V MN-major SW128 keys-first", got, pm, v_at, kRows, D, kKeys, false);
  launch(probe_o<E, D, MmaK, VtKMajor, false>, smem_v, dp, dv, dout);
  fetch(kRows * D);
  compare<E>("O = P V, V transposed copy K-major SW128", got, pm, v_at, kRows, D, kKeys, false);

  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dp);
  cudaFree(dv);
  cudaFree(dout);
  return ok;
}

int main() {
  int n = 0;
  const bool have_gpu = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  if (have_gpu) {
    cudaDeviceProp prop{};
    PROBE_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  } else {
    std::printf("no CUDA device: host checks only\n");
  }
  bool ok = run<cute::bfloat16_t, 128>("bf16", have_gpu);
  ok &= run<cute::bfloat16_t, 64>("bf16", have_gpu);
  ok &= run<cute::half_t, 128>("f16", have_gpu);
  ok &= run<cute::half_t, 64>("f16", have_gpu);
  std::printf("%s\n", ok ? "PROBE OK" : "PROBE FAILED");
  if (!ok) return 1;
  return have_gpu ? 0 : 2;
}
