#!/bin/bash
# H200 call of 2026-11-30 (issue 3): the whole kvtc curve with the calibration corpus
# shakespeare+numpy (the CPU lead: target 16 14.84x at KL 0.0037 against 13.01x at 0.0075
# on 8 windows), 32 held-out windows, retrieval at the qualifying 2k/4k on prompts 0-39.
# The artifacts (and the capped ones for rd_h200_s9.sh) are calibrated once first, so the
# five harness processes only load them. Set-up as rd_h200_s3.sh (.dev-a by a first call,
# .dev-b by this one).
source benchmarks/rd_h200_setup.sh
rm -rf /tmp/rd/m*
CLI="import sys; from kvtc_store.cli import main; sys.exit(main(sys.argv[1:]))"
MIX="--corpus shakespeare+numpy"
timeout 260 python3 -c "$CLI" calibrate $MIX --ratio 4 8 12 16 20 24 26 28 32 48 > /tmp/rd/mcal.log 2>&1
echo "calibrated rc=$? $(( $(date +%s) - T0 )) s"; grep "^ratio" /tmp/rd/mcal.log
timeout 60 python3 -c "$CLI" calibrate $MIX --max-artifact-share 0.15 --ratio 16 20 >> /tmp/rd/mcal.log 2>&1
echo "capped rc=$? $(( $(date +%s) - T0 )) s"; grep "^ratio" /tmp/rd/mcal.log | tail -2
LEFT=$(( 580 - ($(date +%s) - T0) ))
R="timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda $MIX --windows 32 --greedy-tokens 64 --retrieval-tasks passkey multikey --retrieval-lengths 2048 4096 --retrieval-samples 40 --threads 3 --batch 4 --methods kvtc"
$R --ratios 4 8 --out /tmp/rd/m1 > /tmp/rd/m1.log 2>&1 &
$R --ratios 12 16 --out /tmp/rd/m2 > /tmp/rd/m2.log 2>&1 &
$R --ratios 20 24 --out /tmp/rd/m3 > /tmp/rd/m3.log 2>&1 &
$R --ratios 26 28 --out /tmp/rd/m4 > /tmp/rd/m4.log 2>&1 &
$R --ratios 32 48 --out /tmp/rd/m5 > /tmp/rd/m5.log 2>&1 &
wait
echo "done $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/m*.log; do echo "== $f"; grep -E "ratio [0-9]|Error|error|Killed|retrieval within" $f | tail -4; done
(cd /tmp && tar czf $OUT/rd8.tgz rd/m*)
