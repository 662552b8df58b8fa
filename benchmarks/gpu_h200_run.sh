#!/bin/bash
# H200 call (issue 6): the GPU tests (with the suffix forward's CUDA test), the full
# benchmark, benchmarks/blob_assembly.py and benchmarks/disk_read.py, as recorded in
# benchmarks/results/ gpu_codec.md, gpu_codec_tests.md, blob_assembly_h200.md and
# disk_read_h200.json. A first call carries .dev-w and
# .dev-n (py3.12 wheels the GPU image lacks; nvidia-nvcomp-cu13 6.0.0.12 and its library)
# and installs them: `python3 -m pip install --no-index --no-deps --target /tmp/site
# .dev-w/*.whl .dev-n/*.whl`; this one carries .gpu-rans8 (the SmolLM2 int8 rans artifact
# at ratio 16 and one real 256-token chunk; DATA=.gpu-rans9 names another such folder).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site DATA=${DATA:-.gpu-rans8} KVTC_GPU_RANS_DATA=$PWD/${DATA:-.gpu-rans8}
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v WARN | tail -2
mkdir -p $OUT/res
rm -rf /tmp/t; mkdir /tmp/t; cp -r tests benchmarks pyproject.toml /tmp/t/
(cd /tmp/t && timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_rans.py tests/test_gpu_codec.py tests/test_gpu_nvcomp.py tests/test_suffix_forward.py > $OUT/res/gpu_tests.txt 2>&1; echo "gpu tests rc=$?"; tail -3 $OUT/res/gpu_tests.txt)
echo "tests $(( $(date +%s) - T0 )) s"
timeout 330 python3 benchmarks/gpu_codec.py --smollm2-artifact $DATA/artifact --smollm2-chunk $DATA/chunk.safetensors --ttft --reps 2 --ttft-reps 2 --out $OUT/res > $OUT/res/bench.log 2>&1; echo "bench rc=$?"
grep -E "gbps|ttft_speedup|honest" $OUT/res/gpu_codec.md | head -30
echo "total $(( $(date +%s) - T0 )) s"
timeout 60 python3 benchmarks/blob_assembly.py > $OUT/res/blob_assembly.txt 2>&1; echo "blob_assembly rc=$?"; cat $OUT/res/blob_assembly.txt
timeout 90 python3 benchmarks/disk_read.py --out $OUT/res/disk_read.json > $OUT/res/disk_read.txt 2>&1; echo "disk_read rc=$?"; tail -4 $OUT/res/disk_read.txt
