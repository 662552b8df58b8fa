#!/bin/bash
# Issue 17's multi-genre suite (benchmarks/rd/genres.py) on the lent GPU, from the repo root.
# Second of two device calls, as rd_h200_s*.sh: the set-up (rd_h200_setup.sh) joins the
# SmolLM2 GGUF from /tmp/kv (first call's .dev-a) and .dev-b (this call's), and installs
# kvtc-store into /tmp/site. The machine reaches no network, so the evaluation genres come
# along as .corpora/pack.tgz (`make corpora-pack` here: only the files the loaders read,
# ~5 MB; pass it in the call's `carry`). --texts validation needs no pack.
#
# The default codec is calibrated once (CPU) at every kvtc ratio of the jobs, then one
# harness process per (job, genre group) runs side by side on the GPU; at the end their
# quality.json files are merged into /tmp/rd/merged (rate_distortion.md, plots, derived
# pooled and worst-genre rows) and everything is tarred to $OUT/rd_genres.tgz.
#
# Parameters (environment; defaults in brackets):
#   JOBS          ';'-separated harness arguments, one process each per genre group
#                 ["--methods kvtc --ratios 16;--methods kvtc --ratios 24;
#                   --methods kvtc --ratios 8 12;--methods fp8 int4-g64"]
#   GENRE_GROUPS  ';'-separated genre lists; each job runs once per group
#                 ["encyclopedic literary technical;code chat french german"]
#   WINDOWS       continuation windows per genre [32]
#   RETRIEVAL     retrieval arguments ["--retrieval-tasks passkey multikey
#                 --retrieval-lengths 2048 4096 --retrieval-samples 40"]; haystacks of the
#                 group's genres among encyclopedic, technical, literary
#   CAL_RATIOS    kvtc ratios to calibrate first [the --ratios of JOBS]
#   TEXTS         evaluation | validation [evaluation]; validation: GENRE_GROUPS defaults to
#                 "val-tragedies;val-pydoc"
#   EXTRA         further harness arguments for every process [--threads 3 --batch 4]
#   BUDGET        seconds this script may take in all [575]
# Example: JOBS="--methods kvtc --ratios 16" GENRE_GROUPS="code;chat" WINDOWS=8 bash \
#   benchmarks/rd_genres_gpu.sh
source benchmarks/rd_h200_setup.sh
JOBS=${JOBS:-"--methods kvtc --ratios 16;--methods kvtc --ratios 24;--methods kvtc --ratios 8 12;--methods fp8 int4-g64"}
TEXTS=${TEXTS:-evaluation}
if [ "$TEXTS" = validation ]; then DEFAULT_GROUPS="val-tragedies;val-pydoc"
else DEFAULT_GROUPS="encyclopedic literary technical;code chat french german"; fi
GENRE_GROUPS=${GENRE_GROUPS:-$DEFAULT_GROUPS}
WINDOWS=${WINDOWS:-32}
RETRIEVAL=${RETRIEVAL:-"--retrieval-tasks passkey multikey --retrieval-lengths 2048 4096 --retrieval-samples 40"}
EXTRA=${EXTRA:-"--threads 3 --batch 4"}
BUDGET=${BUDGET:-575}
CAL_RATIOS=${CAL_RATIOS:-$(echo "$JOBS" | tr ';' '\n' | grep -- "--methods kvtc" | sed -n 's/.*--ratios \([0-9. ]*\).*/\1/p' | tr ' ' '\n' | sort -nu | tr '\n' ' ')}
rm -rf /tmp/rd/g* /tmp/rd/merged /tmp/corpora
if [ "$TEXTS" = evaluation ]; then
  [ -f .corpora/pack.tgz ] || { echo "no .corpora/pack.tgz: run make corpora-pack and carry it"; exit 2; }
  mkdir -p /tmp/corpora && tar xzf .corpora/pack.tgz -C /tmp/corpora
  export KVTC_CORPORA=/tmp/corpora
  python3 -c "import yaml" || echo "WARNING: no PyYAML here: the chat genre will fail"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [ -n "${CAL_RATIOS// /}" ]; then
  timeout 240 python3 -c "import sys; from kvtc_store.cli import main; sys.exit(main(sys.argv[1:]))" calibrate --ratio $CAL_RATIOS > /tmp/rd/gcal.log 2>&1
  echo "calibrated $CAL_RATIOS rc=$? $(( $(date +%s) - T0 )) s"; grep "^ratio" /tmp/rd/gcal.log
fi
LEFT=$(( BUDGET - 25 - ($(date +%s) - T0) ))
i=0
IFS=';' read -ra JOB_LIST <<< "$JOBS"
IFS=';' read -ra GROUP_LIST <<< "$GENRE_GROUPS"
for job in "${JOB_LIST[@]}"; do
  for group in "${GROUP_LIST[@]}"; do
    i=$((i + 1))
    echo "g$i: $job --genres $group"
    timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda --texts $TEXTS \
      --windows $WINDOWS --greedy-tokens 64 $RETRIEVAL $EXTRA $job --genres $group \
      --out /tmp/rd/g$i > /tmp/rd/g$i.log 2>&1 &
  done
done
wait
echo "ran $i processes, $(( $(date +%s) - T0 )) s"
for f in /tmp/rd/g*.log; do echo "== $f"; grep -E "ratio [0-9]|Error|error|Killed|overlap" $f | tail -9; done
mkdir -p /tmp/rd/merged
ls /tmp/rd/g*/quality.json > /dev/null 2>&1 && timeout 20 python3 benchmarks/rate_distortion.py \
  --out /tmp/rd/merged --merge /tmp/rd/g*/quality.json --plot-only > /tmp/rd/merged.log 2>&1
grep -E "^\s+\[" /tmp/rd/merged.log
(cd /tmp && tar czf $OUT/rd_genres.tgz rd/g* rd/merged*)
echo "done $(( $(date +%s) - T0 )) s"
