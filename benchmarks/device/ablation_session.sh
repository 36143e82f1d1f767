#!/bin/bash
# The two ablations of issue #14 (docs/paper_claims.md) on a leased GPU machine, as setsid daemons under /tmp;
# later calls only poll (benchmarks/device/ablation_poll.sh UNTIL).
#  1. bounding rules (benchmarks/bench_bound.py): renders 16 procedural objects + 6 meshes at 256², then fits
#     every arm in 3 processes side by side (launch-bound fits share the GPU well), merged into W/bound.json;
#  2. atlas layouts (benchmarks/transfer_run.py): the 3D set -> fits -> ot/random/morton atlases beside (1), the
#     2D prior once the fits of both are done, then every arm x layout at once (one process each).
# Expects .whl/ and optionally .gpu/gsplat_cuda.so in the repo root (benchmarks/device/setup.sh).
#   ARGS="--objects 128 --prior-steps 500 --steps 300" ARMS="repurposed scratch" bash benchmarks/device/ablation_session.sh
. benchmarks/device/setup.sh
B=$W/bound; mkdir -p $B
export PATH=/tmp/site/bin:$PATH
# `gatlas render-mesh` for the meshes: a console script over the copied tree
mkdir -p /tmp/site/bin && printf '#!/bin/sh\nexec python3 -m gaussian_atlas.cli "$@"\n' > /tmp/site/bin/gatlas && chmod +x /tmp/site/bin/gatlas
BB="python3 /tmp/tree/benchmarks/bench_bound.py --data $B/proc --meshes $B/meshes --objects ${BOUND_OBJECTS:-16} ${BOUND_ARGS:-}"
G1="plain/unbounded@1000000000,plain/visibility@4096,plain/visibility@8192"
G2="plain/opacity@4096,plain/opacity@8192,plain/random@4096"
G3="plain/random@8192,anchors/rank-average@4096,anchors/rank-average@8192"
setsid bash -c "$BB --make-data --only-data > $B/data.log 2>&1 || exit 1; echo \$(( \$(date +%s) - $T0 )) > $B/data_t
  ( $BB --arms $G1 --json $B/g1.json > $B/g1.log 2>&1 ) & ( $BB --arms $G2 --json $B/g2.json > $B/g2.log 2>&1 ) &
  ( $BB --arms $G3 --json $B/g3.json > $B/g3.log 2>&1 ) & wait
  python3 /tmp/tree/benchmarks/bench_bound.py --merge $B/g1.json $B/g2.json $B/g3.json --json $W/bound.json --table $W/bound.md > $B/merge.log 2>&1
  echo \$(( \$(date +%s) - $T0 )) > $W/bound_done" < /dev/null > /dev/null 2>&1 &
R="python3 /tmp/tree/benchmarks/transfer_run.py"
A="${ARGS:-} --layouts ot random morton"
setsid bash -c "$R data --out $W $A > $W/data.log 2>&1; echo \$? > $W/data_rc; echo \$(( \$(date +%s) - $T0 )) > $W/data_t" < /dev/null > /dev/null 2>&1 &
# the GPU is the prior's once the bound fits are done, or after BOUND_WAIT s (then they share it)
setsid bash -c "while [ ! -f $W/bound_done ] && [ \$(( \$(date +%s) - $T0 )) -lt ${BOUND_WAIT:-420} ]; do sleep 2; done; touch $W/gpu_free" < /dev/null > /dev/null 2>&1 &
setsid bash -c "$R prior --out $W $A --wait-for $W/fits/metrics.parquet $W/gpu_free > $W/prior.log 2>&1; echo \$? > $W/prior_rc; echo \$(( \$(date +%s) - $T0 )) > $W/prior_t" < /dev/null > /dev/null 2>&1 &
setsid bash -c "while [ ! -f $W/data_rc ] || [ ! -f $W/prior_rc ]; do sleep 2; done; echo \$(( \$(date +%s) - $T0 )) > $W/arms_start;
  for l in ot random morton; do for a in ${ARMS:-repurposed scratch}; do
    ( $R arm --out $W --arm \$a --layout \$l --seed 0 $A > $W/arm-\$a-\$l.log 2>&1; echo \$? > $W/arm-\$a-\$l.rc ) &
  done; done; wait; echo \$(( \$(date +%s) - $T0 )) > $W/arms_done" < /dev/null > /dev/null 2>&1 &
echo "T0=$T0 W=$W args: $A arms: ${ARMS:-repurposed scratch}"
