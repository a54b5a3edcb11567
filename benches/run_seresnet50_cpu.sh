#!/usr/bin/env bash
# Side by side: SE-ResNet-50 forward (batch 1, 224x224, f32) on senet's fast CPU backend and in
# PyTorch (timm's seresnet50), 2 threads each (and 1 thread each), in alternating rounds so
# both see the same machine load. Build first:
#   cargo build --release --example seresnet50_cpu
# then: bash benches/run_seresnet50_cpu.sh [rounds] [iters]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
iters=${2:-20}
bin=${SENET_BENCH_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/seresnet50_cpu}
for r in $(seq "$rounds"); do
  echo "round $r: $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  for t in 2 1; do
    RAYON_NUM_THREADS=$t "$bin" --model seresnet50 --iters "$iters"
    python3 benches/torch_seresnet50_cpu.py --threads "$t" --iters "$iters"
  done
done
echo "without SE, 2 threads:"
RAYON_NUM_THREADS=2 "$bin" --model resnet50 --iters "$iters"
python3 benches/torch_seresnet50_cpu.py --model resnet50 --threads 2 --iters "$iters"
echo "end: $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
