#!/bin/bash
# H200 call of 2026-11-30 (issue 6): the deflate64k coder through nvCOMP (carry .dev-w and
# .dev-n: the py3.12 wheels the GPU image lacks and nvidia-nvcomp-cu13 6.0.0.12 with its
# library). Smoke script, the nvCOMP GPU tests, then the 8B-shape all-layer 128-chunk
# throughput with coder deflate (no TTFT; the full run is benchmarks/results/gpu_codec.md).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev-w/*.whl .dev-n/*.whl 2>&1 | grep -v WARN | tail -2
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site
mkdir -p $OUT/gc
timeout 40 python3 benchmarks/nvcomp_smoke.py > $OUT/smoke.txt 2>&1; echo "smoke rc=$?"; tail -14 $OUT/smoke.txt
rm -rf /tmp/t; mkdir /tmp/t; cp -r tests pyproject.toml /tmp/t/
(cd /tmp/t && timeout 40 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_nvcomp.py > $OUT/nvcomp_tests.txt 2>&1; echo "nvcomp tests rc=$?"; tail -4 $OUT/nvcomp_tests.txt)
(cd /tmp/t && timeout 30 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_rans.py -k hands_sequences > $OUT/rans_tests.txt 2>&1; echo "rans rc=$?"; tail -2 $OUT/rans_tests.txt)
timeout 60 python3 benchmarks/gpu_codec.py --groupings all --batches 128 --reps 2 --out $OUT/gc > $OUT/bench.log 2>&1; echo "bench rc=$?"
grep -E "deflate|nvcomp" $OUT/gc/gpu_codec.md | head -20
echo "total $(( $(date +%s) - T0 )) s"
