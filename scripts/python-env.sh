#!/usr/bin/env bash
# Creates (once) and prints the path of a cached Python virtual environment with the packages
# pinned in python/requirements-dev.txt (torch, timm, maturin, pytest, numpy), for the
# senet_torch package (python/). The environment lives under ~/.cache/senet/py-venv-<hash of the
# requirements file>; a changed pin makes a new one. Prints the environment's folder last.
#   PYENV=$(scripts/python-env.sh | tail -n 1); "$PYENV/bin/python" -m pytest python/tests
set -euo pipefail
cd "$(dirname "$0")/.."
req=python/requirements-dev.txt
py=${PYTHON:-python3}
key=$( (cat "$req"; "$py" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-12)
dir=${SENET_PY_VENV:-$HOME/.cache/senet/py-venv-$key}
if [ ! -f "$dir/.complete" ]; then
  echo "creating $dir (torch, timm, maturin, pytest; about 4 GB with torch's CUDA runtime packages)" >&2
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip >&2
  "$dir/bin/python" -m pip install -q -r "$req" >&2
  touch "$dir/.complete"
fi
echo "$dir"
