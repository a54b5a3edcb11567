#!/usr/bin/env bash
# Builds and runs tests/downstream: a crate depending on senet with `default-features = false`
# while cudarc's `dynamic-linking` is on (as under candle's `cuda` feature). Checks that the
# dependency tree holds none of the network / CLI dependencies, then runs the op on the CPU and
# the emulator. Dynamic linking needs libcuda and libnvrtc at link and load time: without a CUDA
# driver here, scripts/cuda-stubs.sh generates stub libraries whose every function returns an
# error (CUDA_ERROR_STUB_LIBRARY), as NVIDIA's own stubs do.
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=tests/downstream/Cargo.toml
target=${CARGO_TARGET_DIR:-$PWD/target}/downstream

echo "--- dependency tree of a senet user with default-features = false"
tree=$(cargo tree --manifest-path "$manifest" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
echo "$tree" | tr '\n' ' '; echo
bad=$(echo "$tree" | grep -E -x 'clap|indicatif|plotters|image|safetensors|serde|serde_json|flate2|bindgen' || true)
if [[ -n "$bad" ]]; then
  echo "FAIL: the lean build pulls in: $bad" >&2
  exit 1
fi

echo "--- stub libcuda / libnvrtc (no driver on this machine)"
stubs="$target/cuda-stubs"
cudarc_src=$(cargo metadata --manifest-path "$manifest" --format-version 1 \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print([p for p in m["packages"] if p["name"]=="cudarc"][0]["manifest_path"].rsplit("/",1)[0])')
scripts/cuda-stubs.sh "$stubs" "$cudarc_src" cuda:1 nvrtc:13

echo "--- build and run"
CUDA_HOME="$stubs" CARGO_TARGET_DIR="$target" cargo build --manifest-path "$manifest"
LD_LIBRARY_PATH="$stubs/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$target/debug/senet-downstream"
