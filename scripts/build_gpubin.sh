#!/usr/bin/env bash
# Builds here (no GPU needed) what a device call runs, so the call spends no device time compiling:
# the GPU tests, the CLI and the Python extension for sm_90a with the CUDA runtime linked statically
# and portable x86-64-v3 CPU code, packed into .gpubin/ (git-ignored, ~30 MB) in the layout that
# scripts/device_run.sh reads with MSA_PREBUILT=.gpubin:
#   .gpubin/build/{msa,tests/msa_tests}   .gpubin/py/python/msa/_C*.so   .gpubin/lib/libgomp.so.1
# Carry it (the CUTLASS headers are not needed then):  carry: [".gpubin"]. When it is larger than
# the device's 64 MiB carry limit (~75 MB with everything), carry the xz pack written beside it
# instead and unpack it first:  carry: [".gpubin_pack"], command: tar xJf .gpubin_pack/gpubin.tar.xz && ...
#   scripts/build_gpubin.sh [extra cmake -D options]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${MSA_GPUBIN_BUILD_DIR:-build-gpubin}
PY=${MSA_DEVICE_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python3.12}  # the device's Python is 3.12
scripts/setup_deps.sh >/dev/null
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMSA_CUDA=ON -DMSA_BUILD_PYTHON=ON \
  -DMSA_BUILD_TESTS=ON -DMSA_BUILD_TOOLS=ON -DMSA_EXPERIMENTAL_WGMMA_ATTENTION=ON -DMSA_CPU_ARCH=x86-64-v3 -DMSA_CUDART_STATIC=ON \
  -DMSA_CUTLASS_INCLUDE_DIR="$PWD/.deps/python/cutlass_library/source/include" \
  -Dnanobind_DIR="$PWD/.deps/python/nanobind/cmake" -DPython_EXECUTABLE="$PY" "$@" >/dev/null
cmake --build "$BUILD" -j "${MSA_JOBS:-2}" --target msa_tests msa_cli msa_python
rm -rf .gpubin
mkdir -p .gpubin/build/tests .gpubin/py/python/msa .gpubin/lib
cp "$BUILD/tests/msa_tests" .gpubin/build/tests/
cp "$BUILD/msa" .gpubin/build/
cp "$BUILD"/python/msa/_C*.so .gpubin/py/python/msa/
cp "$(g++ -print-file-name=libgomp.so.1)" .gpubin/lib/
# The commit these binaries were built from, for the device's result files (device_run.sh reads it).
git describe --always --abbrev=7 --dirty > .gpubin/COMMIT 2>/dev/null || echo unknown > .gpubin/COMMIT
mkdir -p .gpubin_pack
tar cJf .gpubin_pack/gpubin.tar.xz .gpubin
du -sh .gpubin .gpubin_pack
