#!/usr/bin/env bash
# Configures and builds msa in a build directory: scripts/build.sh DIR cuda|cpu [TARGET...]
#   cuda: the CUDA backend too (needs nvcc; compiles without a GPU), cpu: the CPU backend only.
# Installs what is missing first (scripts/setup_deps.sh; cmake/ninja from pip, pinned, when the
# system has none or too old a cmake). Jobs: $MSA_JOBS, else 2 under CI, else every core.
# MSA_CPU_ARCH sets the CPU backend's -march (default native).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
backend=$2
shift 2

scripts/setup_deps.sh

# CMake >= 3.24 and ninja: from pip into .deps/tools when the system lacks them.
cmake_ok() {
  command -v cmake >/dev/null || return 1
  local have
  have=$(cmake --version | awk 'NR==1 {print $3}')
  [ "$(printf '%s\n3.24\n' "$have" | sort -V | head -1)" = 3.24 ]
}
if ! cmake_ok || ! command -v ninja >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --target .deps/tools cmake==3.31.6 ninja==1.11.1.4
  export PYTHONPATH="$PWD/.deps/tools${PYTHONPATH:+:$PYTHONPATH}" PATH="$PWD/.deps/tools/bin:$PATH"
fi

cuda_flags=(-DMSA_CUDA=OFF)
if [ "$backend" = cuda ]; then
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$nvcc" ] || { echo "build.sh: cuda requested but nvcc was not found" >&2; exit 1; }
  cuda_flags=(-DMSA_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc")
fi

jobs=${MSA_JOBS:-$([ "${CI:-}" = true ] && echo 2 || nproc)}
mkdir -p "$dir"
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda_flags[@]}" \
  -DMSA_CPU_ARCH="${MSA_CPU_ARCH:-native}" >"$dir/configure.log" 2>&1 ||
  { cat "$dir/configure.log" >&2; exit 1; }
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$dir" -j "$jobs" "${targets[@]}"
