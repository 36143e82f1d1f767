#!/bin/bash
# ablation_poll.sh UNTIL: wait until both ablations are done or UNTIL seconds after T0, then pack what exists into $OUT.
T0=$(cat /tmp/T0); W=/tmp/w
while { [ ! -f $W/arms_done ] || [ ! -f $W/bound_done ]; } && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 5; done
echo "t=$(( $(date +%s) - T0 )) s; bound data at $(cat $W/bound/data_t 2>/dev/null) done $(cat $W/bound_done 2>/dev/null); data rc $(cat $W/data_rc 2>/dev/null) at $(cat $W/data_t 2>/dev/null); prior rc $(cat $W/prior_rc 2>/dev/null) at $(cat $W/prior_t 2>/dev/null); arms start $(cat $W/arms_start 2>/dev/null) done $(cat $W/arms_done 2>/dev/null); arm rcs: $(cat $W/arm-*.rc 2>/dev/null | tr '\n' ' ')"
cd $W && tar czf $OUT/results.tgz gpu.txt *.log *.json *.md prior_history.jsonl prior_samples.png fits/metrics.parquet \
  atlas/index.parquet atlas-*/index.parquet procedural/holdout.json bound/*.log bound/*.json arms/*/result.json \
  arms/*/history.jsonl arms/*/scores_step*.csv arms/*/views_step*.npz arms/*/sheet_step*.png 2>/dev/null
ls -la $OUT
for f in data prior bound/data bound/g1 bound/g2 bound/g3; do echo "== $f"; tr '\r' '\n' < $W/$f.log 2>/dev/null | grep -v '%|' | tail -4; done
for f in $W/arm-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v '%|' | tail -3; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
