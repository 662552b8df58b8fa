#!/bin/bash
# H200 call of 2026-11-30 (issue 3): the "without entropy coding" ablation made real for
# the rans quantiser (kvtc-nocoder: the same symbols bit-packed at fixed width per
# component and chunk instead of rANS-coded, benchmarks/rd/kvtc.py KVTCFixedWidth), target
# 16 with the default artifact, 32 windows, retrieval at 2k/4k on prompts 0-39. Set-up as
# rd_h200_s3.sh (.dev-a by a first call, .dev-b by this one).
source benchmarks/rd_h200_setup.sh
rm -rf /tmp/rd/f*
timeout 200 python3 -c "import sys; from kvtc_store.cli import main; sys.exit(main(sys.argv[1:]))" calibrate --ratio 16 > /tmp/rd/fcal.log 2>&1
echo "calibrated rc=$? $(( $(date +%s) - T0 )) s"; grep "^ratio" /tmp/rd/fcal.log
LEFT=$(( 580 - ($(date +%s) - T0) ))
timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda --windows 32 --greedy-tokens 64 --retrieval-tasks passkey multikey --retrieval-lengths 2048 4096 --retrieval-samples 40 --threads 12 --batch 8 --methods kvtc-nocoder --ablation-ratios 16 --out /tmp/rd/f1 > /tmp/rd/f1.log 2>&1
echo "done rc=$? $(( $(date +%s) - T0 )) s"; grep -E "ratio [0-9]|Error|error|Killed" /tmp/rd/f1.log | tail -4
(cd /tmp && tar czf $OUT/rd11.tgz rd/f*)
