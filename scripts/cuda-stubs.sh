#!/usr/bin/env bash
# Generates stub CUDA libraries for linking and loading on a machine without a CUDA driver: every
# function cudarc binds returns a "not available / stub" error (CUDA_ERROR_STUB_LIBRARY for the
# driver), as NVIDIA's own stubs do, so a program built with cudarc's dynamic linking links, loads
# and reports "no GPU" instead of failing to start. Each library gets its CUDA 13 soname.
#   scripts/cuda-stubs.sh OUT CUDARC_SRC LIB[:SOVERSION] ...   (LIB: cuda nvrtc cublas cublasLt curand cudnn)
# writes OUT/lib64/libLIB.so.SOVERSION and libLIB.so. Used by check-downstream.sh and
# check-candle-cuda.sh.
set -euo pipefail
out=$1 cudarc_src=$2
shift 2
mkdir -p "$out/lib64"
for pair in "$@"; do
  lib=${pair%:*} ver=${pair#*:}
  python3 - "$cudarc_src" "$out" "$lib" <<'PY'
import re, sys, pathlib
src, out, lib = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
# library -> (cudarc's bindings module, the error every stub returns)
table = {"cuda": ("driver", 34), "nvrtc": ("nvrtc", 7), "cublas": ("cublas", 1),
         "cublasLt": ("cublaslt", 1), "curand": ("curand", 1000), "cudnn": ("cudnn", 1)}
module, err = table[lib]
text = (src / "src" / module / "sys" / "mod.rs").read_text()
names = sorted(set(re.findall(r'extern "C" \{\s*(?:pub )?fn (\w+)\(', text)))
(out / f"{lib}_stub.c").write_text("".join(f"int {n}(void) {{ return {err}; }}\n" for n in names))
print(f"lib{lib}: {len(names)} stub functions")
PY
  so=lib$lib.so.$ver
  gcc -shared -fPIC -Wl,-soname,"$so" -o "$out/lib64/$so" "$out/${lib}_stub.c"
  ln -sf "$so" "$out/lib64/lib$lib.so"
done
