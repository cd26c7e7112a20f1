#!/bin/bash
# One device call for the CUDA index branch: build, GPU tests, compute-sanitizer, SASS check, timings.
# Logs go to $OUT; a short summary is printed last.
cd "$(dirname "$0")/.."
INC=$PWD/.deps/python/cutlass_library/source/include
S=$OUT/summary.txt
cmake -S . -B build-cudaidx -G Ninja -DMSA_CUDA=ON -DMSA_BUILD_TOOLS=OFF -DMSA_CUTLASS_INCLUDE_DIR=$INC > $OUT/build.log 2>&1
ninja -C build-cudaidx -j16 msa_tests >> $OUT/build.log 2>&1 && echo "build ok" >> $S || echo "BUILD FAILED" >> $S
nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Iinclude -Isrc bench/index_topk_stages.cu -o /tmp/stages >> $OUT/build.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader >> $S
timeout 100 /tmp/stages 32768 131072 > $OUT/timing.log 2>&1; echo "stages rc=$?" >> $S
timeout 60 python3 bench/index_topk_vs_torch.py /tmp/index_scores_*.f32 >> $OUT/timing.log 2>&1
cat $OUT/timing.log >> $S
T=build-cudaidx/tests/msa_tests
for t in $($T --gtest_list_tests --gtest_filter='IndexTopkCuda*' | grep '^  '); do
  timeout 20 $T --gtest_filter=IndexTopkCuda.$t >> $OUT/tests.log 2>&1; echo "test $t rc=$?" >> $S
done
grep -E 'Failure|Expected|Which is|Value of' $OUT/tests.log | head -20 >> $S
F='IndexTopkCuda.SmallBlocksPaddedAndScalarHeadDims:IndexTopkCuda.StridedRows'
timeout 40 compute-sanitizer --tool memcheck $T --gtest_filter=$F > $OUT/sanitizer.log 2>&1; echo "memcheck rc=$?" >> $S
timeout 40 compute-sanitizer --tool racecheck $T --gtest_filter=IndexTopkCuda.SmallBlocksPaddedAndScalarHeadDims >> $OUT/sanitizer.log 2>&1; echo "racecheck rc=$?" >> $S
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" $OUT/sanitizer.log >> $S
cuobjdump --dump-sass /tmp/stages > /tmp/sass.txt 2>&1
echo "SASS: HGMMA=$(grep -c HGMMA /tmp/sass.txt) HMMA=$(grep -c HMMA /tmp/sass.txt) LDL/STL=$(grep -cE 'LDL|STL' /tmp/sass.txt)" >> $S
cat $S
