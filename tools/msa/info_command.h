// `msa info`: what this build can run on.
#pragma once

namespace msa {
namespace tool {

int info_command();

}  // namespace tool
}  // namespace msa
