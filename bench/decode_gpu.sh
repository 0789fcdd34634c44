#!/usr/bin/env bash
# The fused decode step on one H200 (nvidia-h200), random weights (no teacher), in two calls of ~450 s.
# Carry .gpu/kit (see gpu_env.sh). Files are named after TAG (default "heads": the seventh session's
# kernel, one program per query head with the gates inside; the sixth session's ran with TAG=fused).
#   bash bench/decode_gpu.sh 1   the fused step against the layer-by-layer one at SmolLM2 shape (3 query
#                                heads per KV head, random gates); the 1B decode of teacher and student
#                                at B=8, 4K-64K; the profile of one compiled step
#   bash bench/decode_gpu.sh 2   greedy equality (60 steps, fp32 and bf16, SmolLM2 shape); B=1 decode
# Each bench writes its JSON after every measurement: run a call again on the same warm machine to resume.
set -uo pipefail
. bench/gpu_env.sh > /tmp/gpu_env.log 2>&1
out=${OUT:-/tmp/mission/out}; mkdir -p "$out"
r=/tmp/mission/bench; mkdir -p "$r"
tag=${TAG:-heads}
case "${1:?call 1 or 2}" in
1)
    timeout 90 python3 bench/student_gpu.py --model-size smollm2 --sections fused_decode_vs_layers \
        --out "$r/fused_check_${tag}_smollm2_h200.json"
    timeout 300 python3 bench/inference.py --resume --out "$r/decode_${tag}_h200.json" --shapes 1b \
        --parts decode --batch 8 --decode-contexts 4096 16384 32768 65536
    timeout $((560 - SECONDS)) python3 bench/inference.py --resume --out "$r/profile_decode_${tag}_h200.json" \
        --shapes 1b --parts profile_decode --batch 8 --profile-context 4096 --models student
    ;;
2)
    timeout 240 python3 bench/inference.py --resume --out "$r/equality_${tag}_h200.json" --shapes smollm2 \
        --parts equality --equality-steps 60
    timeout $((500 - SECONDS)) python3 bench/inference.py --resume --out "$r/decode_${tag}_b1_h200.json" \
        --shapes 1b --parts decode --batch 1 --decode-contexts 4096 65536 16384 32768
    ;;
esac 2>&1 | cut -c1-300 | tail -40
cp "$r"/*.json "$out"/ 2>/dev/null
ls -la "$out"
