#!/bin/bash
# Issue 21 on the lent GPU (H100 or H200), from the repo root, in one call (under the
# 10-minute limit). Prepare the wheels the GPU image lacks once, on a machine with pip:
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
#                every existing GPU codec test) into $OUT/gpu_tests.txt, then
#                benchmarks/serving_path.py (16 requests x 8k tokens of the Llama-3.1-8B
#                shape on an H200; 8 where the card has under 120 GB free, an H100) into
#                $OUT/serving_path.{json,md} (copy them to benchmarks/results/).
#                TEST_S (330) and TOTAL_S (580): seconds for the tests, and for the call.
set -u
STAGE=${STAGE:?STAGE=pack|setup}
WHEELS="pydantic isal pyyaml prometheus_client tqdm hypothesis"  # and what they pull

if [ "$STAGE" = pack ]; then
  mkdir -p .dev21/whl
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d .dev21/whl $WHEELS
  ls -la .dev21/whl
  exit 0
fi

export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
mkdir -p /tmp/site
python3 -m pip install -q --no-deps --no-index --target /tmp/site .dev21/whl/*.whl 2>&1 | grep -v WARN | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . 2>&1 | grep -v WARN | tail -2
rm -rf /tmp/t; mkdir /tmp/t; cp -r tests benchmarks pyproject.toml /tmp/t/
(cd /tmp/t && timeout ${TEST_S:-330} python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_serving.py \
  tests/test_gpu_codec.py tests/test_gpu_rans.py tests/test_gpu_deflate_flow.py \
  tests/test_gpu_nvcomp.py tests/test_gpu_backend.py tests/test_serving_path.py \
  > $OUT/gpu_tests.txt 2>&1
 echo "gpu tests rc=$?"; tail -8 $OUT/gpu_tests.txt)
echo "tests $(( $(date +%s) - T0 )) s"
FREE=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
# one batch of 16 x 8k tokens needs ~75 GB on the device (dense out 34, pages 17, the
# decoder's features 17, coefficients 4): 16 requests on an H200, 8 on an H100
REQ=16; [ "$FREE" -lt 120000 ] && REQ=8
LEFT=$(( ${TOTAL_S:-580} - ($(date +%s) - T0) ))
timeout $LEFT python3 benchmarks/serving_path.py --requests $REQ --prefix 8192 --reps 3 \
  --out $OUT 2>&1 | tail -20
echo "done $(( $(date +%s) - T0 )) s"
