#!/usr/bin/env bash
# Every GPU check, from a folder made by scripts/pack-gpu.sh. Logs go to $OUT (default ./out).
#
#   PHASES="info tests pytorch sanitize bench torch ncu net" DEADLINE=450 ./gpu-checks.sh
#
# info:     nvidia-smi, `senet info --kernels`
# tests:    the GPU test suite with SENET_REQUIRE_GPU=1 (a missing GPU fails)
# pytorch:  senet_torch's CUDA tests (test_cuda_*: CUDA vs CPU, a side stream, graph capture)
#           from the packed wheel, with the machine's torch
# sanitize: compute-sanitizer memcheck, racecheck and synccheck over a reduced case list
# bench:    `senet gpu-bench` (CSV to $OUT/gpu-bench.csv)
# torch:    benches/torch_se.py on the same card, with our CSV for the side-by-side ratios
# ncu:      Nsight Compute counters (DRAM bytes, bandwidth, L2 hit rate) for the main kernels
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
# Our binaries load libcuda at run time: add the container's driver folder as a fallback (after
# whatever is set, never before the system's own libraries: prepending /usr/lib made a
# dynamically linked Python load another build's libpython and lose its site-packages). Python
# phases run with the caller's LD_LIBRARY_PATH unchanged.
orig_ld=${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/nvidia/lib64
# cuDNN for the network backend's convolutions: PyTorch's wheels bring it (nvidia/cudnn/lib in
# site-packages). Appended, like the driver folder; without it the backend uses its own kernels
# and the tests say "skipped cuDNN convolutions".
cudnn_dir=$(env LD_LIBRARY_PATH="$orig_ld" "$here/find-cudnn.sh")
if [ -n "$cudnn_dir" ]; then
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$cudnn_dir
fi
echo "cuDNN folder: ${cudnn_dir:-none found}" | tee -a "$out/info.log"
# cuBLAS for the im2col convolution engine (its GPU tests ask for it), from the same wheels.
cublas_dir=$(env LD_LIBRARY_PATH="$orig_ld" "$here/find-cudnn.sh" libcublas)
if [ -n "$cublas_dir" ]; then
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$cublas_dir
fi
echo "cuBLAS folder: ${cublas_dir:-none found}" | tee -a "$out/info.log"
export SENET_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
phases=${PHASES:-"info tests pytorch sanitize bench torch ncu net"}
bin=$here/bin

# DEADLINE=S (seconds from the start): each phase's limit is cut to the time left, and a phase
# with under 15 s left is skipped (reported as failed), so that one device call ends inside its
# own limit with every log written.
deadline=${DEADLINE:-0}
phase() { # name limit-seconds command...
  local name=$1 limit=$2
  shift 2
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 15 ]; then
      echo "=== $name SKIPPED (deadline ${deadline}s reached): $*" | tee -a "$out/$name.log"
      return 3
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$out/$name.log"
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$out/$name.log"
  return $rc
}

