// Host-only check of the assumption the wgmma stage 1 (src/cuda/index_block_scores_wgmma.cuh)
// pools by: for every thread of the two-warpgroup tiled MMA, accumulator element i lies on the
// thread's row get<0>(tScS(0)) + 8 * ((i / 2) % 2), its columns are 2 * (lane % 4) + 8 * (i / 4) +
// i % 2, and the four lanes of a quad share rows; and that the swizzled tiles the kernel fills with
// 16-byte cp.async keep every 8-element row segment contiguous, 16-byte aligned and disjoint (for the
// first kernel's two key buffers and the pipelined kernel's four).
// Exits non-zero on any mismatch.
//   nvcc -std=c++17 --expt-relaxed-constexpr -Iinclude -Isrc -I.deps/python/cutlass_library/source/include \
//        bench/index_wgmma_layout_check.cu -o /tmp/index_wgmma_layout_check && /tmp/index_wgmma_layout_check
#include <cstdio>
#include <cstdint>
#include <vector>

#include "cuda/index_block_scores_wgmma.cuh"
#include "cuda/index_block_scores_wgmma_pipe.cuh"

template <bool kBf16, int kDim, int kKeys, int kStages = msa::detail::cuda::index::kWgmmaStages>
int check() {
  using namespace cute;
  using Traits = msa::detail::cuda::index::WgmmaScoreTraits<kBf16, kDim, kKeys, kStages>;
  typename Traits::TiledMma mma;
  int bad = 0;
  for (int t = 0; t < 256; ++t) {
    auto thr = mma.get_slice(t);
    Tensor c = thr.partition_C(make_identity_tensor(Shape<_128, Int<kKeys>>{}));
    if (size(c) != kKeys / 2) ++bad;
    const int warp = t / 32, lane = t % 32;
    for (int i = 0; i < size(c); ++i) {
      const int row = warp * 16 + lane / 4 + 8 * ((i / 2) % 2);
      const int col = 2 * (lane % 4) + 8 * (i / 4) + i % 2;
      if (get<0>(c(i)) != row || get<1>(c(i)) != col) {
        if (bad < 5) std::printf("t %d i %d: cute (%d,%d) assumed (%d,%d)\n", t, i, int(get<0>(c(i))), int(get<1>(c(i))), row, col);
        ++bad;
      }
    }
  }
  // Element offsets of the kernel's smem tensors, taken through the same pointer-based tensors.
  using Elem = typename Traits::Elem;
  static Elem buf[Traits::kQElems + Traits::kKElems + 1024];
  Elem* base = reinterpret_cast<Elem*>((reinterpret_cast<uintptr_t>(buf) + 1023) & ~uintptr_t(1023));
  auto check_tile = [&](auto tile, const Elem* origin, int rows, std::size_t elems) {
    std::vector<int> hits(elems, 0);
    for (int r = 0; r < rows; ++r)
      for (int s = 0; s < kDim / 8; ++s) {
        const std::ptrdiff_t o = &tile(r, s * 8) - origin;
        if (o % 8 != 0) ++bad;
        for (int e = 0; e < 8; ++e) {
          const std::ptrdiff_t oe = &tile(r, s * 8 + e) - origin;
          if (oe != o + e || oe < 0 || oe >= std::ptrdiff_t(elems)) { ++bad; continue; }
          ++hits[size_t(oe)];
        }
      }
    for (std::size_t i = 0; i < elems; ++i) bad += hits[i] != 1;
  };
  Tensor sQ = make_tensor(make_smem_ptr(base), typename Traits::SmemQ{});
  check_tile(sQ, base, 128, Traits::kQElems);
  Tensor sK = make_tensor(make_smem_ptr(base + Traits::kQElems), typename Traits::SmemK{});
  for (int st = 0; st < kStages; ++st) {
    Elem* const stage_base = base + Traits::kQElems + std::size_t(st) * kKeys * kDim;
    check_tile(sK(_, _, st), stage_base, kKeys, std::size_t(kKeys) * kDim);
  }
  std::printf("bf16 %d dim %d keys %d stages %d: %d mismatches\n", kBf16, kDim, kKeys, kStages, bad);
  return bad;
}

int main() {
  int bad = check<true, 128, 128>() + check<true, 64, 64>() + check<false, 128, 64>() +
            check<false, 64, 128>();
  // The pipelined kernel's four key buffers (index_block_scores_wgmma_pipe.cuh).
  constexpr int kPipe = msa::detail::cuda::index::kPipeStages;
  bad += check<true, 128, 128, kPipe>() + check<true, 64, 64, kPipe>() + check<false, 128, 64, kPipe>() +
         check<false, 64, 128, kPipe>();
  return bad ? 1 : 0;
}
