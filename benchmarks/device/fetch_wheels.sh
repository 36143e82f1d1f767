#!/bin/bash
# Build .whl/ (git-ignored; carry it to the device machine): the Python 3.12 manylinux wheels the bare GPU image lacks
# (docs/operations.md, "A GPU machine without the MLOps stack"), ~29 MB. Run in the repo root:
#   bash benchmarks/device/fetch_wheels.sh && du -sh .whl
# The saved gsplat build (.gpu/gsplat_cuda.so, ~16 MB) cannot be made here (no CUDA toolchain): a lease without it
# builds gsplat once (~70-100 s; the session scripts do it before timing anything) and the poll brings it back.
set -e
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version ${PYVER:-3.12} --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl $(python3 -c "
import re, tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']  # the project's own version specs
want = ('diffusers', 'gsplat', 'plyfile', 'trimesh', 'embreex', 'threadpoolctl')
print(' '.join(d.replace(' ', '') for d in deps if re.split(r'[<>=!~\[ ]', d)[0] in want))
") rtree importlib_metadata zipp jaxtyping wadler_lindig 2>&1 \
  | grep -v "WARNING: Location" || true
ls .whl
