#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler (nvcc, ptxas, headers) from NVIDIA's PyPI wheels into a local
# folder, without root and without a GPU. Idempotent: a second run with the toolchain in place
# does nothing but print the nvcc path. Users with a system CUDA toolkit need none of this.
#
#   scripts/install-cuda-toolchain.sh            # installs into $SENET_CUDA_PREFIX
#   export NVCC=$(scripts/install-cuda-toolchain.sh | tail -n 1)
#
# SENET_CUDA_PREFIX defaults to ~/.cache/senet/cuda-13.0. The last line printed is the path of nvcc.
set -euo pipefail

prefix="${SENET_CUDA_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/senet/cuda-13.0}"
python="${PYTHON:-python3}"

# One 13.0 release, every wheel pinned: an unpinned nvvm pulls a newer release whose PTX the
# 13.0 ptxas rejects.
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
)
stamp="$prefix/.senet-installed"
want="$(printf '%s\n' "${pins[@]}")"
nvcc="$prefix/nvidia/cu13/bin/nvcc"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$nvcc" ]]; then
  echo "CUDA toolchain already installed in $prefix" >&2
  echo "$nvcc"
  exit 0
fi

echo "installing the CUDA 13.0 compiler wheels into $prefix" >&2
mkdir -p "$prefix"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
  --target "$prefix" "${pins[@]}" >&2

if [[ ! -x "$nvcc" ]]; then
  echo "error: nvcc not found at $nvcc after installing the wheels" >&2
  exit 1
fi

# The wheels ship the CUDA headers and libraries in sibling folders of bin/; nvcc finds them
# through nvcc.profile relative to its own location, but `lib64` is expected next to `lib`.
root="$prefix/nvidia/cu13"
if [[ -d "$root/lib" && ! -e "$root/lib64" ]]; then
  ln -s lib "$root/lib64"
fi

"$nvcc" --version >&2
printf '%s\n' "$want" >"$stamp"
echo "$nvcc"
