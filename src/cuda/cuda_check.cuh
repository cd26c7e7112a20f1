// Error handling for the CUDA backend: every runtime call and every launch is checked.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "msa/error.h"

#define MSA_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    cudaError_t msa_err_ = (expr);                                                            \
    if (msa_err_ != cudaSuccess)                                                              \
      throw ::msa::Error(std::string("msa: CUDA error at " __FILE__ ":") +                    \
                         std::to_string(__LINE__) + ": " + cudaGetErrorString(msa_err_));     \
  } while (0)

#define MSA_CUDA_CHECK_LAUNCH() MSA_CUDA_CHECK(cudaGetLastError())
