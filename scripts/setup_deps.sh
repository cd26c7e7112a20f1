#!/usr/bin/env bash
# Installs the project's pinned build dependencies into .deps/ (nothing system-wide but apt packages).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -f /usr/include/gtest/gtest.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq libgtest-dev cmake ninja-build >/dev/null
fi
if ! [ -f .deps/python/cutlass_library/source/include/cute/tensor.hpp ]; then
  python3 -m pip install -q --disable-pip-version-check --no-deps --target .deps/python \
    nvidia-cutlass==4.2.0.0
fi
[ -f .deps/python/nanobind/__init__.py ] || python3 -m pip install -q --disable-pip-version-check --target .deps/python nanobind==2.9.2
