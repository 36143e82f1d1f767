# Sourced by the *_session.sh scripts on a leased GPU machine (repo root): T0 and W=/tmp/w, the wheels of .whl/
# into /tmp/site, a copy of the tree in /tmp/tree (later calls may change the repo copy; the daemons keep theirs),
# the environment, a saved gsplat build (.gpu/gsplat_cuda.so: skips the ~90 s JIT build), and W/gpu.txt
# (device, driver, versions). The device copy's git metadata can be stale: record the commit from this side.
T0=$(date +%s); echo $T0 > /tmp/T0
W=/tmp/w; mkdir -p $W
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
elif [ ! -d /tmp/site ]; then echo "setup.sh: no .whl/ here and no /tmp/site from an earlier call" >&2; exit 1; fi
rm -rf /tmp/tree && mkdir -p /tmp/tree && cp -r src benchmarks stages params.yaml /tmp/tree/
export PYTHONPATH=/tmp/site:/tmp/tree/src PYTHONUNBUFFERED=1
[ -f .gpu/gsplat_cuda.so ] && cp .gpu/gsplat_cuda.so /tmp/gsplat_cuda.so && export GSPLAT_PREBUILT=/tmp/gsplat_cuda.so
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $W/gpu.txt 2>&1
python3 -c 'import torch, diffusers, gsplat; print(torch.__version__, torch.version.cuda, diffusers.__version__, gsplat.__version__)' >> $W/gpu.txt 2>&1
