#!/bin/bash
# Issues #18 + #19 on one H200 in one lease: the phases run one after another in one setsid daemon (nothing else on
# the machine while a phase is timed); collect with speed_poll.sh UNTIL. Usage (repo root on the device machine):
#   GATLAS_COMMIT=<sha> PHASES="train fit atlas sample" bash benchmarks/device/speed_session.sh
# carry: .whl (wheels), .gpu (gsplat_cuda.so), .pot (POT for ot.emd, slimmed by device/slim_pot.sh to fit the carry).
# Phases (outputs under /tmp/w, copied to $OUT by the poll):
#   train  bench_train plain@16 vs regional@16 (+ profile)                        ~4.5 min
#   fit    device/fit_speed.sh (packed batches 128/64/32 vs the plain gsplat reference), saves 3 fitted PLYs   ~5 min
#   atlas  bench_atlas torch vs triton steps, synthetic + the fitted PLYs, ot.emd in child processes            ~3.5 min
#   sample bench_sample bf16 vs bf16 + CUDA graph without compile at batch 1, SDPA backends at the top level    ~1 min
#   fitprof profile_fit at batch 128, steps 200-300 of a 1,500-step schedule (densifying): where a step goes   ~3 min
#   fitsteps  the packed fitter alone at batch 128 with FIT_STEPS_LIST steps (2000 2500), no reference
#   ssim   bench_ssim: the fit's SSIM forward+backward, Triton blur vs conv2d, 512 images of 256²             ~0.5 min
#   fitprof32  the same at batch 32 (how a step's cost scales with the batch)                                ~1 min
# env: FIT_BUDGET (fit phase, s, 300), FIT_BATCHES (128,64,32), REF_PROC/REF_MESH/REF_RESERVE (fit_speed.sh),
#      FITPROF_STEPS (300: profiles steps 200..FITPROF_STEPS)
ROOT=$(pwd)
source benchmarks/device/setup.sh
[ -d .pot/ot ] && cp -r .pot/ot .pot/pot.libs /tmp/site/ 2>/dev/null
date +%s > /tmp/T0s
export GATLAS_COMMIT ROOT
setsid nohup bash -c '
  W=/tmp/w
  if [ -z "$GSPLAT_PREBUILT" ]; then  # no saved build carried: build gsplat once, before any phase is timed
    python3 -c "from gsplat.cuda._backend import _C; print(_C)" > $W/gsplat_build.log 2>&1
    echo "gsplat build done $(( $(date +%s) - $(cat /tmp/T0s) ))" >> $W/phases.txt
  fi
  for p in '"${PHASES:-train fit atlas sample}"'; do
    echo "$p start $(( $(date +%s) - $(cat /tmp/T0s) ))" >> $W/phases.txt
    case $p in
      train) cd /tmp/tree && python3 benchmarks/bench_train.py --variants plain@16,regional@16 --profile regional@16 \
               --json $W/train_h200_run2.json > $W/train.log 2>&1 ;;
      fit) cd $ROOT && mkdir -p $W/fit && OUT=$W/fit BUDGET=${FIT_BUDGET:-300} BATCHES=${FIT_BATCHES:-128,64,32} \
               CPU_ARGS="--save-plys $W/plys --save-plys-max 3" bash benchmarks/device/fit_speed.sh > $W/fit.log 2>&1 ;;
      atlas) PLY=""; [ -d $W/plys ] && PLY="--ply-dir $W/plys --ply-max 3"
             cd /tmp/tree && timeout 210 python3 benchmarks/bench_atlas.py --n 16384 --batch 4 --device cuda \
               --kernels torch,triton --no-scipy $PLY --exact-timeout 180 \
               --json $W/atlas_h200.json > $W/atlas.log 2>&1 ;;
      fitprof) cd /tmp/tree && timeout 300 python3 benchmarks/profile_fit.py --data $W/pf --objects 32 --batch 128 \
               --steps ${FITPROF_STEPS:-300} --profile-from 200 --paths per-object --workers 12 --json $W/profile_fit128_h200.json \
               > $W/fitprof.log 2>&1 ;;
      fitprof32) cd /tmp/tree && timeout 200 python3 benchmarks/profile_fit.py --data $W/pf --objects 32 --batch 32 \
               --steps 300 --profile-from 200 --paths per-object --workers 12 --json $W/profile_fit32_h200.json \
               > $W/fitprof32.log 2>&1 ;;
      fitsteps) for s in ${FIT_STEPS_LIST:-2000 2500}; do cd $ROOT && mkdir -p $W/fit$s && OUT=$W/fit$s STEPS=$s BATCHES=128 \
               BUDGET=$(( 90 + 75 * s / 1000 )) REF_PROC=0 REF_MESH=0 REF_RESERVE=0 bash benchmarks/device/fit_speed.sh \
               > $W/fitsteps$s.log 2>&1; cp $W/fit$s/fit_speed.json $W/fit_speed_steps$s.json; done ;;
      ssim) cd /tmp/tree && timeout 120 python3 benchmarks/bench_ssim.py --images 512 --side 256 \
               --json $W/ssim_h200.json > $W/ssim.log 2>&1 ;;
      sample) cd /tmp/tree && python3 benchmarks/bench_sample.py --variants bf16,graph --batches 1 --repeats 3 \
               --attention --json $W/sample_graph_h200.json > $W/sample.log 2>&1 ;;
    esac
    echo "$p rc $? at $(( $(date +%s) - $(cat /tmp/T0s) ))" >> $W/phases.txt
  done
  touch $W/done' > /dev/null 2>&1 < /dev/null &
sleep 1; echo "started $(date +%T), commit $GATLAS_COMMIT, phases ${PHASES:-train fit atlas sample}"; cat /tmp/w/gpu.txt
