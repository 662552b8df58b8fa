#!/bin/bash
# H200 call of 2026-11-30 (issue 3): retrieval at honest ratio >= 16 (target 20: 16.28x in
# rd_h200_s4.sh) on prompts 40-119 of each qualifying task and length (s4 ran 0-39), so
# kvtc 20 rests on 480 prompts like kvtc 16; and kvtc-cap15 (artifact <= 15% of the model's
# parameters) at targets 16 and 20 with the 24-window default calibration on the 32
# held-out windows. Set-up as rd_h200_s3.sh (.dev-a by a first call, .dev-b by this one).
source benchmarks/rd_h200_setup.sh
rm -rf /tmp/rd/v*
timeout 200 python3 -c "import sys; from kvtc_store.cli import main; sys.exit(main(['calibrate', '--ratio', '20']))" > /tmp/rd/calibrate20.log 2>&1
echo "calibrated rc=$? $(( $(date +%s) - T0 )) s"; tail -1 /tmp/rd/calibrate20.log
LEFT=$(( 575 - ($(date +%s) - T0) ))
R="timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda --windows 2 --greedy-tokens 0 --retrieval-lengths 2048 4096 --retrieval-samples 40 --retrieval-min-accuracy 0 --threads 3 --batch 4 --methods kvtc --ratios 20"
for t in passkey multikey; do
  for f in 40 80; do
    $R --retrieval-tasks $t --retrieval-first $f --out /tmp/rd/v$t$f > /tmp/rd/v$t$f.log 2>&1 &
  done
done
timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda --windows 32 --greedy-tokens 64 --retrieval-tasks --threads 3 --batch 4 --methods kvtc-cap15 --ablation-ratios 16 20 --out /tmp/rd/vcap > /tmp/rd/vcap.log 2>&1 &
wait
echo "done $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/v*.log; do echo "== $f"; grep -E "ratio [0-9]|Error|error|Killed|retrieval within" $f | tail -4; done
(cd /tmp && tar czf $OUT/rd7.tgz rd/v*)
