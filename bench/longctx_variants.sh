#!/usr/bin/env bash
# Issue 12's stage-I ablation in one call on the 2-GPU machine, teacher staged (bench/gpu_env.sh): three
# seeds of recipes/code.yaml from the same teacher, data and tokens, over the two GPUs,
#   paper: stage I on paper A's loss alone (the output term), memory mixed in at every position
#   split: this project's default (output + gate + memory terms, memory only beyond window and sinks),
#   longf: split with forget-gate biases 8..12 instead of 3..6 (half-lives of ~2K to ~110K tokens instead
#          of ~14 to ~280: with 3..6 a key 512 tokens back has decayed by e^-24 to e^-1.3 in the state),
#          run on GPU 0 after paper (the 2026-11-30 ablation had paper and split only),
# then bench/longctx_ablation.py on the teacher, the SWA-only student and the three seeds. $OUT gets
# ablation.json, ablation.md and ce_by_position.png.
#   bash bench/longctx_variants.sh    (STAGE1_TOKENS, default 2M)
set -uo pipefail
. bench/gpu_env.sh
[ "$GPU_TEACHER" = ready ] || exit 3
out=${OUT:-/tmp/mission/out}; mkdir -p "$out"
root=/tmp/mission/ablation; mkdir -p "$root"
common=(--seed-only --set "stage1.tokens=${STAGE1_TOKENS:-2097152}" --set stage1.warmup_steps=4
        --set stage1.log_every=1 --set stage1.save_every=1000)
(CUDA_VISIBLE_DEVICES=0 python3 -m merge_xlstm linearize recipes/code.yaml "${common[@]}" --set "seed=$root/paper" \
    --set 'stage1.loss={output: 1.0, gate: 0.0, memory: 0.0}' --set student.memory_outside_window=false \
    > "$root/paper.log" 2>&1
 CUDA_VISIBLE_DEVICES=0 python3 -m merge_xlstm linearize recipes/code.yaml "${common[@]}" --set "seed=$root/longf" \
    --set 'student.forget_bias=[8.0, 12.0]' > "$root/longf.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=1 python3 -m merge_xlstm linearize recipes/code.yaml "${common[@]}" --set "seed=$root/split" \
    > "$root/split.log" 2>&1) &
wait
for v in paper split longf; do grep -v 'it/s\]\|step/s\]' "$root/$v.log" | tail -5; done
CUDA_VISIBLE_DEVICES=0 python3 bench/longctx_ablation.py --variant "paper=$root/paper" --variant "split=$root/split" --variant "longf=$root/longf" \
    --output "$out" 2>&1 | grep -v 'it/s\]\|tok/s\]'
for v in paper split longf; do cp "$root/$v/metrics.jsonl" "$out/stage1_$v.jsonl" 2>/dev/null; done
ls -la "$out"
