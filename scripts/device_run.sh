#!/usr/bin/env bash
# One call on the GPU machine: build (CUDA, tests, tool), ctest, compute-sanitizer, the Python
# extension and its tests, the prefill benchmark and `msa run`. Each step logs to $OUT (./device_out
# when OUT is unset); a failing step is reported and the later steps still run; a compact summary
# is printed last (and kept in $OUT/summary.txt). Arguments are passed to bench/bench_prefill.py.
#
#   MSA_COMMIT=$(git rev-parse HEAD) scripts/device_run.sh --quick     # everything, quick benchmark
#   MSA_ONLY=bench scripts/device_run.sh                               # full benchmark only
#   MSA_ONLY=training scripts/device_run.sh                            # training-step benchmark only
#   MSA_ONLY=hf scripts/device_run.sh                                  # MiniMax-M3 in transformers only
#   MSA_ONLY=decode scripts/device_run.sh                              # paged decode benchmark only
#
# Steps: gpu build ctest memcheck racecheck pybuild pytest bench cli, and three opt-in ones (run only
# when named in MSA_ONLY or with MSA_WITH_<STEP>=1):
#   synccheck   compute-sanitizer synccheck on MSA_SYNCCHECK_FILTER (default: a wgmma index test)
#   stages      the kernel timing programs bench/attention_forward_cuda_bench.cu (+ torch SDPA),
#               bench/index_topk_stages.cu (+ torch.topk on its dumped scores), bench/index_wgmma_stage1.cu
#               (HMMA vs the wgmma and warp-specialised stage 1 kernels: output check and timings), and SASS instruction counts
#               (HGMMA, HMMA, LDL/STL) of the library's CUDA objects and of those programs
#   training    bench/bench_training.py (training step vs cuDNN/FA2 fwd+bwd), arguments from
#               MSA_TRAINING_ARGS; after `bench` when both run, which then leaves it
#               MSA_TRAINING_RESERVE_S seconds (default 240)
#   profile     bench/profile_layer.py: the training step's CUDA kernels, one line each (default 128K,
#               Hq 64 / Hkv 4 / D 128, smooth index; arguments from MSA_PROFILE_ARGS); after `training`
#   hf          python/tests/test_hf.py (msa.hf vs transformers' MiniMax-M3 eager path, CPU and CUDA)
#               then bench/bench_hf.py (real-width 2-layer MiniMax-M3, msa vs sdpa/eager; arguments
#               from MSA_HF_ARGS); needs torch and transformers >= 5.17 on the machine (on PYTHONPATH,
#               e.g. a carried folder); after `training`
#   decode      bench/bench_decode.py (paged serving decode step: msa sparse / paged dense vs SDPA dense
#               decode and FlashInfer's, bf16 and FP8 caches), arguments from MSA_DECODE_ARGS; after
#               `hf`. FlashInfer comes from .deps/flashinfer-pack when the call carries it
#               (scripts/setup_flashinfer.sh); without it that baseline is recorded as skipped
#   decode_ncu  Nsight Compute on the paged attention kernel, one decode step per cache kind and K/V
#               page layout (bench/ncu_decode.py, arguments from MSA_NCU_DECODE_ARGS): DRAM bytes and
#               throughput, L2 hit rate, shared-memory bank conflicts; CSV into the bench folder.
#               MSA_NCU_SOURCE=1 adds the full set on one launch and prints its hottest SASS
#               instructions by warp-stall samples (bench/ncu_hot_sass.py)
# Choose with
#   MSA_ONLY=step,step        only these (aliases: sanitizer = memcheck,racecheck; python = pybuild,pytest);
#                             a step whose build is missing still gets that build first
#   MSA_SKIP_<STEP>=1         skip one (e.g. MSA_SKIP_BENCH=1); MSA_SKIP_SANITIZER=1 skips both sanitizers
#   MSA_STAGES_ARGS           sequence lengths of the stages programs (default '32768 131072')
# Knobs: MSA_DEADLINE_S (default 530: the whole script ends well under 9 minutes), MSA_JOBS (16),
#   MSA_GPU_FILTER (gtest filter of the GPU tests, default '*Cuda*:*CUDA*'), MSA_SANITIZER_FILTER,
#   MSA_RACECHECK_FILTER (default: the sanitizer filter), MSA_CLI_ARGS (default '--backend cuda'),
#   MSA_TIMEOUT_<STEP> (seconds), MSA_SERIAL_BUILDS=1 (no Python build alongside the main build),
#   MSA_PREBUILT=.gpubin: use the binaries scripts/build_gpubin.sh made on the dev machine (carry
#   .gpubin): no build steps; ctest runs the GPU test binary directly on MSA_GPU_FILTER.
# Files back in $OUT (the device returns at most 8): device_run.log (every step's output, in order),
# steps.tsv (one line per step, written as it ends), summary.txt, bench/results/<name>.json (one per
# benchmark that ran; also copied beside the logs, with the ncu CSVs).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
LOG=$OUT/device_run.log
STEPS_TSV=$OUT/steps.tsv
SUMMARY=$OUT/summary.txt
WORK=$(mktemp -d /tmp/msa_device_run.XXXXXX)
: >"$LOG"
: >"$STEPS_TSV"
T_START=$(date +%s)

