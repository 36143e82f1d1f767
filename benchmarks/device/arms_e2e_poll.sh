#!/bin/bash
# arms_e2e_poll.sh UNTIL: wait until arms_e2e_session.sh's daemon is done or UNTIL s after its start; results to $OUT
# (the records are rewritten as the run goes, so an early poll brings back what has finished).
T0=$(cat /tmp/T0a); W=/tmp/w
while [ ! -f $W/done ] && [ $(( $(date +%s) - T0 )) -lt $1 ]; do sleep 3; done
echo "t=$(( $(date +%s) - T0 )) s"; cat $W/phases.txt
cp $W/fit_arms_h200.json $W/e2e_h200.json $W/ssim_h200.json $W/gpu.txt $W/arm.txt $OUT/ 2>/dev/null
# no saved gsplat build carried: bring back the one this machine built (.gpu/gsplat_cuda.so for the next lease)
[ ! -f .gpu/gsplat_cuda.so ] && so=$(ls ~/.cache/torch_extensions/*/gsplat_cuda/gsplat_cuda.so 2>/dev/null | head -1) \
  && [ -n "$so" ] && cp "$so" $OUT/
(cd $W && tar czf $OUT/logs.tgz ssim.log arms.log pick.log e2e.log phases.txt fit/*.log 2>/dev/null)
for f in $W/ssim.log $W/arms.log $W/pick.log $W/e2e.log; do
  [ -f $f ] && { echo "== $f"; tr '\r' '\n' < $f | grep -v '%|\|arn(\|_warn_once\|originates\|^ *File\|^{\|^$' | tail -20; }
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
