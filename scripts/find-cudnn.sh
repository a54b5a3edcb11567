#!/usr/bin/env bash
# Prints the folder holding libcudnn.so.* (or, with an argument, that library: libcublas) from a
# Python package (PyTorch's wheels bring them: site-packages/nvidia/<name>/lib), or nothing. Add
# the folder to LD_LIBRARY_PATH so senet's run-time loading finds the library.
python3 -c '
import glob, os, site, sys
name = sys.argv[1] if len(sys.argv) > 1 else "libcudnn"
dirs = site.getsitepackages() + [site.getusersitepackages()]
for d in dirs:
    for f in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", name + ".so.*"))):
        print(os.path.dirname(f))
        raise SystemExit
' "$@" 2>/dev/null || true