export DEADLINE_S=${MSA_DEADLINE_S:-530}
export JOBS=${MSA_JOBS:-16}
export BUILD_DIR=${MSA_BUILD_DIR:-build-device}
export PY_BUILD_DIR=${MSA_PY_BUILD_DIR:-build-py}
PREBUILT=${MSA_PREBUILT:-}
if [ -n "$PREBUILT" ]; then
  BUILD_DIR=$PREBUILT/build PY_BUILD_DIR=$PREBUILT/py
  export LD_LIBRARY_PATH="$ROOT/$PREBUILT/lib:${LD_LIBRARY_PATH:-}"
fi
export PREBUILT
export GPU_FILTER=${MSA_GPU_FILTER:-'*Cuda*:*CUDA*'}
export SAN_FILTER=${MSA_SANITIZER_FILTER:-$GPU_FILTER}
export RACE_FILTER=${MSA_RACECHECK_FILTER:-$SAN_FILTER}
export CUTLASS_INC=${MSA_CUTLASS_INCLUDE_DIR:-$ROOT/.deps/python/cutlass_library/source/include}
export PYDEPS=$ROOT/.deps/python
export CLI_ARGS=${MSA_CLI_ARGS:---backend cuda}
export SYNC_FILTER=${MSA_SYNCCHECK_FILTER:-IndexTopkWgmmaCuda.StridedRows}
export STAGES_ARGS=${MSA_STAGES_ARGS:-32768 131072}
export PYTHONUNBUFFERED=1
export ROOT OUT
PY=$(command -v python3 || echo python3)
export PY
# The device copy of the tree has no .git of its own (git there can answer for another repository):
# the lead passes MSA_COMMIT, else the commit scripts/build_gpubin.sh recorded beside the prebuilt
# binaries (with -dirty when the tree had changes), and git is the last fallback.
if [ -z "${MSA_COMMIT:-}" ] && [ -n "$PREBUILT" ] && [ -s "$PREBUILT/COMMIT" ]; then
  MSA_COMMIT=$(cat "$PREBUILT/COMMIT")
fi
if [ -z "${MSA_COMMIT:-}" ]; then
  MSA_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export MSA_COMMIT
export BENCH_DIR=$OUT/bench/results
BENCH_ARGS=("$@")

# ---- step selection --------------------------------------------------------------------------
ONLY=",${MSA_ONLY:-},"
ONLY=${ONLY//,sanitizer,/,memcheck,racecheck,}
ONLY=${ONLY//,python,/,pybuild,pytest,}
OPT_IN=" synccheck stages training profile hf decode decode_ncu "
selected() {
  local s=$1 var
  if [ "$ONLY" != ",," ]; then
    case "$ONLY" in *",$s,"*) ;; *) return 1 ;; esac
  elif [[ $OPT_IN == *" $s "* ]]; then
    var="MSA_WITH_${s^^}"
    [ "${!var:-0}" = 1 ] || return 1
  fi
  var="MSA_SKIP_${s^^}"
  [ "${!var:-0}" = 1 ] && return 1
  if [ "${MSA_SKIP_SANITIZER:-0}" = 1 ] && { [ "$s" = memcheck ] || [ "$s" = racecheck ]; }; then
    return 1
  fi
  return 0
}
have_tests() { [ -x "$ROOT/$BUILD_DIR/tests/msa_tests" ]; }
have_cli() { [ -x "$ROOT/$BUILD_DIR/msa" ]; }
have_lib() { [ -f "$ROOT/$BUILD_DIR/libmsa.a" ]; }
have_ext() { compgen -G "$ROOT/$PY_BUILD_DIR/python/msa/_C*.so" >/dev/null; }

