#!/bin/bash
# transfer_poll.sh UNTIL: wait until the transfer run is done or UNTIL seconds after T0, then pack what exists into $OUT.
T0=$(cat /tmp/T0); W=/tmp/w
while [ ! -f $W/arms_done ] && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 5; done
echo "t=$(( $(date +%s) - T0 )) s; built $(cat $W/built 2>/dev/null); data rc $(cat $W/data_rc 2>/dev/null) at $(cat $W/data_t 2>/dev/null); prior rc $(cat $W/prior_rc 2>/dev/null) at $(cat $W/prior_t 2>/dev/null); demo rc $(cat $W/demo_rc 2>/dev/null) at $(cat $W/demo_t 2>/dev/null); arms start $(cat $W/arms_start 2>/dev/null) done $(cat $W/arms_done 2>/dev/null); arm rcs: $(cat $W/arm-*.rc 2>/dev/null | tr '\n' ' ')"
cd $W && tar czf $OUT/results.tgz gpu.txt *.log *.json prior_history.jsonl prior_samples.png fits/metrics.parquet atlas/index.parquet \
  procedural/holdout.json arms/*/result.json arms/*/history.jsonl arms/*/scores_step*.csv arms/*/views_step*.npz arms/*/sheet_step*.png demo/run.json demo/history.jsonl 2>/dev/null
[ -f $W/demo/train/model/atlas.json ] && tar czf $OUT/demo_model.tgz -C $W/demo/train model
so=$(ls ~/.cache/torch_extensions/*/gsplat_cuda/gsplat_cuda.so 2>/dev/null | head -1); [ -n "$so" ] && cp "$so" $OUT/
ls -la $OUT
for f in grid data prior demo; do echo "== $f"; tr '\r' '\n' < $W/$f.log 2>/dev/null | grep -v '%|' | tail -6; done
for f in $W/arm-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v '%|' | tail -5; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
