#!/bin/bash
# Issue #19 part 1 on a leased GPU machine, in the foreground (one `run` call, <= BUDGET s from its start):
#   1. data: 32 procedural objects (256², 32 views) and the 6 meshes of bench_fit (4 vertex-coloured, 2 UV-textured;
#      256², 32 views), side by side on the CPU;
#   2. benchmarks/bench_fit.py (e): the packed fitter at the paper-scale keys (1,500 steps, 4 views/step, tau 36,864)
#      at batch sizes BATCHES, largest first (the 38 objects cycled to fill a batch; meshes in every batch); every
#      size after the first is skipped (recorded as skipped) when its estimate from the previous one would leave less
#      than REF_RESERVE s before BUDGET, and the first stops early at that point (its memory and speed are recorded,
#      objects/min extrapolated and marked): 128 completes at >~45 objects/min, 128 + 64 at >~65, all three at
#      >~75 (setup + data ~60-70 s); otherwise BATCHES=64,32 REF_PROC=0
#      REF_MESH=0 measures the rest in a second call;
#      then (r): the plain gsplat reference (simple_trainer's loop: DefaultStrategy, 1 view/step, REF_STEPS steps)
#      on the first REF_PROC procedural objects + REF_MESH meshes, one process per object side by side (2 + 2 by
#      default: ~7.5 ms a step alone, so ~55-70 s for four side by side; 4 + 4 needs REF_RESERVE ~120 s);
#      then the per-object PSNR difference and objects per GPU-minute.
# Writes $OUT/fit_speed.json (benchmarks/_record.py: device, versions, command, timings), $OUT/fit_speed.log,
# $OUT/data.log, $OUT/gpu.txt. Expects .whl/ (and optionally .gpu/gsplat_cuda.so) in the repo root (setup.sh).
#   bash benchmarks/device/fit_speed.sh        (BUDGET=340 BATCHES=128,64,32 REF_STEPS=7000 REF_PROC=2 REF_MESH=2)
# VARIANTS: settings arms (bench_fit --variants), each at every batch size; REF_JSON: take the reference rows from
# an earlier record of the same renders (bench_fit --reference-json; with REF_PROC=0 REF_MESH=0 REF_RESERVE=0).
. benchmarks/device/setup.sh
BUDGET=${BUDGET:-340}; BATCHES=${BATCHES:-128,64,32}; REF_STEPS=${REF_STEPS:-7000}
REF_PROC=${REF_PROC:-2}; REF_MESH=${REF_MESH:-2}; REF_RESERVE=${REF_RESERVE:-80}
TREE=${TREE:-/tmp/tree}; BIN=${BIN:-/tmp/site/bin}; CPU_ARGS=${CPU_ARGS:-}  # CPU_ARGS: a CPU dry run's extra flags
el() { echo $(( $(date +%s) - T0 )); }
echo "[$(el) s] setup done ($(tail -1 $W/gpu.txt)); prebuilt gsplat: ${GSPLAT_PREBUILT:-none (JIT build, ~100 s)}"
# `gatlas render-mesh` for the meshes: a console script over the copied tree
mkdir -p $BIN && printf '#!/bin/sh\nexec python3 -m gaussian_atlas.cli "$@"\n' > $BIN/gatlas && chmod +x $BIN/gatlas
export PATH=$BIN:$PATH
cd $TREE/benchmarks
python3 bench_bound.py --data $W/proc --objects ${N_PROC:-32} --views 32 --resolution ${RES:-256} --workers 12 --make-data --only-data \
  > $W/data_proc.log 2>&1 &
python3 -c "import sys; sys.argv=['x']; from bench_fit import render_meshes; from pathlib import Path; render_meshes(Path('$W/meshes'), ${RES:-256}, 32)" \
  > $W/data_mesh.log 2>&1 &
wait
cat $W/data_proc.log $W/data_mesh.log > $OUT/data.log
echo "[$(el) s] data: $(ls $W/proc/objects | wc -l) procedural, $(ls $W/meshes/objects | wc -l) meshes"
LEFT=$(( BUDGET - $(el) ))
echo "[$(el) s] bench_fit: batches $BATCHES (deadline for them $(( LEFT - REF_RESERVE )) s), reference $REF_PROC+$REF_MESH objects x $REF_STEPS steps; hard limit $LEFT s"
timeout $LEFT python3 bench_fit.py --data $W/proc --meshes $W/meshes --skip-quality --skip-throughput \
  --steps ${STEPS:-1500} --tau 36864 --views-per-step 4 --resolution ${RES:-256} --batches $BATCHES --throughput-objects 32 \
  --deadline $(( LEFT - REF_RESERVE )) --reference --reference-steps $REF_STEPS --reference-objects $REF_PROC \
  --reference-meshes $REF_MESH --reference-procs $(( REF_PROC + REF_MESH > 0 ? REF_PROC + REF_MESH : 1 )) --json $OUT/fit_speed.json $CPU_ARGS \
  ${VARIANTS:+--variants "$VARIANTS"} ${REF_JSON:+--reference-json "$REF_JSON"} \
  2>&1 | grep --line-buffered -v '^{' | tee $OUT/fit_speed.log
rc=${PIPESTATUS[0]}
echo "[$(el) s] bench_fit rc $rc (124: stopped at the hard limit; the JSON holds what finished)"
cp $W/gpu.txt $OUT/
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
