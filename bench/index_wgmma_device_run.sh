#!/bin/bash
# One device call for the wgmma stage 1 of the index branch (opt-in: MSA_INDEX_KERNEL=wgmma): build,
# its GPU tests, compute-sanitizer, HMMA-vs-wgmma output check and timings, SASS check.
# Logs go to $OUT; a short summary is printed last.
cd "$(dirname "$0")/.."
INC=$PWD/.deps/python/cutlass_library/source/include
S=$OUT/summary.txt
cmake -S . -B build-idxwgmma -G Ninja -DMSA_CUDA=ON -DMSA_BUILD_TOOLS=OFF -DMSA_CUTLASS_INCLUDE_DIR=$INC > $OUT/build.log 2>&1
ninja -C build-idxwgmma -j16 msa_tests >> $OUT/build.log 2>&1 && echo "build ok" >> $S || echo "BUILD FAILED" >> $S
nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -Iinclude -Isrc -I$INC \
  bench/index_wgmma_stage1.cu -o /tmp/stage1 >> $OUT/build.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader >> $S
T=build-idxwgmma/tests/msa_tests
for t in $($T --gtest_list_tests --gtest_filter='IndexTopkWgmmaCuda*' | grep '^  '); do
  timeout 30 $T --gtest_filter=IndexTopkWgmmaCuda.$t >> $OUT/tests.log 2>&1; echo "test $t rc=$?" >> $S
done
grep -E 'Failure|Expected|Which is|Value of' $OUT/tests.log | head -20 >> $S
F='IndexTopkWgmmaCuda.SmallBlocksPaddedAndScalarHeadDims:IndexTopkWgmmaCuda.StridedRows:IndexTopkWgmmaCuda.F16Di64Hkv16Blocks64'
timeout 90 compute-sanitizer --tool memcheck $T --gtest_filter=$F > $OUT/sanitizer.log 2>&1; echo "memcheck rc=$?" >> $S
timeout 90 compute-sanitizer --tool racecheck $T --gtest_filter=IndexTopkWgmmaCuda.SmallBlocksPaddedAndScalarHeadDims >> $OUT/sanitizer.log 2>&1; echo "racecheck rc=$?" >> $S
timeout 90 compute-sanitizer --tool synccheck $T --gtest_filter=IndexTopkWgmmaCuda.StridedRows >> $OUT/sanitizer.log 2>&1; echo "synccheck rc=$?" >> $S
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" $OUT/sanitizer.log >> $S
timeout 200 /tmp/stage1 4096 32768 131072 > $OUT/timing.log 2>&1; echo "stage1 compare rc=$?" >> $S
cat $OUT/timing.log >> $S
cuobjdump --dump-sass /tmp/stage1 > /tmp/sass.txt 2>&1
echo "SASS: HGMMA=$(grep -c HGMMA /tmp/sass.txt) HMMA=$(grep -c HMMA /tmp/sass.txt) LDL/STL=$(grep -cE 'LDL|STL' /tmp/sass.txt)" >> $S
cat $S
