#!/usr/bin/env bash
# A/B two builds of `senet bench` on a noisy machine: runs BASE, NEW, BASE, NEW with the same
# arguments (2 threads, 30 timed runs per row unless overridden), so each pair is side by side.
# Usage: bash benches/ab_senet_bench.sh BASE_BIN NEW_BIN [senet bench options...]
# (build the base with e.g. `git worktree add /tmp/base <commit> && cd /tmp/base &&
#  cargo build --release --bin senet`)
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 BASE_BIN NEW_BIN [senet bench options...]" >&2
  exit 2
fi
BASE=$1
NEW=$2
shift 2
for round in 1 2; do
  for which in base new; do
    if [ "$which" = base ]; then bin=$BASE; else bin=$NEW; fi
    echo "== $which round $round"
    "$bin" bench --threads 2 --iters 30 "$@" 2>&1 | grep -v '^senet bench\|shape  layout'
  done
done
