// A progress line on stderr for stages that run for seconds (a 32K-token dense forward on two CPU
// cores takes tens of seconds). A ticker thread redraws it; the timed work only stores a fraction.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace msa {
namespace tool {

class Progress {
 public:
  explicit Progress(std::string stage);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Fraction of the stage done, 0..1; negative (the default) when unknown: only the time is shown.
  void set_fraction(double f) { fraction_.store(f, std::memory_order_relaxed); }

 private:
  void tick();
  std::string stage_;
  std::atomic<double> fraction_{-1.0};
  std::chrono::steady_clock::time_point start_;
  bool tty_;
  bool drawn_ = false;
  bool stop_ = false;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread ticker_;
};

}  // namespace tool
}  // namespace msa
