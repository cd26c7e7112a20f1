// `msa run`: the MSA forward against the dense baseline on one backend, checked against the oracle.
#pragma once

namespace msa {
namespace tool {

// Arguments after "run". Returns the exit status: 0 ok, 1 failed check or error, 2 bad usage.
int run_command(int argc, char** argv);

}  // namespace tool
}  // namespace msa
