#!/usr/bin/env bash
# CPU prefill benchmark in one command: MSA on the CPU backend against PyTorch's dense attention on
# the same cores (bench/bench_cpu.py), then the README's CPU table and plot (bench/make_report.py).
#
#   scripts/bench_cpu.sh                               # every context and config (a few minutes)
#   scripts/bench_cpu.sh --contexts 8k,32k --configs hq8_hkv2_d128
#
# PyTorch (CUDA wheels from PyPI, ~4 GB; no CPU-only wheel is published there), numpy, nanobind and
# matplotlib are installed, pinned, into the git-ignored venv .deps/bench-venv the first time.
# MSA_BENCH_PYTHON names another interpreter that already has them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MSA_BENCH_PYTHON:-}
if [ -z "$PY" ]; then
  VENV=.deps/bench-venv
  if ! [ -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
      torch==2.15.0 numpy==2.4.6 nanobind==2.9.2 matplotlib==3.11.2
  fi
  PY=$VENV/bin/python
fi

GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
NB_DIR=$("$PY" -c 'import nanobind; print(nanobind.cmake_dir())')
cmake -S . -B build-bench-cpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMSA_BUILD_PYTHON=ON \
  -DMSA_BUILD_TESTS=OFF -DMSA_BUILD_TOOLS=OFF -DMSA_CUDA=OFF -Dnanobind_DIR="$NB_DIR" \
  -DPython_EXECUTABLE="$PY" >/dev/null
cmake --build build-bench-cpu --target msa_python -j "${MSA_JOBS:-$(nproc)}"
export PYTHONPATH="$PWD/python:$PWD/build-bench-cpu/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" bench/bench_cpu.py "$@"
"$PY" bench/make_report.py
