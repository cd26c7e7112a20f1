#!/usr/bin/env bash
# One device call for the attention forward kernels, on binaries from scripts/build_gpubin.sh
# (carry .gpubin): the forward GPU tests under every kernel, compute-sanitizer on one kernel's cases,
# the SASS's tensor-core instructions, and bench_prefill's MSA rows under each named kernel.
#   MSA_FWD_KERNEL=tma MSA_FWD_BENCH_KERNELS="tma mma" MSA_FWD_CONTEXTS=32k,128k scripts/device_forward.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
KERNEL=${MSA_FWD_KERNEL:-tma}
export MSA_COMMIT=${MSA_COMMIT:-unknown}  # the device copy has no .git: pass the commit measured
export LD_LIBRARY_PATH="$PWD/.gpubin/lib:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$PWD/python:$PWD/.gpubin/py/python:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
T=.gpubin/build/tests/msa_tests
nvidia-smi -L
echo "== tests"
timeout "${MSA_FWD_TEST_S:-180}" $T --gtest_filter="${MSA_FWD_FILTER:-*AttentionForwardCuda*:*AttentionTmaLayout*}" >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]|tests ran" "$OUT/tests.log" | head -30
if [ "${MSA_FWD_SANITIZER:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout "${MSA_FWD_SANITIZER_S:-150}" compute-sanitizer --tool $tool $T --gtest_filter="*AttentionForwardCuda*/$KERNEL" >"$OUT/$tool.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/$tool.log" | head -5
  done
fi
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass $T 2>/dev/null | awk '/Function :/{f=$3} /HGMMA/{n[f]++} END{for (k in n) if (k ~ /tma/) print n[k], k}' | head -8
fi
for kern in ${MSA_FWD_BENCH_KERNELS:-}; do
  echo "== bench $kern"
  MSA_ATTENTION_KERNEL=$kern timeout "${MSA_FWD_BENCH_S:-200}" python3 bench/bench_prefill.py \
    --contexts "${MSA_FWD_CONTEXTS:-32k,128k}" --configs "${MSA_FWD_CONFIGS:-hq64_hkv4_d128}" \
    --skip "${MSA_FWD_SKIP:-fa2_dense,flex_block_sparse,torch_topk}" --iid-context 0 --warmup 2 --iters 10 \
    --out "$OUT/prefill_$kern.json" >"$OUT/bench_$kern.log" 2>&1
  echo "bench rc=$?"; tail -12 "$OUT/bench_$kern.log"
done
if [ -n "${MSA_FWD_COMPARE:-}" ]; then  # e.g. "--kernels tma,mma --contexts 32k,128k"
  echo "== forward kernels"
  timeout "${MSA_FWD_COMPARE_S:-300}" python3 bench/forward_kernels.py $MSA_FWD_COMPARE --out "$OUT/forward_kernels.json" \
    >"$OUT/forward_kernels.log" 2>&1
  echo "compare rc=$?"; cat "$OUT/forward_kernels.log" | tail -30
fi
