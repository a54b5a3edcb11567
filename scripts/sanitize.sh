#!/usr/bin/env bash
# The kernel suite on the checking builds of the CPU emulator (kernels/emu/README.md):
#   thread     ThreadSanitizer: CUDA threads as TSan fibers, barriers annotated, blocks of a grid
#              on two OS threads (races within and between blocks)
#   address    AddressSanitizer + UndefinedBehaviorSanitizer (out-of-bounds global and dynamic
#              shared memory, misaligned vector accesses)
#   initcheck  reads of shared memory that no thread of the block wrote
# Each mode builds in its own target directory, target/sanitize-MODE (seeded from target/debug
# the first time, so only senet itself recompiles), runs the planted-bug tests (each detector
# must fail on its bug), the cuDNN-side conversion kernels, the emulated SE suite and the
# network kernels' backend tests, and checks that every kernel of the emulator was launched.
# The SE lists are thinned under a checking emulator (tests/common/mod.rs, `sanitizer`): half of
# each shape's combinations, one under thread. Fiber and block order are random per run; a
# failure prints its seed, and SENET_EMU_SEED=N reruns that schedule.
# Usage: scripts/sanitize.sh [MODE...]   (default: thread address initcheck)
#        SENET_SANITIZE_SCOPE=se limits the suite to the SE kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(thread address initcheck)
t0=$SECONDS
cov=$(mktemp -d)
trap 'rm -rf "$cov"' EXIT
# The network backend's emulator tests (every network kernel, dtype and layout, the split
# reductions, chunked convolutions and accumulated gradients): all but the whole-network and
# training ones, which repeat the same kernels at length, and the engine-choice one (no kernels).
nn_filter=(backends::cuda_ --skip conv_engine --skip networks --skip training)
# Under thread also without the three that train or run networks through the same kernels again
# (with them the network tests took 544 s under TSan here, without them 130 s).
nn_thread_skip=(--skip bound_parameters_train --skip equal_nchw_bit_for_bit --skip loss_scaling_is_exact)
for mode in "${modes[@]}"; do
  echo "=== [$((SECONDS - t0))s] SENET_EMU_SANITIZE=$mode"
  dir=target/sanitize-$mode
  if [ ! -d "$dir/debug" ] && [ -d target/debug ]; then
    mkdir -p "$dir"
    cp -a target/debug "$dir/" 2>/dev/null || true  # a seed only: cargo rebuilds what is missing
  fi
  preload=
  case $mode in
    thread) preload=$(gcc -print-file-name=libtsan.so) ;;
    address) preload=$(gcc -print-file-name=libasan.so) ;;
    initcheck) ;;
    *) echo "unknown mode $mode (thread, address, initcheck)" >&2; exit 2 ;;
  esac
  # The sanitizer runtime first in the process (test binaries only, never cargo or rustc).
  # (No runner at all without a runtime to preload: cargo refuses an empty one.)
  runner=()
  [ -n "$preload" ] && runner=("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=env LD_PRELOAD=$preload")
  run() {
    env "${runner[@]}" SENET_EMU_SANITIZE=$mode CARGO_TARGET_DIR=$dir \
      SENET_EMU_COVERAGE=$cov/$mode \
      TSAN_OPTIONS="suppressions=$PWD/scripts/tsan-rust.supp halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}" \
      ASAN_OPTIONS="detect_leaks=0 verify_asan_link_order=0 ${ASAN_OPTIONS:-}" \
      UBSAN_OPTIONS="print_stacktrace=1 halt_on_error=1 ${UBSAN_OPTIONS:-}" \
      cargo test --quiet "$@"
  }
  # TSan allows 8,128 live threads and fibers: one test at a time (a cluster launch alone holds
  # 8 x 512 fibers).
  tt=()
  [ "$mode" = thread ] && tt=(--test-threads=1)
  run --lib -- planted cudnn_conversions "${tt[@]}"
  run --test se -- emulated "${tt[@]}"
  # SENET_SANITIZE_SCOPE=se: the SE kernels only; the network kernels otherwise.
  keep='.'
  if [ "${SENET_SANITIZE_SCOPE:-all}" = se ]; then
    keep='^se_'
  elif [ "$mode" = thread ]; then
    run --test nn -- "${nn_filter[@]}" "${nn_thread_skip[@]}" "${tt[@]}"
  else
    run --test nn -- "${nn_filter[@]}"
  fi
  # Every kernel the emulator registers (the planted ones aside) was launched in this mode.
  registered=$(cat "$cov/$mode".* | awk '$1 == "registered" {print $2}' | grep -v '^senet_planted_' | grep -- "$keep" | sort -u)
  launched=$(cat "$cov/$mode".* | awk '$1 == "launched" {print $2}' | sort -u)
  missing=$(comm -23 <(echo "$registered") <(echo "$launched"))
  if [ -n "$missing" ]; then
    echo "SENET_EMU_SANITIZE=$mode: kernels never launched by the suite:" >&2
    echo "$missing" >&2
    exit 1
  fi
  echo "SENET_EMU_SANITIZE=$mode: clean; $(echo "$launched" | grep -vc '^senet_planted_') of $(echo "$registered" | wc -l) kernels launched"
done
echo "=== [$((SECONDS - t0))s] sanitizer suite clean (${modes[*]})"
