#!/usr/bin/env bash
# Issue 13's multi-GPU proof: `linearize recipes/code.yaml` (stage I + stage II, 8 steps of 65,536 tokens each) on one GPU,
# under DDP and under FSDP2 on both GPUs of the nvidia-h200-x2 machine; the loss curves compared in
# $OUT/parallel_curves.json and .png. Needs the teacher staged by bench/mission_gpu.sh on the same warm
# machine (run it in the call after the mission's, or after the third staging call). About 3 minutes.
#   bash bench/parallel_curves.sh
set -uo pipefail
. bench/gpu_env.sh
[ "$GPU_TEACHER" = ready ] || { echo "stage the teacher first (bench/gpu_env.sh)"; exit 3; }
budget=(--set stage1.tokens=${CURVE_TOKENS:-524288} --set stage2.tokens=${CURVE_TOKENS:-524288}
        --set stage1.warmup_steps=2 --set stage2.warmup_steps=2 --set stage1.log_every=1 --set stage2.log_every=1
        --set longctx.ce.documents=0 --set longctx.passkey_trials=0)   # curves only: no long-context report
for mode in single ddp fsdp; do
    case $mode in
        single) launch=(python3) ;;
        *) launch=(accelerate launch --config_file "configs/accelerate/$mode.yaml") ;;
    esac
    "${launch[@]}" -m merge_xlstm linearize recipes/code.yaml "${budget[@]}" \
        --set "seed=$state/curves/$mode/seed" --set "output=$state/curves/$mode/code" 2>&1 \
        | grep -v 'it/s\]\|tok/s\]\|step/s\]' || exit 1
done
python3 bench/parallel_curves.py "$state/curves" "${OUT:-$state/curves}"
