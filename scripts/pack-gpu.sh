#!/usr/bin/env bash
# Builds the GPU test binaries and the `senet` tool (kernels embedded, SASS for every arch) in
# release mode and packs them, stripped, with the runner scripts into gpu-pack/: a folder that
# runs on any x86-64 Linux machine with an NVIDIA driver and no Rust toolchain.
#
#   scripts/pack-gpu.sh && (cd gpu-pack && OUT=/tmp/out ./gpu-checks.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export SENET_REQUIRE_NVCC=1
# The lent cards are H100 / H200 (sm_90): SASS for that arch alone (plus its PTX) keeps the pack
# well under the 64 MiB a device run can carry (every arch made it 61 MiB). Override to build
# for others.
export SENET_CUDA_ARCHS=${SENET_CUDA_ARCHS:-90}
cargo build --release --bin senet
# The GPU test binaries: the SE kernels (gpu) and the CUDA network backend (nn: backends and
# training; train: the CUDA resume; their cuda tests).
exe() {
  cargo test --release --no-run --test "$1" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
rm -rf gpu-pack
mkdir -p gpu-pack/bin
cp target/release/senet gpu-pack/bin/senet
cp "$(exe gpu)" gpu-pack/bin/gpu-tests
cp "$(exe nn)" gpu-pack/bin/nn-tests
cp "$(exe train)" gpu-pack/bin/train-tests
strip gpu-pack/bin/*
cp scripts/gpu-checks.sh scripts/find-cudnn.sh benches/torch_se.py benches/torch_net.py gpu-pack/
# senet_torch's wheel (kernels embedded, same arch) and its tests, for the `pytorch` phase.
PYENV=$(scripts/python-env.sh | tail -n 1)
(cd python && CARGO_TARGET_DIR=$HOME/.cache/senet/py-target "$PYENV/bin/maturin" build --release \
  --quiet --out ../gpu-pack/wheels)
cp -r python/tests gpu-pack/python-tests
{ git rev-parse HEAD; git status --short; } > gpu-pack/COMMIT
du -sh gpu-pack
