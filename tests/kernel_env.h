// Pins one kernel-selection variable (MSA_ATTENTION_KERNEL, MSA_ATTENTION_DQ, MSA_ATTENTION_DKDV, MSA_INDEX_KERNEL, MSA_KL_KERNEL,
// MSA_CPU_AMX) for the life of a test fixture and restores the caller's value afterwards: the
// variables are process-wide, so a test must not leak its choice into the next test, nor erase one
// the caller set.
#pragma once

#include <cstdlib>
#include <optional>
#include <string>

namespace msa {
namespace testing {

class ScopedKernelEnv {
 public:
  ScopedKernelEnv(const char* var, const char* value) : var_(var) {
    if (const char* prev = std::getenv(var)) prev_ = prev;
    setenv(var, value, 1);
  }
  ~ScopedKernelEnv() {
    if (prev_)
      setenv(var_.c_str(), prev_->c_str(), 1);
    else
      unsetenv(var_.c_str());
  }
  ScopedKernelEnv(const ScopedKernelEnv&) = delete;
  ScopedKernelEnv& operator=(const ScopedKernelEnv&) = delete;

 private:
  std::string var_;
  std::optional<std::string> prev_;
};

}  // namespace testing
}  // namespace msa
