#!/bin/bash
# speed_poll.sh UNTIL: wait until speed_session.sh's daemon is done or UNTIL s after its start; results to $OUT.
T0=$(cat /tmp/T0s); W=/tmp/w
while [ ! -f $W/done ] && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 3; done
echo "t=$(( $(date +%s) - T0 )) s"; cat $W/phases.txt
cp $W/*.json $W/gpu.txt $OUT/ 2>/dev/null; cp $W/fit/fit_speed.json $OUT/ 2>/dev/null   # <= 8 files come back
(cd $W && tar czf $OUT/logs.tgz *.log phases.txt fit/*.log 2>/dev/null)
# no saved gsplat build carried: bring back the one this machine built (.gpu/gsplat_cuda.so for the next lease)
[ ! -f .gpu/gsplat_cuda.so ] && so=$(ls ~/.cache/torch_extensions/*/gsplat_cuda/gsplat_cuda.so 2>/dev/null | head -1) \
  && [ -n "$so" ] && cp "$so" $OUT/
for f in $W/train.log $W/fit.log $W/atlas.log $W/sample.log $W/fitprof.log $W/fitprof32.log $W/ssim.log $W/fitsteps*.log; do
  [ -f $f ] && { echo "== $f"; tr '\r' '\n' < $f | grep -v '%|\|arn(\|_warn_once\|originates\|^ *File\|is_torch_version\|^$' | tail -25; }
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
