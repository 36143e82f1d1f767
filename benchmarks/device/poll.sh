#!/bin/bash
# poll.sh UNTIL: wait until the run is done or UNTIL seconds after T0, then pack the results into $OUT.
T0=$(cat /tmp/T0); W=/tmp/w
while [ ! -f $W/run_rc ] && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 5; done
echo "t=$(( $(date +%s) - T0 )) s; built at $(cat $W/built 2>/dev/null) s; gpu free at $(cat $W/gpu_free 2>/dev/null) s; bench_fit rc $(cat $W/bench_fit_rc 2>/dev/null); run rc $(cat $W/run_rc 2>/dev/null)"
cd $W && tar czf $OUT/results.tgz gpu.txt build.log bench_fit.* run.log run/summary.json run/history.jsonl run/previews run/samples run/evaluate 2>/dev/null
cp run/fits/metrics.parquet $OUT/fit_metrics.parquet 2>/dev/null
ls -la $OUT
grep -v "^{" bench_fit.log 2>/dev/null | tr '\r' '\n' | tail -12
tr '\r' '\n' < run.log 2>/dev/null | grep -v '%|' | tail -20; tr '\r' '\n' < run.log 2>/dev/null | grep '%|' | tail -2
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