status=0
for p in $phases; do
  case $p in
    info)
      phase info 60 nvidia-smi
      phase info 60 "$bin/senet" info --kernels
      cat "$here/COMMIT" >>"$out/info.log"
      grep -E "device|kernel builds|cuDNN" "$out/info.log" ;;
    tests)
      phase tests ${TESTS_LIMIT:-300} "$bin/gpu-tests" --test-threads 8 || status=1
      SENET_TEST_EMULATOR=0 phase tests ${NN_TESTS_LIMIT:-120} "$bin/nn-tests" backends::cuda_ || status=1
      SENET_TEST_EMULATOR=0 phase tests ${NN_TESTS_LIMIT:-120} "$bin/nn-tests" training::a_small_se_network_learns_on_cuda || status=1
      SENET_TEST_EMULATOR=0 phase tests ${NN_TESTS_LIMIT:-120} "$bin/train-tests" run::resume_on_the_cuda_backend || status=1
      grep -E "^test |FAIL|failures|test result|cases x" "$out/tests.log" | head -60 ;;
    pytorch)
      # The wheel is a zip: unpacked next to the tests, no pip needed (abi3, no dependencies
      # beyond the machine's torch).
      rm -rf "$here/pylib" && mkdir -p "$here/pylib"
      python3 -m zipfile -e "$here"/wheels/senet_torch-*.whl "$here/pylib"
      if env LD_LIBRARY_PATH="$orig_ld" python3 -c "import pytest" 2>/dev/null; then
        phase pytorch ${PYTORCH_LIMIT:-240} env LD_LIBRARY_PATH="$orig_ld" PYTHONPATH="$here/pylib" \
          python3 -m pytest -q -p no:cacheprovider "$here/python-tests/test_ops.py" -k cuda || status=1
      else
        echo "pytest is not installed here: senet_torch's CUDA tests not run" | tee -a "$out/pytorch.log"
        status=1
      fi
      grep -E "passed|failed|skipped|error|Error" "$out/pytorch.log" | tail -20 ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        # racecheck is the slowest: the tiny case list (it did not finish the small one in 110 s).
        cases=small
        [ "$tool" = racecheck ] && cases=tiny
        SENET_GPU_CASES=$cases phase sanitize ${SANITIZE_LIMIT:-90} compute-sanitizer --tool $tool \
          --error-exitcode 9 "$bin/gpu-tests" --test-threads 1 gpu_f32_nchw gpu_bf16_nhwc gpu_f16_nchw || status=1
        # memcheck also runs the NHWC ops (their index math is the newest).
        nn_cases="backends::cuda_convolution backends::cuda_pointwise"
        [ "$tool" = memcheck ] && nn_cases="$nn_cases backends::cuda_nhwc_ops"
        SENET_TEST_EMULATOR=0 phase sanitize ${SANITIZE_LIMIT:-90} compute-sanitizer --tool $tool \
          --error-exitcode 9 "$bin/nn-tests" --test-threads 1 $nn_cases || status=1
      done
      grep -E "=== sanitize|ERROR SUMMARY|test result|error" "$out/sanitize.log" | head -30 ;;
    bench)
      phase bench ${BENCH_LIMIT:-180} "$bin/senet" gpu-bench --csv "$out/gpu-bench.csv" ${BENCH_ARGS:-} || status=1
      grep -E "^\|" "$out/bench.log" | head -120 ;;
    torch)
      phase torch ${TORCH_LIMIT:-240} env LD_LIBRARY_PATH="$orig_ld" python3 "$here/torch_se.py" --ours "$out/gpu-bench.csv" --out "$out/torch.csv" \
        ${TORCH_ARGS:-} || status=1
      grep -E "^\|" "$out/torch.log" | head -60 ;;
    ncu)
      phase ncu ${NCU_LIMIT:-120} ncu --clock-control none --target-processes all -k regex:se_ \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct \
        "$bin/senet" gpu-bench --shapes 256x256x56x56,256x2048x7x7 --dtypes bf16 --layouts nchw,nhwc \
        --iters 1 --warmup 0 ${NCU_ARGS:-} || status=1
      grep -E "se_|dram__|lts__|gpu__time" "$out/ncu.log" | head -80 ;;
    net)
      # The CUDA network backend next to timm's seresnet50 on the same card.
      # Convolutions through cuDNN (exact f32 when found, then TF32), senet's own kernels, and
      # im2col + cuBLAS.
      phase net ${NET_LIMIT:-240} "$bin/senet" net-bench --device cuda --model seresnet50 \
        --batch ${NET_BATCH:-1,32,128} --iters 3 --warmup 1 --profile 2 --csv "$out/net-bench.csv" || status=1
      SENET_CONV=cudnn-tf32 phase net ${NET_LIMIT:-240} "$bin/senet" net-bench --device cuda --model seresnet50 \
        --batch ${NET_BATCH:-1,32,128} --iters 3 --warmup 1 --csv "$out/net-bench-tf32.csv" || status=1
      SENET_CONV=own phase net ${NET_LIMIT:-240} "$bin/senet" net-bench --device cuda --model seresnet50 \
        --batch ${NET_BATCH:-1,32,128} --iters 3 --warmup 1 --csv "$out/net-bench-own.csv" || status=1
      SENET_CONV=cublas phase net ${NET_LIMIT:-240} "$bin/senet" net-bench --device cuda --model seresnet50 \
        --batch ${NET_BATCH:-1,32,128} --iters 3 --warmup 1 --csv "$out/net-bench-cublas.csv" || status=1
      # Mixed precision: bf16 activations (cuDNN's bf16 convolutions where it loads), NHWC
      # (channels-last, as PyTorch's side runs bf16), then NCHW for the layout's share.
      phase net ${NET_LIMIT:-240} "$bin/senet" net-bench --device cuda --model seresnet50 --precision bf16 \
        --layout nhwc --batch ${NET_BATCH:-1,32,128} --iters 3 --warmup 1 --profile 2 --csv "$out/net-bench-bf16.csv" || status=1
      phase net ${NET_LIMIT:-240} "$bin/senet" net-bench --device cuda --model seresnet50 --precision bf16 \
        --batch ${NET_BATCH:-1,32,128} --iters 3 --warmup 1 --csv "$out/net-bench-bf16-nchw.csv" || status=1
      phase net ${NET_TORCH_LIMIT:-240} env LD_LIBRARY_PATH="$orig_ld" python3 "$here/torch_net.py" \
        --batch ${NET_BATCH:-1,32,128} --profile 2 --ours "$out/net-bench.csv,$out/net-bench-bf16.csv" --out "$out/torch-net.csv" ${NET_TORCH_ARGS:-} || status=1
      # End to end: one epoch of `senet train --device cuda` on a digits subset.
      phase net ${NET_TRAIN_LIMIT:-180} "$bin/senet" train --device cuda --epochs 1 --train-size 2048 \
        --test-size 512 --run-dir "$out/train-cuda" --quiet || status=1
      grep -E "^\||^device:|epoch|done:" "$out/net.log" | head -40 ;;
    *) echo "unknown phase $p"; status=1 ;;
  esac
done
exit $status
