// Command-line options of `msa run`, their defaults and their parsing.
#pragma once

#include <stdexcept>
#include <string>

#include "msa/tensor.h"

namespace msa {
namespace tool {

// A bad command line: main prints it with a hint and exits with status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Backend { automatic, cpu, cuda };

struct RunOptions {
  int seqlen = 32768;
  int batch = 1;
  int q_len = 0;  // queries per sequence; 0 means seqlen (prefill)
  int heads_q = 8;
  int heads_kv = 2;
  int head_dim = 128;
  int index_head_dim = 128;
  int block_size = 128;
  int topk = 16;
  DType dtype = DType::bf16;
  uint64_t seed = 0;
  int threads = 0;  // CPU threads; 0 = all
  int check_rows = 8;
  int repeat = 0;   // timed repetitions; 0 = 1 on the CPU, 3 on a GPU (after one warm-up)
  bool backward = false;
  bool dense = true;
  Backend backend = Backend::automatic;
  std::string json_path;
  std::string inputs_dir;  // load q, k, v, qi, ki (and cu_seqlens_q/k) .npy files from here
  std::string save_dir;    // write inputs and outputs as .npy files here
};

// Parses the arguments after "run". Throws UsageError naming the option at fault.
RunOptions parse_run_options(int argc, char** argv);

const char* run_usage();

}  // namespace tool
}  // namespace msa
