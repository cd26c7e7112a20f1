#!/usr/bin/env bash
# One device call for the CUDA attention forward: build, GPU tests, sanitizers, SASS check, timings
# (ours and torch SDPA cuDNN). Logs under $OUT; a short summary last.
set -u
OUT=${OUT:-/tmp/afout}; mkdir -p "$OUT"
CUT=$PWD/.deps/python/cutlass_library/source/include
cmake -S . -B build-dev -G Ninja -DMSA_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DMSA_CUTLASS_INCLUDE_DIR=$CUT \
  -DMSA_BUILD_TOOLS=OFF -DMSA_BUILD_PYTHON=OFF -DMSA_BUILD_TESTS=OFF > "$OUT/cmake.log" 2>&1
ninja -C build-dev -j16 msa msa_reference > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
g++ -std=c++17 -O2 -Iinclude -Isrc -Itests -I/usr/local/cuda/include tests/cuda/test_attention_forward_cuda.cpp \
  build-dev/libmsa.a build-dev/libmsa_reference.a -lgtest -lgtest_main -fopenmp -L/usr/local/cuda/lib64 -lcudart \
  -lpthread -o build-dev/afc_test > "$OUT/test_build.log" 2>&1 || tail -5 "$OUT/test_build.log"
nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Iinclude -Isrc bench/attention_forward_cuda_bench.cu \
  build-dev/libmsa.a -Xcompiler -fopenmp -o build-dev/afb > "$OUT/bench_build.log" 2>&1 || { tail -30 "$OUT/bench_build.log"; exit 1; }
cuobjdump --dump-sass build-dev/CMakeFiles/msa.dir/src/cuda/attention_forward.cu.o > "$OUT/sass.txt" 2>&1
timeout 120 ./build-dev/afc_test > "$OUT/tests.log" 2>&1; echo "tests rc=$?" > "$OUT/summary.txt"
timeout 90 compute-sanitizer --tool memcheck ./build-dev/afc_test \
  --gtest_filter='*Gqa3Unaligned*:*MalformedIds*:*Gqa1Short*' > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?" >> "$OUT/summary.txt"
timeout 90 compute-sanitizer --tool racecheck ./build-dev/afc_test \
  --gtest_filter='*Gqa3Unaligned*' > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?" >> "$OUT/summary.txt"
timeout 120 ./build-dev/afb 32768 131072 > "$OUT/bench.log" 2>&1; echo "bench rc=$?" >> "$OUT/summary.txt"
timeout 60 python3 bench/attention_forward_torch_sdpa.py 32768 131072 >> "$OUT/bench.log" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv >> "$OUT/summary.txt" 2>&1
echo "--- SASS (attention_forward.cu.o):" >> "$OUT/summary.txt"
grep -oE "HGMMA|HMMA[.A-Z0-9]*|LDSM[.A-Z0-9]*|LDGSTS[.A-Z0-9]*|LDL|STL" "$OUT/sass.txt" | sort | uniq -c >> "$OUT/summary.txt"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|error:|Expected|Which is" "$OUT/tests.log" | head -40 >> "$OUT/summary.txt"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/memcheck.log" "$OUT/racecheck.log" >> "$OUT/summary.txt"
cat "$OUT/bench.log" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
