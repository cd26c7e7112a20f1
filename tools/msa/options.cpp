#include "options.h"

#include <cerrno>
#include <cstdlib>
#include <functional>
#include <map>

namespace msa {
namespace tool {

const char* run_usage() {
  return
      "usage: msa run [options]\n"
      "\n"
      "Runs the MSA forward (index top-k, then sparse attention over the selected blocks), then the\n"
      "library's dense causal attention on the same inputs and backend, prints the times and the\n"
      "speedup, and checks sampled query rows against the float64 oracle (exit 1 on a mismatch).\n"
      "\n"
      "problem:\n"
      "  --seqlen N          keys per sequence (default 32768)\n"
      "  --batch N           sequences (default 1)\n"
      "  --q-len N           queries per sequence, the causal suffix of its keys (default: seqlen;\n"
      "                      smaller is chunked prefill, 1..16 is decode)\n"
      "  --heads-q N         query heads Hq (default 8)\n"
      "  --heads-kv N        key/value heads Hkv, one GQA group each (default 2)\n"
      "  --head-dim N        D (default 128)\n"
      "  --index-head-dim N  Di (default 128)\n"
      "  --block-size N      B, tokens per block (default 128)\n"
      "  --topk N            k, blocks per (query, group), local block included (default 16)\n"
      "  --dtype T           bf16 | f16 | f32 (default bf16)\n"
      "  --seed N            seed of the random inputs (default 0)\n"
      "  --inputs DIR        load q.npy k.npy v.npy qi.npy ki.npy [cu_seqlens_q.npy cu_seqlens_k.npy]\n"
      "                      (float32/float16, int32) instead of random inputs; shapes set the sizes\n"
      "execution:\n"
      "  --backend B         auto | cpu | cuda (default auto: cuda when a GPU is present)\n"
      "  --threads N         CPU threads (default: all)\n"
      "  --repeat N          timed repetitions (default 1 on the CPU, 3 on a GPU after a warm-up)\n"
      "  --backward          also run the sparse backward and the KL alignment (dense backward too)\n"
      "  --no-dense          skip the dense baseline\n"
      "output:\n"
      "  --check-rows N      query rows checked against the oracle (default 8; 0 skips the check)\n"
      "  --json FILE         write every number to FILE\n"
      "  --save DIR          write inputs and outputs as .npy files to DIR\n";
}

namespace {

constexpr long long kMaxInt = 0x7fffffff;

long long parse_integer(const std::string& option, const std::string& text, long long min,
                        long long max) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE)
    throw UsageError("option " + option + " needs an integer, got '" + text + "'");
  if (v < min || v > max)
    throw UsageError("option " + option + " must be in " + std::to_string(min) + ".." +
                     std::to_string(max) + ", got " + text);
  return v;
}

}  // namespace

RunOptions parse_run_options(int argc, char** argv) {
  RunOptions o;
  using Setter = std::function<void(const std::string& name, const std::string& value)>;
  auto int_opt = [&](int& field, long long min, long long max = kMaxInt) -> Setter {
    return [&field, min, max](const std::string& n, const std::string& v) {
      field = int(parse_integer(n, v, min, max));
    };
  };
  const std::map<std::string, Setter> valued = {
      {"--seqlen", int_opt(o.seqlen, 1)},
      {"--batch", int_opt(o.batch, 1, 1 << 20)},
      {"--q-len", int_opt(o.q_len, 1)},
      {"--heads-q", int_opt(o.heads_q, 1, 1024)},
      {"--heads-kv", int_opt(o.heads_kv, 1, 1024)},
      {"--head-dim", int_opt(o.head_dim, 1, 256)},
      {"--index-head-dim", int_opt(o.index_head_dim, 1, 256)},
      {"--block-size", int_opt(o.block_size, 1, 1 << 16)},
      {"--topk", int_opt(o.topk, 1, 1 << 16)},
      {"--threads", int_opt(o.threads, 0, 4096)},
      {"--check-rows", int_opt(o.check_rows, 0, 1 << 20)},
      {"--repeat", int_opt(o.repeat, 1, 1000)},
      {"--seed", [&](const std::string& n, const std::string& v) {
         o.seed = uint64_t(parse_integer(n, v, 0, 0x7fffffffffffffffLL));
       }},
      {"--dtype", [&](const std::string& n, const std::string& v) {
         if (v == "bf16") o.dtype = DType::bf16;
         else if (v == "f16") o.dtype = DType::f16;
         else if (v == "f32") o.dtype = DType::f32;
         else throw UsageError("option " + n + " must be bf16, f16 or f32, got '" + v + "'");
       }},
      {"--backend", [&](const std::string& n, const std::string& v) {
         if (v == "auto") o.backend = Backend::automatic;
         else if (v == "cpu") o.backend = Backend::cpu;
         else if (v == "cuda") o.backend = Backend::cuda;
         else throw UsageError("option " + n + " must be auto, cpu or cuda, got '" + v + "'");
       }},
      {"--json", [&](const std::string&, const std::string& v) { o.json_path = v; }},
      {"--inputs", [&](const std::string&, const std::string& v) { o.inputs_dir = v; }},
      {"--save", [&](const std::string&, const std::string& v) { o.save_dir = v; }},
  };
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_value = false;
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (arg == "--backward" || arg == "--no-dense") {
      if (has_value) throw UsageError("option " + arg + " takes no value");
      (arg == "--backward" ? o.backward : o.dense) = arg == "--backward";
      continue;
    }
    auto it = valued.find(arg);
    if (it == valued.end()) throw UsageError("unknown option '" + arg + "'");
    if (!has_value) {
      if (i + 1 >= argc) throw UsageError("option " + arg + " needs a value");
      value = argv[++i];
    }
    it->second(arg, value);
  }
  if (o.q_len == 0) o.q_len = o.seqlen;
  if (o.q_len > o.seqlen)
    throw UsageError("option --q-len (" + std::to_string(o.q_len) + ") must not exceed --seqlen (" +
                     std::to_string(o.seqlen) + "): queries are a suffix of the keys");
  if (o.heads_q % o.heads_kv != 0)
    throw UsageError("option --heads-q (" + std::to_string(o.heads_q) +
                     ") must be a multiple of --heads-kv (" + std::to_string(o.heads_kv) + ")");
  if (int64_t(o.seqlen) * o.batch > 0x7fffffffLL)
    throw UsageError("--seqlen times --batch must fit in int32 (cu_seqlens are int32)");
  return o;
}

}  // namespace tool
}  // namespace msa
