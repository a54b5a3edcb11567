#!/usr/bin/env bash
# senet's CPU path and its peers (PyTorch + timm, onnxruntime) side by side in one run: the same
# shapes (ResNet-50's SE stages at batch 32), f32, the same thread count, back to back.
# Prints the machine, the commit and the load average before and after, then both tables.
# Usage: THREADS=2 ITERS=20 bash benches/cpu_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
ITERS=${ITERS:-20}
cargo build --release --bin senet >&2
BIN=${CARGO_TARGET_DIR:-target}/release/senet
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit $(git rev-parse --short HEAD)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
"$BIN" bench --dtypes f32 --threads "$THREADS" --iters "$ITERS" --markdown 2>/dev/null
echo
python3 benches/peers_cpu.py --threads "$THREADS" --iters "$ITERS"
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
