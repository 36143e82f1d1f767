#!/bin/bash
# The 2D-prior transfer run of issue #13 (docs/paper_claims.md) on a leased GPU machine, as setsid daemons
# under /tmp, so that later calls only poll (benchmarks/device/transfer_poll.sh UNTIL).
# Expects, in the repo root on the GPU machine: .whl/ (diffusers, gsplat, plyfile, trimesh, embreex, rtree, ...;
# docs/operations.md); optional .gpu/gsplat_cuda.so (a saved gsplat build: skips the ~90 s JIT build).
#   ARGS="--steps 1200" bash benchmarks/device/transfer_session.sh && bash benchmarks/device/transfer_poll.sh 500
. benchmarks/device/setup.sh
R="python3 /tmp/tree/benchmarks/transfer_run.py"
# optional: the first atlas call's plane index on the GPU vs the CPU (benchmarks/bench_grid.py), while the GPU is idle
[ -n "${GRID:-}" ] && setsid bash -c "python3 /tmp/tree/benchmarks/bench_grid.py --side 128 --json $W/grid_h200.json > $W/grid.log 2>&1" < /dev/null > /dev/null 2>&1 &
A="${ARGS:-}"
# gsplat's JIT build (unless prebuilt) beside the 3D data phase: its fit waits on the build's lock
[ -z "$GSPLAT_PREBUILT" ] && setsid bash -c "MAX_JOBS=10 python3 -c 'from gsplat.cuda._backend import _C; print(_C)' > $W/build.log 2>&1; echo \$(( \$(date +%s) - $T0 )) > $W/built" < /dev/null > /dev/null 2>&1 &
setsid bash -c "$R data --out $W $A > $W/data.log 2>&1; echo \$? > $W/data_rc; echo \$(( \$(date +%s) - $T0 )) > $W/data_t" < /dev/null > /dev/null 2>&1 &
# the prior renders its 2D images beside the 3D data, then trains once the fits are written (the packed fit
# ran 4x slower beside it)
setsid bash -c "$R prior --out $W $A --wait-for $W/fits/metrics.parquet > $W/prior.log 2>&1; echo \$? > $W/prior_rc; echo \$(( \$(date +%s) - $T0 )) > $W/prior_t" < /dev/null > /dev/null 2>&1 &
# the demo's starting model (benchmarks/train_demo_model.py) on the 3D atlases, beside the prior's training
[ -n "${DEMO_STEPS:-}" ] && setsid bash -c "while [ ! -f $W/data_rc ]; do sleep 2; done;
  python3 /tmp/tree/benchmarks/train_demo_model.py --out $W --steps $DEMO_STEPS > $W/demo.log 2>&1; echo \$? > $W/demo_rc; echo \$(( \$(date +%s) - $T0 )) > $W/demo_t" < /dev/null > /dev/null 2>&1 &
# the arms: every arm x seed at once when the atlases and the prior exist (they share the GPU alike)
setsid bash -c "while [ ! -f $W/data_rc ] || [ ! -f $W/prior_rc ]; do sleep 2; done; echo \$(( \$(date +%s) - $T0 )) > $W/arms_start;
  for s in ${SEEDS:-0 1}; do for a in repurposed scratch; do
    ( $R arm --out $W --arm \$a --seed \$s $A > $W/arm-\$a-\$s.log 2>&1; echo \$? > $W/arm-\$a-\$s.rc ) &
  done; done; wait; echo \$(( \$(date +%s) - $T0 )) > $W/arms_done" < /dev/null > /dev/null 2>&1 &
echo "T0=$T0 W=$W args: $A"