DO_BUILD=0; DO_PYBUILD=0
HF_SELECTED=0
selected hf && HF_SELECTED=1
export HF_SELECTED
selected build && DO_BUILD=1
selected pybuild && DO_PYBUILD=1
# A later step whose build is absent (MSA_ONLY=bench on a fresh machine) gets the build it needs.
for s in ctest memcheck racecheck synccheck; do selected $s && ! have_tests && DO_BUILD=1; done
selected stages && ! have_lib && DO_BUILD=1
selected cli && ! have_cli && DO_BUILD=1
for s in pytest bench training profile hf decode decode_ncu; do selected $s && ! have_ext && DO_PYBUILD=1; done
if [ -n "$PREBUILT" ]; then DO_BUILD=0; DO_PYBUILD=0; fi

# ---- step runner -----------------------------------------------------------------------------
declare -A STATUS SECS NOTE
ORDER=()
elapsed() { echo $(($(date +%s) - T_START)); }
record() {  # record NAME STATUS SECONDS NOTE
  STATUS[$1]=$2; SECS[$1]=$3; NOTE[$1]=${4:-}
  ORDER+=("$1")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STEPS_TSV"
}
header() { printf '\n===== [%s] %s (t=%ss) =====\n' "$1" "$2" "$(elapsed)" >>"$LOG"; }
# limit_for NAME DEFAULT: the step's time limit, cut to what the deadline leaves.
limit_for() {
  local var="MSA_TIMEOUT_${1^^}" lim left
  lim=${!var:-$2}
  left=$((DEADLINE_S - $(elapsed) - 10))
  ((lim > left)) && lim=$left
  echo "$lim"
}
status_of() {
  case $1 in
    0) echo ok ;;
    124 | 137) echo TIMEOUT ;;
    *) echo "FAIL($1)" ;;
  esac
}
# run_step NAME DEFAULT_LIMIT FUNCTION: runs FUNCTION in a child bash under `timeout`.
run_step() {
  local name=$1 lim rc t0 log=$WORK/$1.log
  lim=$(limit_for "$1" "$2")
  if ((lim < 5)); then
    record "$name" skipped 0 "no time left before the deadline"
    return 0
  fi
  header "$name" "$3 (limit ${lim}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$lim" bash -c "$3" >"$log" 2>&1
  rc=$?
  cat "$log" >>"$LOG"
  record "$name" "$(status_of $rc)" $(($(date +%s) - t0)) "$(step_note "$name" "$log")"
  return $rc
}
# One line of facts per step, read from its log.
step_note() {
  local name=$1 log=$2
  case $name in
    gpu) head -1 "$log" | cut -c1-80 ;;
    ctest) grep -E 'tests passed|tests failed|^\[  (PASSED|FAILED)  \] [0-9]' "$log" | tr '\n' ';' | cut -c1-150 ;;
    memcheck | racecheck) grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED  \]' "$log" |
      sort | uniq -c | tr -s ' ' | tr '\n' ';' | cut -c1-150 ;;
    pytest) grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -1 | cut -c1-150 ;;
    hf) { grep -E '(passed|failed|skipped|no tests ran) in' "$log" | tail -1; grep -E '^== hf summary' "$log" | tail -1; } |
      tr '\n' ';' | cut -c1-150 ;;
    bench) grep -E '^== bench summary' "$log" | tail -1 | cut -c1-150 ;;
    training) grep -E '^== training summary' "$log" | tail -1 | cut -c1-150 ;;
    profile) grep -E 'msa kernels' "$log" | tail -1 | cut -c1-150 ;;
    decode) grep -E '^== decode summary' "$log" | tail -1 | cut -c1-150 ;;
    decode_ncu) echo "$(grep -c 'gpu__time_duration' "$log") profiled launches" ;;
    synccheck) grep -hE 'ERROR SUMMARY' "$log" | tail -1 | cut -c1-150 ;;
    stages) grep -E '^stages:' "$log" | tr '\n' ';' | cut -c1-150 ;;
    *) grep -iE 'error|FAILED' "$log" | head -1 | cut -c1-150 ;;
  esac
}

