#!/bin/bash
# Build .pot/ (git-ignored; carry it to the device machine): POT for Python 3.12 without its two largest
# extensions (bsp_wrap: 175 MB, partial_cython: 2 MB), so that .whl + .gpu + .pot + the tree stay under the
# 64 MiB a device call carries. gaussian-atlas uses ot.emd only; the imports of the dropped parts are guarded.
# speed_session.sh copies .pot/ot and .pot/pot.libs into /tmp/site. Run in the repo root:
#   bash benchmarks/device/slim_pot.sh && PYTHONPATH=.pot python3.12 -c "import ot; print(ot.emd)"
set -e
grep -q "^/.pot/" .git/info/exclude || echo "/.pot/" >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version ${PYVER:-3.12} --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $tmp POT
rm -rf .pot && mkdir .pot && (cd .pot && unzip -q $tmp/pot-*.whl)
rm -f .pot/ot/bsp/bsp_wrap*.so .pot/ot/partial/partial_cython*.so
python3 - <<'PY'
import re
from pathlib import Path
guard = "try:  # slimmed (benchmarks/device/slim_pot.sh): extension left out\n    {line}\nexcept ImportError:\n    {fallback}"
for path, line, fallback in [
        (".pot/ot/__init__.py", "from .bsp import compute_bspot_bijection, merge_bijections", "pass"),
        (".pot/ot/solvers/_linear.py", "from ..bsp import compute_bspot_bijection", "compute_bspot_bijection = None"),
        (".pot/ot/partial/partial_solvers.py", "from .partial_cython import partial_wasserstein_1d_cy",
         "partial_wasserstein_1d_cy = None")]:
    p = Path(path)
    s = p.read_text()
    assert line in s, (path, line)
    p.write_text(s.replace(line, guard.format(line=line, fallback=fallback), 1))
PY
grep -rln "bsp_wrap\|partial_cython\|from ..bsp\|from .bsp" .pot/ot --include=*.py | grep -v "/ot/bsp/" | while read f; do
  grep -q "slimmed" $f || echo "slim_pot.sh: unguarded import left in $f" >&2; done
du -sh .pot; rm -rf $tmp
