#!/usr/bin/env bash
# Sets up, builds (with the CUDA backend whenever nvcc exists: CUDA code must compile even where no
# GPU runs it) and runs the test suite; then the Python tests when scripts/test_python.sh is there.
# MSA_BUILD_DIR picks the build directory (default build-test).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${MSA_BUILD_DIR:-build-test}

backend=cpu
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then backend=cuda; fi
echo "== building ($backend backend) in $dir"
scripts/build.sh "$dir" "$backend"
echo "== ctest"
jobs=${MSA_JOBS:-$([ "${CI:-}" = true ] && echo 2 || nproc)}
ctest --test-dir "$dir" --output-on-failure -j "$jobs"
if [ "$(uname -m)" = x86_64 ]; then
  # The AMX and AVX-512 kernels carry their own target attributes, so a build for the baseline x86-64
  # level (binaries that travel, e.g. scripts/build_gpubin.sh) must still compile them.
  echo "== portable CPU build (MSA_CPU_ARCH=x86-64-v3) in $dir-portable"
  MSA_CPU_ARCH=x86-64-v3 scripts/build.sh "$dir-portable" cpu msa
fi
if [ -x scripts/test_python.sh ]; then
  echo "== scripts/test_python.sh"
  scripts/test_python.sh
fi
