#!/usr/bin/env bash
# Prints the folder holding libcudnn.so.* from a Python package (PyTorch's wheels bring it as
# nvidia-cudnn-cu12/cu13: site-packages/nvidia/<name>/lib), or nothing. Add the folder to
# LD_LIBRARY_PATH so senet's run-time loading of cuDNN finds it.
python3 -c '
import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
for d in dirs:
    for f in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libcudnn.so.*"))):
        print(os.path.dirname(f))
        raise SystemExit
' 2>/dev/null || true
