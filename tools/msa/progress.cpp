#include "progress.h"

#include <unistd.h>

#include <cstdio>

namespace msa {
namespace tool {

namespace {
// Below this a stage needs no progress line; in logs (not a terminal) a line every kLogEvery.
constexpr auto kQuiet = std::chrono::seconds(2);
constexpr auto kLogEvery = std::chrono::seconds(10);
}  // namespace

Progress::Progress(std::string stage)
    : stage_(std::move(stage)), start_(std::chrono::steady_clock::now()), tty_(isatty(2) != 0) {
  ticker_ = std::thread([this] { tick(); });
}

Progress::~Progress() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  ticker_.join();
  if (drawn_ && tty_) std::fprintf(stderr, "\r\033[K");
}

void Progress::tick() {
  std::unique_lock<std::mutex> lock(mutex_);
  auto next_log = start_ + kLogEvery;
  while (!wake_.wait_for(lock, std::chrono::milliseconds(500), [this] { return stop_; })) {
    const auto now = std::chrono::steady_clock::now();
    if (now - start_ < kQuiet || (!tty_ && now < next_log)) continue;
    next_log = now + kLogEvery;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double f = fraction_.load(std::memory_order_relaxed);
    char done[32] = "";
    if (f >= 0) std::snprintf(done, sizeof done, " %3.0f%%", 100.0 * f);
    std::fprintf(stderr, "%s  ... %s%s, %.0f s%s", tty_ ? "\r\033[K" : "", stage_.c_str(), done,
                 seconds, tty_ ? "" : "\n");
    std::fflush(stderr);
    drawn_ = true;
  }
}

}  // namespace tool
}  // namespace msa
