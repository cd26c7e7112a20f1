// Scratch planning for the CPU index branch and KL alignment: one layout computes both the exact byte
// count reported by *_workspace_bytes and the offsets carved at run time, so the two cannot disagree.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "msa/ops.h"

namespace msa {
namespace detail {
namespace cpu {

constexpr std::size_t kScratchAlign = 64;

inline std::size_t align_up(std::size_t n, std::size_t a = kScratchAlign) { return (n + a - 1) / a * a; }

// Appends aligned arrays; `bytes` is the running (aligned) size.
struct ScratchPlan {
  std::size_t bytes = 0;
  template <class T>
  std::size_t add(int64_t count) {
    const std::size_t at = align_up(bytes);
    bytes = align_up(at + std::size_t(count) * sizeof(T));
    return at;
  }
};

// Bytes of `threads` per-thread regions of `per_thread` bytes plus `shared` bytes, with slack to align
// a caller's buffer.
inline std::size_t scratch_total(std::size_t per_thread, int threads, std::size_t shared = 0) {
  return align_up(per_thread) * std::size_t(threads) + align_up(shared) + kScratchAlign;
}

// The caller's workspace when given (dispatch checked its size), else an internal allocation.
class Scratch {
 public:
  Scratch(const Workspace& ws, std::size_t bytes) {
    unsigned char* base = static_cast<unsigned char*>(ws.data);
    if (!base) {
      owned_.reset(new unsigned char[bytes]);
      base = owned_.get();
    }
    const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(base);
    base_ = base + (align_up(a) - a);
  }
  unsigned char* base() const { return base_; }
  template <class T>
  T* at(std::size_t offset) const {
    return reinterpret_cast<T*>(base_ + offset);
  }

 private:
  std::unique_ptr<unsigned char[]> owned_;
  unsigned char* base_ = nullptr;
};

}  // namespace cpu
}  // namespace detail
}  // namespace msa