# ---- the steps (run in a child bash: exported functions and variables) --------------------------
step_gpu() {
  local rc=0
  nvidia-smi -L || rc=1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv
  nvcc --version | tail -2 || rc=1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' || rc=1
  echo "commit $MSA_COMMIT"
  return $rc
}
step_build() {
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMSA_CUDA=ON \
    -DMSA_BUILD_TESTS=ON -DMSA_BUILD_TOOLS=ON -DMSA_BUILD_PYTHON=OFF \
    -DMSA_CUTLASS_INCLUDE_DIR="$CUTLASS_INC" &&
    cmake --build "$BUILD_DIR" -j "$JOBS"
}
step_ctest() {
  if [ -n "$PREBUILT" ]; then  # its CTest files name the dev machine's paths
    "$BUILD_DIR/tests/msa_tests" --gtest_filter="$GPU_FILTER"
    return
  fi
  ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 120 -j 8
}
step_memcheck() {
  compute-sanitizer --tool memcheck --error-exitcode 42 --print-limit 20 \
    "$BUILD_DIR/tests/msa_tests" --gtest_filter="$SAN_FILTER"
}
step_racecheck() {
  compute-sanitizer --tool racecheck --error-exitcode 42 --print-limit 20 \
    "$BUILD_DIR/tests/msa_tests" --gtest_filter="$RACE_FILTER"
}
step_synccheck() {
  compute-sanitizer --tool synccheck --error-exitcode 42 --print-limit 20 \
    "$BUILD_DIR/tests/msa_tests" --gtest_filter="$SYNC_FILTER"
}
# SASS instruction counts of one binary or object: the tensor-core path it compiled to, and spills.
sass_counts() {
  local sass
  sass=$(cuobjdump --dump-sass "$1" 2>&1)
  echo "SASS $(basename "$1"): HGMMA=$(grep -c HGMMA <<<"$sass") HMMA=$(grep -c HMMA <<<"$sass")" \
    "LDL/STL=$(grep -cE 'LDL|STL' <<<"$sass")"
}
step_stages() {
  local rc=0 bin nv=(nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a
    --expt-relaxed-constexpr -Iinclude -Isrc -I"$CUTLASS_INC")
  bin=$(mktemp -d /tmp/msa_stages.XXXXXX)
  # shellcheck disable=SC2086  # STAGES_ARGS is a word list on purpose
  {
    "${nv[@]}" bench/attention_forward_cuda_bench.cu "$BUILD_DIR/libmsa.a" -Xcompiler -fopenmp -o "$bin/afb" &&
      timeout 120 "$bin/afb" $STAGES_ARGS &&
      timeout 60 "$PY" bench/attention_forward_torch_sdpa.py $STAGES_ARGS
  } || { echo "stages: attention forward FAILED"; rc=1; }
  {
    "${nv[@]}" bench/index_topk_stages.cu -o "$bin/index_topk_stages" &&
      timeout 100 "$bin/index_topk_stages" $STAGES_ARGS &&
      timeout 60 "$PY" bench/index_topk_vs_torch.py /tmp/index_scores_*.f32
  } || { echo "stages: index topk FAILED"; rc=1; }
  {
    "${nv[@]}" bench/index_wgmma_stage1.cu -o "$bin/index_wgmma_stage1" &&
      timeout 200 "$bin/index_wgmma_stage1" 4096 $STAGES_ARGS
  } || { echo "stages: index wgmma stage 1 FAILED"; rc=1; }
  for o in "$BUILD_DIR"/CMakeFiles/msa.dir/src/cuda/*.cu.o "$bin"/*; do
    [ -f "$o" ] && sass_counts "$o"
  done
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
  echo "stages: rc=$rc"
  return $rc
}
step_pybuild() {
  local nb_dir
  nb_dir=$(PYTHONPATH="$PYDEPS:${PYTHONPATH:-}" "$PY" -c 'import nanobind; print(nanobind.cmake_dir())') || {
    echo "nanobind not importable from $PYDEPS (carry .deps/python/nanobind)"; return 1; }
  echo "nanobind: $nb_dir"
  cmake -S . -B "$PY_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMSA_CUDA=ON \
    -DMSA_BUILD_PYTHON=ON -DMSA_BUILD_TESTS=OFF -DMSA_BUILD_TOOLS=OFF \
    -DMSA_CUTLASS_INCLUDE_DIR="$CUTLASS_INC" -Dnanobind_DIR="$nb_dir" -DPython_EXECUTABLE="$PY" &&
    cmake --build "$PY_BUILD_DIR" -j "$JOBS"
}
py_env() { export PYTHONPATH="$ROOT/python:$ROOT/$PY_BUILD_DIR/python:${PYTHONPATH:-}"; }
step_pytest() {
  py_env
  if ! compgen -G "python/tests/test_*.py" >/dev/null; then echo "no python tests"; return 0; fi
  # A step killed by its time limit can leave a truncated kernel in Inductor's cache that a later step
  # would load: every step gets its own cache. test_hf.py runs in the hf step when that is selected.
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor.XXXXXX)
  export TORCHINDUCTOR_CACHE_DIR
  local ignore=()
  [ "${HF_SELECTED:-0}" = 1 ] && ignore=(--ignore=python/tests/test_hf.py)
  "$PY" -m pytest python/tests -q "${ignore[@]}"
}
step_bench() {
  py_env
  local rc budget
  budget=$((LIMIT_S - 20))
  mkdir -p "$BENCH_DIR"
  "$PY" bench/bench_prefill.py --out "$BENCH_DIR/" --time-budget "$budget" "${BENCH_ARGV[@]}"
  rc=$?
  if [ $rc = 3 ]; then  # a kernel fault killed the CUDA context: finish the baselines in a new process
    echo "== CUDA context lost: rerunning the baselines without msa (--resume)"
    "$PY" bench/bench_prefill.py --out "$BENCH_DIR/" --time-budget $((budget / 2)) "${BENCH_ARGV[@]}" \
      --resume --skip msa_index_topk,msa_sparse_forward,msa_total,flex_block_sparse
  fi
  return $rc
}
step_training() {
  py_env
  mkdir -p "$BENCH_DIR"
  # shellcheck disable=SC2086  # MSA_TRAINING_ARGS is a word list on purpose
  "$PY" bench/bench_training.py --out "$BENCH_DIR/" --time-budget $((LIMIT_S - 20)) ${MSA_TRAINING_ARGS:-}
}
step_profile() {
  py_env
  echo "== profile summary (kernel time per step)"
  # shellcheck disable=SC2086  # MSA_PROFILE_ARGS is a word list on purpose
  "$PY" bench/profile_layer.py ${MSA_PROFILE_ARGS:---seq 131072 --hq 64 --hkv 4 --d 128 --di 128 --block 128 --topk 16 --steps 2 --index smooth}
}
step_hf() {
  py_env
  local rc
  # transformers (+ huggingface_hub, tokenizers, safetensors) carried as .deps/hf when the machine lacks it;
  # appended, so the machine's own torch stays first.
  [ -d "$ROOT/.deps/hf" ] && export PYTHONPATH="$PYTHONPATH:$ROOT/.deps/hf"
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor.XXXXXX)  # see step_pytest
  export TORCHINDUCTOR_CACHE_DIR
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  "$PY" -m pytest python/tests/test_hf.py -q -rs
  rc=$?
  mkdir -p "$BENCH_DIR"
  # shellcheck disable=SC2086  # MSA_HF_ARGS is a word list on purpose
  "$PY" bench/bench_hf.py --out "$BENCH_DIR/" --time-budget $((LIMIT_S - 60)) ${MSA_HF_ARGS:-} || rc=$?
  return $rc
}
step_cli() {
  local bin=$BUILD_DIR/msa
  "$bin" info
  # shellcheck disable=SC2086  # CLI_ARGS is a word list on purpose
  "$bin" run $CLI_ARGS
}
step_decode() {
  py_env
  # FlashInfer as a dense baseline when a call carries .deps/flashinfer-pack (scripts/setup_flashinfer.sh).
  if [ -f "$ROOT/.deps/flashinfer-pack/flashinfer.tar.xz" ]; then
    local site
    site=$(head -1 "$ROOT/.deps/flashinfer-pack/CONTENTS")
    [ -d "$ROOT/.deps/flashinfer-run/$site" ] ||
      { mkdir -p "$ROOT/.deps/flashinfer-run" && tar xJf "$ROOT/.deps/flashinfer-pack/flashinfer.tar.xz" -C "$ROOT/.deps/flashinfer-run"; }
    export PYTHONPATH="$PYTHONPATH:$ROOT/.deps/flashinfer-run/$site"
  fi
  mkdir -p "$BENCH_DIR"
  # shellcheck disable=SC2086  # MSA_DECODE_ARGS is a word list on purpose
  "$PY" bench/bench_decode.py --out "$BENCH_DIR/" --time-budget $((LIMIT_S - 20)) ${MSA_DECODE_ARGS:-}
}
export -f step_decode
step_decode_ncu() {
  py_env
  mkdir -p "$BENCH_DIR"
  local metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
  metrics+=,lts__t_sector_hit_rate.pct,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum
  metrics+=,sm__throughput.avg.pct_of_peak_sustained_elapsed
  echo "== decode_ncu summary (attention kernel, two launches per case: warm-up, then profiled)"
  # shellcheck disable=SC2086  # MSA_NCU_DECODE_ARGS is a word list on purpose
  ncu --csv --kernel-name regex:attention_mma_kernel --metrics "$metrics" \
    "$PY" bench/ncu_decode.py ${MSA_NCU_DECODE_ARGS:-} | tee "$BENCH_DIR/ncu_decode.csv"
  [ "${MSA_NCU_SOURCE:-0}" = 1 ] || return 0
  # Where the warps wait, per SASS instruction: the full set on one profiled launch (the first case of
  # MSA_NCU_DECODE_ARGS), then its source page; the 40 instructions with the most stall samples.
  local rep
  rep=$(mktemp -d)/attention_source
  # shellcheck disable=SC2086
  ncu --set full --import-source yes --kernel-name regex:attention_mma_kernel --launch-skip 1 --launch-count 1 \
    -o "$rep" "$PY" bench/ncu_decode.py ${MSA_NCU_DECODE_ARGS:-} >/dev/null &&
    ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$BENCH_DIR/ncu_attention_sass.csv" &&
    "$PY" bench/ncu_hot_sass.py "$BENCH_DIR/ncu_attention_sass.csv"
}
export -f step_decode_ncu
export -f step_gpu step_build step_ctest step_memcheck step_racecheck step_synccheck sass_counts \
  step_stages step_pybuild py_env step_pytest step_bench step_training step_profile step_hf step_cli

# ---- run ---------------------------------------------------------------------------------------
selected gpu && run_step gpu 30 step_gpu

# The Python build compiles the library a second time: alongside the main build it costs little
# wall time on 16 cores (each build is bound by its slowest CUDA file).
PYBUILD_PID=
if ((DO_BUILD && DO_PYBUILD)) && [ "${MSA_SERIAL_BUILDS:-0}" != 1 ]; then
  PY_LIM=$(limit_for pybuild 360)
  PY_T0=$(date +%s)
  timeout --kill-after=10 "$PY_LIM" bash -c step_pybuild >"$WORK/pybuild.log" 2>&1 &
  PYBUILD_PID=$!
fi
((DO_BUILD)) && run_step build 360 step_build
selected ctest && run_step ctest 150 step_ctest
# A default kernel that failed its GPU tests is not what the benchmarks should time: they fall back to
# the kernel it replaced (printed in the summary and recorded in each JSON's MSA_* env), unless
# MSA_NO_FALLBACK=1.
FALLBACKS=""
fallback_if_failed() {  # fallback_if_failed REGEX VAR VALUE
  if [ "${MSA_NO_FALLBACK:-0}" != 1 ] && [ -z "${!2:-}" ] && grep -qE "FAILED  \] $1" "$WORK/ctest.log"; then
    export "$2=$3"
    FALLBACKS+=" $2=$3"
  fi
}
if [ -f "$WORK/ctest.log" ]; then
  fallback_if_failed 'Kernels/AttentionForwardCuda.*/wgmma' MSA_ATTENTION_KERNEL mma
  fallback_if_failed 'Kernels/IndexTopkWgmmaCuda.*/ws' MSA_INDEX_KERNEL wgmma_pipe
  fallback_if_failed 'Kernels/KlAlignmentCuda.*/default' MSA_KL_KERNEL ffma
  [ -n "$FALLBACKS" ] && echo "kernel fallbacks for the benchmarks:$FALLBACKS" >>"$LOG"
fi
selected memcheck && run_step memcheck 90 step_memcheck
selected racecheck && run_step racecheck 90 step_racecheck
selected synccheck && run_step synccheck 90 step_synccheck
selected stages && run_step stages 300 step_stages

if [ -n "$PYBUILD_PID" ]; then
  wait "$PYBUILD_PID"
  rc=$?
  header pybuild "step_pybuild (ran alongside build, limit ${PY_LIM}s)"
  cat "$WORK/pybuild.log" >>"$LOG"
  record pybuild "$(status_of $rc)" $(($(date +%s) - PY_T0)) "$(step_note pybuild "$WORK/pybuild.log") (parallel with build)"
elif ((DO_PYBUILD)); then
  run_step pybuild 360 step_pybuild
fi
selected pytest && run_step pytest 120 step_pytest
if selected bench; then
  # The benchmark gets what is left but 45 s kept for the CLI step (and the training reserve).
  LIMIT_S=$(($(limit_for bench 100000) - $(selected cli && echo 45 || echo 0) -
    $(selected training && echo "${MSA_TRAINING_RESERVE_S:-240}" || echo 0)))
  export LIMIT_S
  BENCH_ARGV_Q=
  ((${#BENCH_ARGS[@]})) && BENCH_ARGV_Q=$(printf '%q ' "${BENCH_ARGS[@]}")
  export BENCH_ARGV_Q
  MSA_TIMEOUT_BENCH=$LIMIT_S run_step bench "$LIMIT_S" 'eval "BENCH_ARGV=($BENCH_ARGV_Q)"; step_bench'
fi
if selected training; then
  LIMIT_S=$(($(limit_for training 100000) - $(selected cli && echo 45 || echo 0)))
  export LIMIT_S
  MSA_TIMEOUT_TRAINING=$LIMIT_S run_step training "$LIMIT_S" step_training
fi
selected profile && run_step profile 120 step_profile
if selected hf; then
  LIMIT_S=$(($(limit_for hf 420) - $(selected cli && echo 45 || echo 0)))
  export LIMIT_S
  MSA_TIMEOUT_HF=$LIMIT_S run_step hf "$LIMIT_S" step_hf
fi
if selected decode; then
  LIMIT_S=$(($(limit_for decode 100000) - $(selected cli && echo 45 || echo 0)))
  export LIMIT_S
  MSA_TIMEOUT_DECODE=$LIMIT_S run_step decode "$LIMIT_S" step_decode
fi
selected decode_ncu && run_step decode_ncu 240 step_decode_ncu
selected cli && run_step cli 45 step_cli

# ---- summary (printed last) --------------------------------------------------------------------
{
  echo
  echo "================ device_run summary ($(elapsed)s, commit ${MSA_COMMIT:0:12}) ================"
  [ -n "$FALLBACKS" ] && echo "kernel fallbacks (a default kernel failed its GPU tests):$FALLBACKS"
  printf '%-10s %-10s %6s  %s\n' step status secs note
  for s in gpu build ctest memcheck racecheck synccheck stages pybuild pytest bench training profile hf decode decode_ncu cli; do
    if [ -n "${STATUS[$s]+x}" ]; then
      printf '%-10s %-10s %6s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${NOTE[$s]}"
    else
      printf '%-10s %-10s %6s  %s\n' "$s" "-" "" "not selected"
    fi
  done
  for s in "${ORDER[@]}"; do
    case ${STATUS[$s]} in ok | skipped) continue ;; esac
    echo "---- $s: last lines of its log"
    grep -vE '^\s*$' "$WORK/$s.log" 2>/dev/null | tail -15 | cut -c1-200
  done
  for s in bench training profile hf decode decode_ncu; do  # each prints its table after "== <step> summary"
    [ -f "$WORK/$s.log" ] || continue
    echo "---- $s table"
    sed -n "/^== $s summary/,\$p" "$WORK/$s.log" | cut -c1-220
  done
  ls "$BENCH_DIR"/*.json 2>/dev/null | sed "s|^$OUT/|json: \$OUT/|"
  echo "logs: \$OUT/device_run.log, \$OUT/steps.tsv"
} | tee "$SUMMARY"
# The device tool does not return files nested too deep under the call's $OUT (when OUT is a
# subfolder of it): the result files go beside the logs as well.
cp "$BENCH_DIR"/*.json "$BENCH_DIR"/*.csv "$OUT"/ 2>/dev/null
rm -rf "$WORK"
FAILED=0
for s in "${ORDER[@]}"; do case ${STATUS[$s]} in ok | skipped) ;; *) FAILED=1 ;; esac; done
exit $FAILED
