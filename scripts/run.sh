#!/usr/bin/env bash
# Sets up, builds and runs `msa run` on the default long-context case: on the GPU when there is one
# (Hq 64, Hkv 4, 128K tokens), else on the CPU (Hq 8, Hkv 2, 32K tokens). Extra arguments go to
# `msa run` (see `build/msa run --help`); MSA_BUILD_DIR picks the build directory (default build).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${MSA_BUILD_DIR:-build}

backend=cpu
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  backend=cuda
fi
echo "== building ($backend backend) in $dir"
scripts/build.sh "$dir" "$backend" msa_cli
echo "== $dir/msa info"
"$dir/msa" info
if [ "$backend" = cuda ] && "$dir/msa" info | grep -q '^cuda:[0-9]'; then
  set -- --heads-q 64 --heads-kv 4 --seqlen 131072 "$@"
fi
echo "== $dir/msa run $*"
exec "$dir/msa" run "$@"
