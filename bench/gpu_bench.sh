#!/usr/bin/env bash
# Issue 11's (and 10's GPU) measurements in one call on the 2-GPU machine (nvidia-h200-x2), no teacher
# needed (random weights of real shapes). Compiling a decode step costs about a minute a shape, so
# the work is split by model over the two GPUs, each process writing its own JSON:
#   GPU 0: the 1B student's decode (B=8), the 1B prefill of both models, greedy equality of the compiled
#          decode step (SmolLM2 shape, 200 steps, fp32 and bf16), the SmolLM2-shape prefill;
#   GPU 1: the 1B teacher's decode (B=8, compiled static cache; eager where that does not run), the
#          profile of both models' 16K prefill (which kernel a slow prefill spends its time in), the
#          stage-II training speed of both (1B), bench/student_gpu.py's kernel checks.
# Each process stops itself before the call's limit; `--resume` continues in a later call. The
# decode and prefill figures come first: the 200-step equality runs last (it took 284 s on 2026-11-30,
# which left no time for the student's decode in a 420 s call).
#   bash bench/gpu_bench.sh          (carry .gpu/kit and .gpu/gguf0 in the first call, see gpu_env.sh)
set -uo pipefail
. bench/gpu_env.sh
out=${OUT:-/tmp/mission/out}; mkdir -p "$out"
budget=${BENCH_SECONDS:-450}
results=/tmp/mission/bench; mkdir -p "$results"
decode=(--batch 8 --decode-contexts 4096 16384 32768 65536)
left() { echo $(( budget - SECONDS > 10 ? budget - SECONDS : 10 )); }   # seconds left, never below 10
(export CUDA_VISIBLE_DEVICES=0
 timeout "$budget" python3 bench/inference.py --resume --out "$results/inference_gpu0.json" --shapes 1b \
    --parts decode prefill equality --decode-models student "${decode[@]}"
 timeout "$(left)" python3 bench/inference.py --resume --out "$results/inference_gpu0.json" \
    --shapes smollm2 --parts prefill) > "$results/gpu0.log" 2>&1 &
(export CUDA_VISIBLE_DEVICES=1
 timeout $((budget - 150)) python3 bench/inference.py --resume --out "$results/inference_gpu1.json" --shapes 1b \
    --parts decode train profile --decode-models teacher "${decode[@]}"
 timeout "$(left)" python3 bench/student_gpu.py --out "$results/student_gpu.json" --model-size smollm2 \
    --decode-tokens 500) > "$results/gpu1.log" 2>&1 &
wait
cp "$results"/*.json "$out"/ 2>/dev/null
tail -c 300000 "$results/gpu0.log" > "$out/gpu0.log"; tail -c 300000 "$results/gpu1.log" > "$out/gpu1.log"
ls -la "$out"
