#!/bin/bash
# Issue #18 on one H200, nothing else on the machine: bench_sample then bench_train, one after another, as a
# daemon (collect with model_speed_poll.sh). Usage (repo root, device machine):
#   GATLAS_COMMIT=<sha> bash benchmarks/device/model_speed_session.sh
source benchmarks/device/setup.sh
export GATLAS_COMMIT
cd /tmp/tree
setsid nohup bash -c '
  W=/tmp/w
  python3 benchmarks/bench_sample.py --variants baseline,bf16,fast --baseline-batches 1 --batches 1 16 --repeats 3 \
      --profile --json $W/sample_h200.json > $W/sample.log 2>&1; echo $? > $W/sample.rc
  python3 benchmarks/bench_train.py --variants plain@8,plain@16,regional@16 --profile plain@8,regional@16 \
      --json $W/train_h200.json > $W/train.log 2>&1; echo $? > $W/train.rc
  touch $W/done' > /dev/null 2>&1 < /dev/null &
sleep 2; echo "started at $(date +%T); commit $GATLAS_COMMIT"; cat /tmp/w/gpu.txt
