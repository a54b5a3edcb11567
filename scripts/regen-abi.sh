#!/usr/bin/env bash
# Regenerates src/cuda/abi_generated.rs from kernels/abi.h (needs libclang, e.g. Debian's
# libclang1-14). The build writes bindgen's output to OUT_DIR; this copies it into the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
SENET_REQUIRE_BINDGEN=1 cargo build --quiet --lib
out=$(ls -t target/debug/build/senet-*/out/abi_bindgen.rs | head -n 1)
cp "$out" src/cuda/abi_generated.rs
echo "updated src/cuda/abi_generated.rs from $out"
