#!/usr/bin/env bash
# Builds senet with candle's CUDA backend (feature `candle-cuda`: candle-core/cuda, whose
# candle-kernels compiles candle's own kernels with nvcc, and cudarc's dynamic linking), checks
# that one cudarc serves both, and runs tests/candle.rs: on a machine with a GPU the CUDA tests
# run (SENET_REQUIRE_GPU=1 makes a missing GPU a failure); without a driver, stub CUDA libraries
# (scripts/cuda-stubs.sh: every function returns CUDA_ERROR_STUB_LIBRARY, as NVIDIA's stubs do)
# let it link, and the CUDA tests skip. Slow: candle-kernels takes tens of minutes on 2 cores; not part of CI.
#   scripts/check-candle-cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}/candle-cuda
nvcc=${NVCC:-$(scripts/install-cuda-toolchain.sh | tail -n 1)}
cuda_root=$(dirname "$(dirname "$nvcc")")

echo "--- one cudarc for senet and candle-core (cudarc features of the build)"
users=$(cargo tree --features candle-cuda -i cudarc -e normal --depth 1 --prefix none --format '{p}' | sort -u)
echo "$users"
versions=$(echo "$users" | grep -c '^cudarc ' || true)
if [[ "$versions" != 1 ]] || ! echo "$users" | grep -q '^candle-core ' || ! echo "$users" | grep -q '^senet '; then
  echo "FAIL: expected one cudarc used by both senet and candle-core" >&2
  exit 1
fi
cargo tree --features candle-cuda -e features -i cudarc --prefix none 2>/dev/null \
  | grep -o 'cudarc feature "[^"]*"' | sort -u | tr '\n' ' '; echo

stubs="$target/cuda-stubs"
if ldconfig -p | grep -q 'libcuda\.so\.1'; then
  lib_path=()
  echo "--- a CUDA driver is installed: linking against it"
else
  echo "--- stub CUDA libraries (no driver on this machine)"
  cudarc_src=$(cargo metadata --features candle-cuda --format-version 1 \
    | python3 -c 'import json,sys; m=json.load(sys.stdin); print([p for p in m["packages"] if p["name"]=="cudarc"][0]["manifest_path"].rsplit("/",1)[0])')
  scripts/cuda-stubs.sh "$stubs" "$cudarc_src" cuda:1 nvrtc:13 cublas:13 cublasLt:13 curand:10 cudnn:9
  # candle-kernels links the CUDA runtime (the toolchain's own, from the compiler wheels).
  ln -sf "$cuda_root/lib/libcudart.so.13" "$stubs/lib64/libcudart.so"
  lib_path=("LD_LIBRARY_PATH=$stubs/lib64:$cuda_root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi

# The same environment for the build and the run, so cargo does not rebuild in between.
export PATH="$(dirname "$nvcc"):$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" \
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR="$target" \
  RUSTFLAGS="-L native=$stubs/lib64 ${RUSTFLAGS:-}"
echo "--- build (candle-kernels for sm_$CUDA_COMPUTE_CAP)"
t0=$SECONDS
cargo test --features candle-cuda --test candle --no-run
echo "built in $((SECONDS - t0)) s"

echo "--- tests/candle.rs with candle-cuda"
env "${lib_path[@]}" cargo test --features candle-cuda --test candle
