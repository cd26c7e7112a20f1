#!/usr/bin/env bash
# Builds the Python package msa and runs its tests (python/tests). Prints pytest's summary line and
# exits non-zero on any failure, including "no tests collected".
#
#   MSA_PY_BUILD=dev (default)  plain CMake build into $MSA_PY_BUILD_DIR (build-py), used through
#                               PYTHONPATH=python:build-py/python (works offline, e.g. on the GPU machine)
#   MSA_PY_BUILD=pip            `pip install .` (scikit-build-core; needs PyPI for the build requirements)
#   MSA_CUDA=AUTO|ON|OFF        CUDA backend; default AUTO where a GPU answers nvidia-smi, else OFF
#   PYTHON=python3              interpreter
# The msa.torch tests need PyTorch: installed, pinned, where it is missing (MSA_PY_TORCH=0 skips that;
# PyPI has only the CUDA build, ~4 GB with its libraries, which runs on the CPU too). Where it cannot
# be installed the torch tests skip, and this script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD_KIND=${MSA_PY_BUILD:-dev}
BUILD_DIR=${MSA_PY_BUILD_DIR:-build-py}
if [ -z "${MSA_CUDA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MSA_CUDA=AUTO; else MSA_CUDA=OFF; fi
fi

# Pinned test and build dependencies, installed only where missing (the GPU machine is offline).
PIP="$PY -m pip install -q --disable-pip-version-check"
$PY -c 'import numpy' 2>/dev/null || $PIP numpy==2.3.5
$PY -c 'import pytest' 2>/dev/null || $PIP pytest==8.4.2
if [ "${MSA_PY_TORCH:-1}" != 0 ] && ! $PY -c 'import torch' 2>/dev/null; then
  $PIP torch==2.15.0 || echo "test_python.sh: torch==2.15.0 could not be installed: the msa.torch tests skip" >&2
fi
if ! [ -f .deps/python/nanobind/__init__.py ] && ! $PY -c 'import nanobind' 2>/dev/null; then
  $PIP --target .deps/python nanobind==2.9.2
fi

if [ "$BUILD_KIND" = pip ]; then
  $PY -c 'import scikit_build_core' 2>/dev/null || $PIP scikit-build-core==0.11.6
  $PIP --config-settings=cmake.define.MSA_CUDA="$MSA_CUDA" .
  RUN_DIR=$(mktemp -d)  # run outside the checkout so that the installed package is the one tested
  TESTS="$PWD/python/tests"
else
  NB_DIR=$(PYTHONPATH=".deps/python:${PYTHONPATH:-}" $PY -c 'import nanobind; print(nanobind.cmake_dir())')
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DMSA_BUILD_PYTHON=ON -DMSA_BUILD_TESTS=OFF \
    -DMSA_BUILD_TOOLS=OFF -DMSA_CUDA="$MSA_CUDA" -Dnanobind_DIR="$NB_DIR" \
    -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
  cmake --build "$BUILD_DIR" --target msa_python -j "${MSA_JOBS:-$(nproc)}"
  export PYTHONPATH="$PWD/python:$PWD/$BUILD_DIR/python:${PYTHONPATH:-}"
  RUN_DIR=$PWD
  TESTS=python/tests
fi

set +e
(cd "$RUN_DIR" && $PY -m pytest -q -p no:cacheprovider "$TESTS" "$@")
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "test_python.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
