#!/bin/bash
# Issue #19 part 3, end-to-end data throughput (benchmarks/bench_data_e2e.py) on a leased GPU machine: one setsid
# daemon under /tmp (procedural objects -> fit -> prune_check -> atlas -> normalize, overlapped); later calls only
# poll (benchmarks/device/e2e_poll.sh UNTIL), so they need nothing from the repo copy.
# Expects .whl/ and optionally .gpu/gsplat_cuda.so in the repo root (benchmarks/device/setup.sh; without the saved
# build, gsplat's ~100 s JIT build runs inside the run's start-up, beside the first renders, and is recorded apart).
#   GATLAS_COMMIT=<sha of this tree> MAX_MIN=18 bash benchmarks/device/e2e_session.sh && bash benchmarks/device/e2e_poll.sh 540
# ARGS adds or overrides flags (default: the paper-scale keys, 1,000 objects, batches of 128 (the fit sweep's fastest measured size), 256², 32 views, side 128);
# MAX_MIN: no new fit batch after this many minutes (the lease ends; the record says complete: false, and how far).
. benchmarks/device/setup.sh
export GATLAS_COMMIT=${GATLAS_COMMIT:-}
A="--objects 1000 --batch 128 --workers 12 ${ARGS:-}"
setsid bash -c "python3 /tmp/tree/benchmarks/bench_data_e2e.py --out $W/e2e --json $W/e2e.json --max-minutes ${MAX_MIN:-18} $A \
  > $W/e2e.log 2>&1; echo \$? > $W/e2e_rc; echo \$(( \$(date +%s) - $T0 )) > $W/e2e_t" < /dev/null > /dev/null 2>&1 &
echo "T0=$T0 W=$W commit=${GATLAS_COMMIT:-?} args: $A --max-minutes ${MAX_MIN:-18}"
cat $W/gpu.txt
