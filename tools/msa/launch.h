// How `msa run` issues one stage: as a single call over the whole batch (GPU, and the training
// passes, whose dk/dv/dki sum over all queries), or on the CPU as a series of chunked-prefill calls
// over query chunks, which the suffix rule makes exact and which lets the tool report progress.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "buffers.h"
#include "msa/config.h"
#include "problem.h"

namespace msa {
namespace tool {

// One library call: its varlen and the packed rows of q (q0, nq) and k (k0, nk) it covers.
struct Call {
  Varlen varlen;
  int64_t q0 = 0, nq = 0, k0 = 0, nk = 0;
};

class Launcher {
 public:
  // max_rows: query rows per CPU call (whole sequences are grouped up to it, longer ones split).
  Launcher(const RunProblem& p, Device device, int64_t max_rows);

  // The whole batch in one call.
  const Call& whole() const { return whole_; }
  // The calls that together cover every query once: whole() on a GPU, chunks on the CPU.
  const std::vector<Call>& chunks() const { return chunks_; }

 private:
  Call make_call(std::vector<int32_t> cu_q, std::vector<int32_t> cu_k, int64_t q0, int64_t k0);
  std::vector<std::unique_ptr<Buffer>> cu_buffers_;
  std::vector<std::vector<int32_t>> host_cu_;
  Device device_;
  Call whole_;
  std::vector<Call> chunks_;
};

// Mean milliseconds of `body` over `repeat` runs after `warmup` runs; cudaEvents on a GPU, the
// steady clock on the CPU.
double time_ms(Device device, int warmup, int repeat, const std::function<void()>& body);

}  // namespace tool
}  // namespace msa
