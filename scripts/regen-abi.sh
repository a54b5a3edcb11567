#!/usr/bin/env bash
# Regenerates src/cuda/abi_generated.rs from kernels/abi.h with bindgen (needs libclang, e.g.
# Debian's libclang1-14), through tools/abi-check. Without --write that tool only compares (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --manifest-path tools/abi-check/Cargo.toml --target-dir target/abi-check -- --write
