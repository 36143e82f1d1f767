#!/bin/bash
# e2e_poll.sh UNTIL: wait until the e2e run is done or UNTIL seconds after T0, then copy its record, log and batch
# markers into $OUT (the run's own files stay on the machine: PLYs and atlases are gigabytes).
T0=$(cat /tmp/T0); W=/tmp/w
while [ ! -f $W/e2e_rc ] && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 5; done
echo "t=$(( $(date +%s) - T0 )) s; e2e rc $(cat $W/e2e_rc 2>/dev/null) at $(cat $W/e2e_t 2>/dev/null) s"
cp $W/e2e.json $W/e2e.log $W/gpu.txt $OUT/ 2>/dev/null
cd $W/e2e 2>/dev/null && tar czf $OUT/e2e_batches.tgz batches atlas/index.parquet 2>/dev/null
ls -la $OUT
tr '\r' '\n' < $W/e2e.log 2>/dev/null | grep -v '%|' | tail -8
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
