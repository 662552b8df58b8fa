#!/bin/bash
# H200 call of 2026-11-30 (issue 3): is the retrieval loss at target 16 on passkey@4096
# (7 of 120 prompts lost in rd_h200_s4/s5) the GPU codec's float16 projections? The same
# 120 prompts through kvtc 16 twice, one artifact (calibrated once, 24 windows): the
# batched Triton codec (--codec-kernels auto) and the float32 torch reference codec on the
# same GPU (--codec-kernels off). Set-up as rd_h200_s3.sh (.dev-a by a first call, .dev-b
# by this one).
source benchmarks/rd_h200_setup.sh
rm -rf /tmp/rd/k*
timeout 200 python3 -c "import sys; from kvtc_store.cli import main; sys.exit(main(['calibrate', '--ratio', '16']))" > /tmp/rd/calibrate.log 2>&1
echo "calibrated rc=$? $(( $(date +%s) - T0 )) s"; tail -3 /tmp/rd/calibrate.log
LEFT=$(( 570 - ($(date +%s) - T0) ))
R="timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda --windows 2 --greedy-tokens 0 --retrieval-tasks passkey --retrieval-lengths 4096 --retrieval-samples 60 --retrieval-min-accuracy 0 --threads 3 --batch 4 --methods kvtc --ratios 16"
for k in auto off; do
  for f in 0 60; do
    $R --codec-kernels $k --retrieval-first $f --out /tmp/rd/k$k$f > /tmp/rd/k$k$f.log 2>&1 &
  done
done
wait
echo "done $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/k*.log; do echo "== $f"; grep -E "retrieval|Error|error|Killed" $f | tail -6; done
tar czf $OUT/rd6.tgz -C /tmp rd
