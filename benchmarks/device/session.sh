#!/bin/bash
# The device session of 2026-12-02 (docs/benchmarks.md): the #8 fitter comparison (bench_fit, when
# BENCH=1) then #5's real GPU run, as setsid daemons working under /tmp, so that later calls that only
# poll (benchmarks/device/poll.sh UNTIL) need nothing from the repo copy.
# Expects, in the repo root on the GPU machine: .whl/ (the wheels named in docs/operations.md),
# .gpu/tree (git archive HEAD src benchmarks), .gpu/fit8/{proc256,meshes256} (bench_fit's renders).
#   TRAIN_END=850 BENCH=1 bash benchmarks/device/session.sh && bash benchmarks/device/poll.sh 555
T0=$(date +%s); echo $T0 > /tmp/T0
W=/tmp/w; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
cp -r .gpu/tree /tmp/tree && cp -r .gpu/fit8 /tmp/fit8
export PYTHONPATH=/tmp/site:/tmp/tree/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $W/gpu.txt 2>&1
python3 -c 'import torch;print(torch.__version__, torch.version.cuda)' >> $W/gpu.txt
TRAIN_UNTIL=$((T0 + ${TRAIN_END:-1420}))
# gsplat build, then the fitter comparison; the GPU is handed to the run whatever bench_fit's status
setsid bash -c "MAX_JOBS=10 python3 -c 'from gsplat.cuda._backend import _C; print(_C)' > $W/build.log 2>&1; echo \$(( \$(date +%s) - $T0 )) > $W/built; [ -n \"$BENCH\" ] && timeout 420 python3 /tmp/tree/benchmarks/bench_fit.py --data /tmp/fit8/proc256 --meshes /tmp/fit8/meshes256 --methods plain,anchors --budget 15 --tau 36864 --compare-objects 3 --skip-quality --skip-throughput --json $W/bench_fit.json > $W/bench_fit.log 2>&1; echo \$? > $W/bench_fit_rc; echo \$(( \$(date +%s) - $T0 )) > $W/gpu_free" < /dev/null > /dev/null 2>&1 &
sleep 2
setsid bash -c "python3 /tmp/tree/benchmarks/gpu_run.py --out $W/run --objects 512 --workers 8 --fit-steps 300 --fit-batch 64 --train-minutes 20 --train-until $TRAIN_UNTIL --wait-for $W/gpu_free > $W/run.log 2>&1; echo \$? > $W/run_rc" < /dev/null > /dev/null 2>&1 &
echo "T0=$T0 train until $TRAIN_UNTIL"
