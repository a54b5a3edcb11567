#!/usr/bin/env bash
# Side by side: SE-ResNet-50 forward (batch 1, 224x224, f32) on senet's fast CPU backend and in
# PyTorch (timm's seresnet50), 2 threads each, in alternating rounds so both see the same
# machine load. Build first:
#   cargo build --release --example seresnet50_cpu
# then: bash benches/run_seresnet50_cpu.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
bin=${CARGO_TARGET_DIR:-target}/release/examples/seresnet50_cpu
for r in $(seq "$rounds"); do
  echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
  RAYON_NUM_THREADS=2 "$bin" --model seresnet50 --iters 20
  python3 benches/torch_seresnet50_cpu.py --threads 2 --iters 20
done
echo "reference points (senet, 2 threads): resnet50 without SE"
RAYON_NUM_THREADS=2 "$bin" --model resnet50 --iters 20
