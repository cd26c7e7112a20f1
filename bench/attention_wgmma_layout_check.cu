// Host-only check of what the wgmma attention forward (src/cuda/attention_forward_wgmma.cuh) assumes
// about CuTe's layouts, for the exact tiled MMAs and shared-memory layouts of the kernel:
// - S accumulator (64 x 64) and O accumulator (64 x D): thread t's element e = i + 2 h + 4 n sits at
//   row 16 (t / 32) + (t % 32) / 4 + 8 h, column 8 n + 2 (t % 4) + i;
// - the register A operand of P V (64 x 64 P) and of the kernel's S = Q K^T (64 x D Q): the same
//   (row, column) at the same e, so P is the S accumulator converted element by element and Q is
//   loaded straight into its fragment;
// - every 16-byte chunk the cp.async loader writes (8 consecutive d of one row) is contiguous and
//   16-byte aligned at the addresses of the swizzled CuTe smem tensors (the kernel's K and V rings,
//   and the probe's Q, K, V tiles), which is how they are addressed. (The layouts must not be evaluated directly: their swizzle acts on byte
//   addresses; bench/attention_wgmma_probe.cu checks the addresses against the PTX canonical swizzle.)
// Exits non-zero on any mismatch.
//   nvcc -std=c++17 --expt-relaxed-constexpr -Iinclude -Isrc -I.deps/python/cutlass_library/source/include \
//        bench/attention_wgmma_layout_check.cu -o /tmp/attention_wgmma_layout_check && /tmp/attention_wgmma_layout_check
#include <cstdio>

#include "cuda/attention_forward_wgmma.cuh"

namespace wg = msa::detail::cuda::wgmma;

template <class E, int D>
int check() {
  using namespace cute;
  constexpr int kKeys = wg::kKeys;
  typename wg::Mmas<E, D>::S mma_s;
  typename wg::Mmas<E, D>::O mma_o;
  int bad = 0;
  auto fragment_at = [](int t, int e, int& row, int& col) {
    const int i = e & 1, h = (e >> 1) & 1, n = e >> 2;
    row = 16 * (t / 32) + (t % 32) / 4 + 8 * h;
    col = 8 * n + 2 * (t % 4) + i;
  };
  for (int t = 0; t < 128; ++t) {
    Tensor s = mma_s.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<kKeys>>{}));
    Tensor a = mma_o.get_thread_slice(t).partition_A(make_identity_tensor(Shape<_64, Int<kKeys>>{}));
    Tensor o = mma_o.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<D>>{}));
    if (size(s) != kKeys / 2 || size(a) != kKeys / 2 || size(o) != D / 2) ++bad;
    int row, col;
    for (int e = 0; e < size(s); ++e) {
      fragment_at(t, e, row, col);
      if (get<0>(s(e)) != row || get<1>(s(e)) != col) ++bad;
      if (get<0>(a(e)) != row || get<1>(a(e)) != col) ++bad;
    }
    for (int e = 0; e < size(o); ++e) {
      fragment_at(t, e, row, col);
      if (get<0>(o(e)) != row || get<1>(o(e)) != col) ++bad;
    }
  }
  // The kernel's S product takes Q as a register A operand (64 x D): the same map, so Q is loaded
  // from global memory straight into the fragment; its accumulator is the S map above.
  typename wg::TileMmas<E, D>::S mma_sq;
  for (int t = 0; t < 128; ++t) {
    Tensor a = mma_sq.get_thread_slice(t).partition_A(make_identity_tensor(Shape<_64, Int<D>>{}));
    Tensor c = mma_sq.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<kKeys>>{}));
    if (size(a) != D / 2 || size(c) != kKeys / 2) ++bad;
    int row, col;
    for (int e = 0; e < size(a); ++e) {
      fragment_at(t, e, row, col);
      if (get<0>(a(e)) != row || get<1>(a(e)) != col) ++bad;
    }
    for (int e = 0; e < size(c); ++e) {
      fragment_at(t, e, row, col);
      if (get<0>(c(e)) != row || get<1>(c(e)) != col) ++bad;
    }
  }
  Tensor qf = make_tensor<E>(partition_shape_A(mma_sq, Shape<_64, Int<D>>{}));
  for (int e = 0; e < size(qf); ++e)
    if (qf.layout()(e) != e) ++bad;
  {
    // The kernel's K and V rings: 16-byte chunks contiguous and aligned in every slot.
    using R = wg::Ring<E, D>;
    static unsigned char ring[(R::kKElems + R::kVElems) * 2 + 1024];
    E* rb = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(ring) + 1023) & ~uintptr_t(1023));
    Tensor rK = make_tensor(make_smem_ptr(rb), typename R::LayoutK{});
    Tensor rV = make_tensor(make_smem_ptr(rb + R::kKElems), typename R::LayoutV{});
    auto addr = [](auto& x) { return reinterpret_cast<uintptr_t>(&x); };
    for (int x = 0; x < wg::kStages; ++x)
      for (int r = 0; r < wg::kKeys; ++r)
        for (int c = 0; c < D; c += 8) {
          if (addr(rK(r, c, x)) % 16 || addr(rV(c, r, x)) % 16) ++bad;
          for (int j = 0; j < 8; ++j)
            if (addr(rK(r, c + j, x)) != addr(rK(r, c, x)) + 2 * j || addr(rV(c + j, r, x)) != addr(rV(c, r, x)) + 2 * j)
              ++bad;
        }
  }
  // The register fragment of P is laid out compactly in the order of partition_A's elements.
  Tensor p = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, Int<kKeys>>{}));
  for (int e = 0; e < size(p); ++e)
    if (p.layout()(e) != e) ++bad;
  using S = wg::Smem<E, D>;
  static unsigned char buffer[(S::kQElems + S::kKElems + S::kVElems) * 2 + 1024];
  E* base = reinterpret_cast<E*>((reinterpret_cast<uintptr_t>(buffer) + 1023) & ~uintptr_t(1023));
  Tensor sQ = make_tensor(make_smem_ptr(base), typename S::LayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(base + S::kQElems), typename S::LayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(base + S::kQElems + S::kKElems), typename S::LayoutV{});
  auto at = [](auto& x) { return reinterpret_cast<uintptr_t>(&x); };
  for (int x = 0; x < 2; ++x)
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < D; c += 8) {
        if (at(sQ(r, c, x)) % 16 || at(sK(r, c, x)) % 16 || at(sV(c, r, x)) % 16) ++bad;
        for (int j = 0; j < 8; ++j)
          if (at(sQ(r, c + j, x)) != at(sQ(r, c, x)) + 2 * j || at(sK(r, c + j, x)) != at(sK(r, c, x)) + 2 * j ||
              at(sV(c + j, r, x)) != at(sV(c, r, x)) + 2 * j)
            ++bad;
      }
  std::printf("D=%d %s: %s\n", D, sizeof(E) == 2 && std::is_same<E, cute::half_t>::value ? "f16" : "bf16",
              bad ? "MISMATCH" : "ok");
  return bad;
}

int main() {
  const int bad = check<cute::bfloat16_t, 128>() + check<cute::bfloat16_t, 64>() + check<cute::half_t, 128>() +
                  check<cute::half_t, 64>();
  return bad ? 1 : 0;
}
