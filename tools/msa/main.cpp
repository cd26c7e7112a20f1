// The `msa` command-line tool: `msa run` (MSA forward vs dense attention, checked against the
// oracle), `msa info` (backends and devices), `msa --help`.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "info_command.h"
#include "msa/error.h"
#include "options.h"
#include "run_command.h"

namespace {

const char* kUsage =
    "usage: msa <command> [options]\n"
    "\n"
    "MiniMax Sparse Attention: block-sparse attention with a learned index branch.\n"
    "\n"
    "commands:\n"
    "  run     run the MSA forward and the dense baseline on random (or .npy) inputs, print times\n"
    "          and the speedup, check sampled rows against the float64 oracle (msa run --help)\n"
    "  info    list the backends compiled in, CPU threads and CUDA devices\n"
    "\n"
    "exit status: 0 ok, 1 a failed check or a runtime error, 2 bad usage\n";

bool is_help(const char* a) { return !std::strcmp(a, "--help") || !std::strcmp(a, "-h"); }

}  // namespace

int main(int argc, char** argv) {
  using namespace msa::tool;
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string command = argv[1];
  if (is_help(argv[1]) || command == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  try {
    if (command == "info") {
      if (argc > 2) throw UsageError("'msa info' takes no options");
      return info_command();
    }
    if (command == "run") {
      for (int i = 2; i < argc; ++i)
        if (is_help(argv[i])) {
          std::fputs(run_usage(), stdout);
          return 0;
        }
      return run_command(argc - 2, argv + 2);
    }
    throw UsageError("unknown command '" + command + "'");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "msa: %s\n(try 'msa --help' or 'msa run --help')\n", e.what());
    return 2;
  } catch (const msa::ArgumentError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "msa: error: %s\n", e.what());
    return 1;
  }
}
