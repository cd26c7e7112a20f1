// Whether the AMX path may run here, and the packing of keys and values into the tile layouts.
// Packing needs no AMX instruction: it is plain code, run once per call over K, V (or ki).
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <cstring>

#include "cpu/amx.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MSA_CPU_AMX_BUILD 1
#endif

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

namespace {

#if defined(MSA_CPU_AMX_BUILD)
bool cpu_and_kernel_allow_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = (b >> 16 & 1) /* F */ && (b >> 30 & 1) /* BW */ && (b >> 31 & 1) /* VL */ &&
                      (c >> 1 & 1) /* VBMI: the FP8 widening of the paged index */;
  const bool amx = (d >> 22 & 1) /* AMX-BF16 */ && (d >> 24 & 1) /* AMX-TILE */;
  if (!avx512 || !amx) return false;
  unsigned a1, b1, c1, d1;
  if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) || !(a1 >> 5 & 1) /* AVX512-BF16 */)
    return false;
  // The OS must save the AVX-512 state (XCR0 bits 5-7, with SSE and AVX: 0xe6) ...
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xe6u) != 0xe6u) return false;
  // ... and Linux hands out tile data only on request (per process, inherited by every thread).
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

}  // namespace

bool usable() {
#if defined(MSA_CPU_AMX_BUILD)
  static const bool allowed = cpu_and_kernel_allow_amx();
  if (!allowed) return false;
  const char* env = std::getenv("MSA_CPU_AMX");
  return !(env && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

bool forced() {
  const char* env = std::getenv("MSA_CPU_AMX");
  return usable() && env && std::strcmp(env, "all") == 0;
}

// Full tiles (16 or 32 keys present, 32 or 16 dims present) take a branch-free path on 32-bit
// (bf16 pair) units; the edges of a sequence or of the head dimension take the general one.
void pack_score_tiles(const uint16_t* src, int64_t row_stride, int64_t len, int d, uint16_t* dst) {
  const int dk = packed_dim(d);
  const int64_t keys = packed_keys(len);
  for (int64_t t = 0; t < keys / 16; ++t)
    for (int c = 0; c < dk / 32; ++c) {
      uint16_t* tile = dst + (t * (dk / 32) + c) * 512;
      if (t * 16 + 16 <= len && c * 32 + 32 <= d) {
        uint32_t pairs[16][16];  // [key][dim pair]
        for (int n = 0; n < 16; ++n)
          std::memcpy(pairs[n], src + (t * 16 + n) * row_stride + c * 32, 64);
        uint32_t out[16][16];  // [dim pair][key]
        for (int kk = 0; kk < 16; ++kk)
          for (int n = 0; n < 16; ++n) out[kk][n] = pairs[n][kk];
        std::memcpy(tile, out, sizeof(out));
        continue;
      }
      for (int n = 0; n < 16; ++n) {
        const int64_t key = t * 16 + n;
        const uint16_t* row = key < len ? src + key * row_stride : nullptr;
        for (int kk = 0; kk < 16; ++kk)
          for (int e = 0; e < 2; ++e) {
            const int dim = c * 32 + 2 * kk + e;
            tile[kk * 32 + n * 2 + e] = row && dim < d ? row[dim] : uint16_t(0);
          }
      }
    }
}

void pack_value_tiles(const uint16_t* src, int64_t row_stride, int64_t len, int d, uint16_t* dst) {
  const int dk = packed_dim(d);
  const int64_t keys = packed_keys(len);
  for (int64_t t = 0; t < keys / 32; ++t)
    for (int c = 0; c < dk / 16; ++c) {
      uint16_t* tile = dst + (t * (dk / 16) + c) * 512;
      if (t * 32 + 32 <= len && c * 16 + 16 <= d) {
        uint32_t pairs[16][16];  // [key pair][dim]: the even key in the low half (little endian)
        for (int kk = 0; kk < 16; ++kk) {
          const uint16_t* r0 = src + (t * 32 + 2 * kk) * row_stride + c * 16;
          const uint16_t* r1 = r0 + row_stride;
          for (int n = 0; n < 16; ++n) pairs[kk][n] = uint32_t(r0[n]) | uint32_t(r1[n]) << 16;
        }
        std::memcpy(tile, pairs, sizeof(pairs));
        continue;
      }
      for (int kk = 0; kk < 16; ++kk)
        for (int e = 0; e < 2; ++e) {
          const int64_t key = t * 32 + 2 * kk + e;
          const uint16_t* row = key < len ? src + key * row_stride : nullptr;
          for (int n = 0; n < 16; ++n) {
            const int dim = c * 16 + n;
            tile[kk * 32 + n * 2 + e] = row && dim < d ? row[dim] : uint16_t(0);
          }
        }
    }
}

PackedRuns::PackedRuns(const Problem& p) : seq_begin(size_t(p.batch) + 1, 0) {
  for (int b = 0; b < p.batch; ++b)
    seq_begin[size_t(b) + 1] = seq_begin[size_t(b)] + packed_keys(sequence_span(p.varlen, b).k_len);
}

PackedRuns::Run PackedRuns::run(const Problem& p, int64_t r) const {
  const int64_t key = r * kPackKeys;
  const int b =
      int(std::upper_bound(seq_begin.begin(), seq_begin.end(), key) - seq_begin.begin()) - 1;
  const int64_t first = key - seq_begin[size_t(b)];
  return {b, first, std::min<int64_t>(kPackKeys, sequence_span(p.varlen, b).k_len - first)};
}

void pack_key_major_rows(const uint16_t* qrows, int64_t rows, int d, int64_t* position,
                         uint16_t* packed) {
  const int64_t padded = packed_keys(rows);
  std::fill(position + rows, position + padded, std::numeric_limits<int64_t>::max());
  pack_score_tiles(qrows, packed_dim(d), padded, packed_dim(d), packed);
}

const uint16_t* key_chunk(const uint16_t* keys, int64_t* stride, int nk, int d, bool in_place,
                          uint16_t* staged) {
  if (in_place) return keys;
  const int dk = packed_dim(d);
  for (int t = 0; t < kPackKeys; ++t)
    for (int i = 0; i < dk; ++i) staged[t * dk + i] = t < nk && i < d ? keys[t * *stride + i] : 0;
  *stride = dk;
  return staged;
}

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa
