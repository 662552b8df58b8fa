#!/bin/bash
# H200 call of 2026-11-30 (issue 3): retrieval at target ratio 16 (24-window default
# codec) on prompts 40-79 and 80-119 of each qualifying task and length (prompts are
# seeded by index; rd_h200_s4.sh ran 0-39), uncompressed and kvtc 16, so the retrieval
# change rests on 120 prompts per task and length. Set-up as rd_h200_s3.sh (.dev-a by a
# first call, .dev-b by this one).
source benchmarks/rd_h200_setup.sh
rm -rf /tmp/rd/u*
R="timeout 400 python3 benchmarks/rate_distortion.py --device cuda --windows 2 --greedy-tokens 0 --retrieval-tasks passkey multikey --retrieval-lengths 2048 4096 --retrieval-samples 40 --retrieval-min-accuracy 0 --threads 5 --batch 4 --methods kvtc --ratios 16"
$R --retrieval-first 40 --out /tmp/rd/u1 > /tmp/rd/u1.log 2>&1 &
$R --retrieval-first 80 --out /tmp/rd/u2 > /tmp/rd/u2.log 2>&1 &
wait
echo "done $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/u*.log; do echo "== $f"; grep -E "ratio [0-9]|Error|error|Killed|retrieval within|%" $f | tail -12; done
tar czf $OUT/rd5.tgz -C /tmp rd
