#!/bin/bash
# After ablation_session.sh: rerun what did not finish (an arm that ran out of GPU memory beside the others, a
# bound group that failed) as daemons, and pack what exists in pieces of < 12 MB into $OUT.
#   RERUN_ARMS="scratch:random" RERUN_BOUND="plain/random@8192 anchors/rank-average@4096,anchors/rank-average@8192" \
#     bash benchmarks/device/ablation_rerun.sh
W=/tmp/w; B=$W/bound; T0=$(cat /tmp/T0)
export PYTHONPATH=/tmp/site:/tmp/tree/src PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
[ -f /tmp/gsplat_cuda.so ] && export GSPLAT_PREBUILT=/tmp/gsplat_cuda.so
A="$(python3 -c "import json; a=json.load(open('$W/data.json'))['args']; print('--objects', a['objects'])") --prior-steps 500 --steps 300 --max-minutes 7 --layouts ot random morton"
tail -n 4 $B/g3.log $B/merge.log 2>/dev/null | cut -c1-300
k=0
for spec in ${RERUN_ARMS:-}; do a=${spec%%:*}; l=${spec##*:}; rm -f $W/arm-$a-$l.rc
  setsid bash -c "python3 /tmp/tree/benchmarks/transfer_run.py arm --out $W --arm $a --layout $l --seed 0 $A > $W/arm-$a-$l.re.log 2>&1; echo \$? > $W/arm-$a-$l.rc" < /dev/null > /dev/null 2>&1 &
done
for g in ${RERUN_BOUND:-}; do k=$((k+1))
  setsid bash -c "python3 /tmp/tree/benchmarks/bench_bound.py --data $B/proc --meshes $B/meshes --objects 16 --arms $g --json $B/r$k.json > $B/r$k.log 2>&1; echo \$? > $B/r$k.rc" < /dev/null > /dev/null 2>&1 &
done
cd $W && tar czf $OUT/a.tgz gpu.txt *.log *.json *.md prior_history.jsonl prior_samples.png fits/metrics.parquet \
  atlas/index.parquet atlas-*/index.parquet procedural/holdout.json bound/*.log bound/*.json arms/*/result.json \
  arms/*/history.jsonl arms/*/scores_step*.csv arms/*/sheet_step*.png 2>/dev/null
for arm in arms/*/; do n=$(basename $arm); tar czf $OUT/v-$n.tgz $arm/views_step*.npz 2>/dev/null; done
ls -la $OUT
