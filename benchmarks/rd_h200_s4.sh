#!/bin/bash
# H200 call of 2026-11-30 (issue 3): the kvtc curve again with the new default of 24
# calibration windows (was 8), same set-up as rd_h200_s3.sh (.dev-a carried by a first
# call, .dev-b by this one). Five harness processes side by side at batch 4, each
# calibrating in-process (on the CPU) first; retrieval at the qualifying 2k/4k.
source benchmarks/rd_h200_setup.sh
rm -rf /tmp/rd/t*
R="timeout 555 python3 benchmarks/rate_distortion.py --device cuda --windows 32 --greedy-tokens 64 --retrieval-tasks passkey multikey --retrieval-lengths 2048 4096 --retrieval-samples 40 --threads 3 --batch 4 --methods kvtc"
$R --ratios 4 8 --out /tmp/rd/t1 > /tmp/rd/t1.log 2>&1 &
$R --ratios 12 16 --out /tmp/rd/t2 > /tmp/rd/t2.log 2>&1 &
$R --ratios 20 24 --out /tmp/rd/t3 > /tmp/rd/t3.log 2>&1 &
$R --ratios 26 28 --out /tmp/rd/t4 > /tmp/rd/t4.log 2>&1 &
$R --ratios 32 48 --out /tmp/rd/t5 > /tmp/rd/t5.log 2>&1 &
wait
echo "done $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/t*.log; do echo "== $f"; grep -E "ratio [0-9]|Error|error|Killed|retrieval within" $f | tail -4; done
tar czf $OUT/rd4.tgz -C /tmp rd
