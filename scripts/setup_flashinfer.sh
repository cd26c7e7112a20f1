#!/usr/bin/env bash
# Prepares FlashInfer (PyPI, pinned) as a dense-decode baseline for bench/bench_decode.py on the GPU
# machine, which has no network: the wheels for its Python (3.12 by default) are installed into a
# folder, FlashInfer's own JIT builds the kernels the benchmark uses ahead of time for sm_90a (its
# "AOT" directory, flashinfer/data/aot, is where it looks before compiling), and everything is packed
# into .deps/flashinfer-pack/flashinfer.tar.xz, which a device call carries:
#
#   scripts/setup_flashinfer.sh                  # here (needs pip access and nvcc), ~3 min on 2 cores
#   run(carry=[".gpubin_pack", ".deps/flashinfer-pack"], ...)   # device_run.sh unpacks it
#
# Kernels built: bf16 q / kv / out, int32 indices, head_dim 128, no RoPE / window / soft cap: the
# CUDA-core decode module and the tensor-core (prefill) modules fa2 and fa3, which the decode wrapper
# uses for GQA groups above 8 (Hq/Hkv = 16 in the benchmark) and the prefill wrapper uses for q_len > 1.
#   FI_PYTHON_VERSION=3.12   the device's Python (wheels with compiled code are per version)
#   FI_MODULES="decode fa2 fa3"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET_PY=${FI_PYTHON_VERSION:-3.12}
MODULES=${FI_MODULES:-decode fa2 fa3}
DEPS=.deps/flashinfer
PACK=.deps/flashinfer-pack
# FlashInfer 0.6.0: the newest release whose wheel stays small (7.5 MB; 0.7.x is 62 MB, beyond what
# a device call carries) and imports without cuda-python / cutlass-dsl for the wrappers used here.
PINS=(flashinfer-python==0.6.0 apache-tvm-ffi==0.1.15.post2 einops==0.8.1 nvidia-ml-py==13.580.82
      tabulate==0.9.0 click==8.2.1)
PIP="$PY -m pip -q --disable-pip-version-check"
local_py=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
tag() { echo "cp${1/./}"; }

rm -rf "$DEPS" && mkdir -p "$DEPS/wheels-target" "$DEPS/wheels-local" "$PACK"
echo "== wheels for Python $TARGET_PY (device) and $local_py (this machine, to build the kernels)"
$PIP download --no-deps -d "$DEPS/wheels-target" --only-binary=:all: --python-version "$TARGET_PY" \
  --platform manylinux_2_28_x86_64 "${PINS[@]}"
$PIP download --no-deps -d "$DEPS/wheels-local" --only-binary=:all: "${PINS[@]}"
site_target="$DEPS/site-$(tag "$TARGET_PY")"
site_local="$DEPS/site-$(tag "$local_py")"
$PIP install --no-deps --target "$site_target" --only-binary=:all: --python-version "$TARGET_PY" \
  --platform manylinux_2_28_x86_64 "$DEPS"/wheels-target/*.whl
[ "$site_local" = "$site_target" ] || $PIP install --no-deps --target "$site_local" "$DEPS"/wheels-local/*.whl

echo "== building FlashInfer's kernels for sm_90a ($MODULES) with $(command -v nvcc)"
# tvm-ffi keeps the compiled kernels free of Python and torch ABIs, so a module built by this
# Python loads under the device's one of the same tvm-ffi version.
FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE="$PWD/$DEPS/jit" MAX_JOBS=${MSA_JOBS:-$(nproc)} \
  PYTHONPATH="$site_local" $PY - "$PWD/$site_target" $MODULES <<'EOF'
import pathlib, shutil, sys, time
import torch
from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module
target = pathlib.Path(sys.argv[1])
bf = torch.bfloat16
for name in sys.argv[2:]:
    if name == "decode":
        spec = gen_batch_decode_module(bf, bf, bf, torch.int32, 128, 128, 0, False, False)
    else:
        spec = gen_batch_prefill_module(name, bf, bf, bf, torch.int32, 128, 128, 0, False, False, False)
    t = time.time()
    spec.build(verbose=False)
    aot = target / "flashinfer" / "data" / "aot" / spec.name
    aot.mkdir(parents=True, exist_ok=True)
    shutil.copy2(spec.jit_library_path, aot / f"{spec.name}.so")
    print(f"{name}: {spec.name} ({time.time() - t:.0f} s)", flush=True)
EOF

echo "== packing $site_target"
tar -cJf "$PACK/flashinfer.tar.xz" -C "$DEPS" "$(basename "$site_target")"
printf '%s\n' "$(basename "$site_target")" "${PINS[@]}" > "$PACK/CONTENTS"
du -h "$PACK/flashinfer.tar.xz"
