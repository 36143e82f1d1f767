#!/bin/bash
# model_speed_poll.sh UNTIL: wait until the #18 session is done or UNTIL seconds after its start; copy results to $OUT.
T0=$(cat /tmp/T0); W=/tmp/w
while [ ! -f $W/done ] && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 3; done
echo "t=$(( $(date +%s) - T0 )) s; sample rc $(cat $W/sample.rc 2>/dev/null), train rc $(cat $W/train.rc 2>/dev/null)"
cp $W/*.json $W/*.log $W/gpu.txt $OUT/ 2>/dev/null
for f in $W/sample.log $W/train.log; do echo "== $f"; tr '\r' '\n' < $f 2>/dev/null | grep -v '%|\|Warning\|warn(' | tail -40; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
