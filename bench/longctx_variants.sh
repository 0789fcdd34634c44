#!/usr/bin/env bash
# Issue 12's stage-I ablation in one call on the 2-GPU machine, teacher staged (bench/gpu_env.sh): seeds
# of recipes/code.yaml from the same teacher, data and tokens, spread over the two GPUs, then
# bench/longctx_ablation.py on the teacher, the SWA-only student and every seed. The variants:
#   paper:   stage I on paper A's loss alone (the output term), memory mixed in at every position;
#   split:   this project's default (output + gate + memory terms, memory only beyond window and sinks);
#   longf:   split with forget-gate biases 8..12 instead of 3..6 (half-lives of ~2K to ~110K tokens
#            instead of ~14 to ~280: with 3..6 a key 512 tokens back has decayed by e^-24 to e^-1.3);
#   longflr: longf at stage-I lr 1e-3 instead of 1e-2 (Adam moves each of the output gate's ~1K input
#            weights by ~lr a step, so its pre-activation can swing by ~10 a step at 1e-2: saturation);
#   gatelr:  longf with only the output gate at a tenth of the lr (stage1.gate_lr_scale 0.1): the gates
#            of longflr without slowing the feature maps and the memory's gates;
#   evicted: split with student.memory_keys evicted: the mLSTM state takes each key when the window lets go
#            of it, so the memory holds the keys beyond the window (the part of the teacher's attention the
#            memory term asks it for) instead of being dominated by the window's own recent keys;
#   evictedlongf: evicted with forget-gate biases 8..12 (a key stays in memory long after the window);
#   evictedshare: evicted with the memory_share term instead of memory (the mLSTM error weighted by the
#            beyond-window share b, not b²);
#   evicted8k: evicted with stage I on 8,192-token rows (8 a step: the same tokens per step), so the memory
#            trains on keys up to 7.7K tokens beyond the window instead of 1.5K;
#   evicted8m: evicted with 8M stage-I tokens (128 steps instead of 32);
#   evictedat: evicted plus the attention_transfer term (the memory's weights over its keys against the
#            teacher's attention weights beyond the window, at 64 queries a row);
#   evictedat10: evictedat with the attention_transfer term weighted 10 (its KL is ~1 nat a layer where the
#            output term's MSE is ~1e-2: at 1 the output term may still decide);
#   evictedf256: evicted with 256 features a head instead of 64 (a softmax feature map of 64 entries tells
#            at most ~64 kinds of key apart; retrieving one key among thousands beyond the window needs more);
#   evictedatf256: evictedat with 256 features a head;
#   evicteddeep: evicted with the memory in layers 11-29 only (student.memory_layers), the layers where
#            full attention recovers 0.73-0.87 of the teacher's long-context gain (bench/layer_reach.py); layers
#            0-10 are the window alone (full attention there recovers <= 0.13 up to 4K, 0.04-0.19 at 4K-8K);
#   evicteddeep8m: evicteddeep with 8M stage-I tokens.
# The 2026-11-30 ablation ran paper and split (docs/results/longctx_ablation); the same teacher, data and
# tokens give the same figures, so a later call may run only the new ones. $OUT gets ablation.json,
# ablation.md, ce_by_position.png and stage1_metrics.tar.gz (each seed's stage-I metrics).
#   VARIANTS="longf gatelr" bash bench/longctx_variants.sh    (STAGE1_TOKENS, default 2M; SPLIT: GPU 0's count)
set -uo pipefail
. bench/gpu_env.sh
[ "$GPU_TEACHER" = ready ] || exit 3
out=${OUT:-/tmp/mission/out}; mkdir -p "$out"
root=/tmp/mission/ablation; mkdir -p "$root"
read -ra variants <<< "${VARIANTS:-paper split longf longflr gatelr}"
common=(--seed-only --set "stage1.tokens=${STAGE1_TOKENS:-2097152}" --set stage1.warmup_steps=4
        --set stage1.log_every=1 --set stage1.save_every=32)
DEEP="[$(seq -s ', ' 11 29)]"  # SmolLM2's layers 11-29
train() {     # train GPU VARIANT...: the variants one after another on one GPU
    local gpu=$1; shift
    for v in "$@"; do
        local -a extra
        case $v in   # the recipe overrides that make each variant
            paper) extra=(--set 'stage1.loss={output: 1.0, gate: 0.0, memory: 0.0}'
                          --set student.memory_outside_window=false) ;;
            split) extra=() ;;
            longf) extra=(--set 'student.forget_bias=[8.0, 12.0]') ;;
            longflr) extra=(--set 'student.forget_bias=[8.0, 12.0]' --set stage1.lr=1.0e-3) ;;
            gatelr) extra=(--set 'student.forget_bias=[8.0, 12.0]' --set stage1.gate_lr_scale=0.1) ;;
            evicted) extra=(--set student.memory_keys=evicted) ;;
            evictedlongf) extra=(--set student.memory_keys=evicted --set 'student.forget_bias=[8.0, 12.0]') ;;
            evictedshare) extra=(--set student.memory_keys=evicted
                                 --set 'stage1.loss={output: 1.0, gate: 1.0, memory: 0.0, memory_share: 1.0}') ;;
            evicted8k) extra=(--set student.memory_keys=evicted --set data.seq_len=8192 --set stage1.batch_size=8
                              --set stage1.micro_batch_size=8) ;;
            evicted8m) extra=(--set student.memory_keys=evicted --set stage1.tokens=8388608) ;;
            evictedat) extra=(--set student.memory_keys=evicted
                              --set 'stage1.loss={output: 1.0, gate: 1.0, memory: 1.0, attention_transfer: 1.0}') ;;
            evictedat10) extra=(--set student.memory_keys=evicted
                                --set 'stage1.loss={output: 1.0, gate: 1.0, memory: 1.0, attention_transfer: 10.0}') ;;
            evictedf256) extra=(--set student.memory_keys=evicted --set student.feature_dim=256) ;;
            evictedatf256) extra=(--set student.memory_keys=evicted --set student.feature_dim=256
                                  --set 'stage1.loss={output: 1.0, gate: 1.0, memory: 1.0, attention_transfer: 1.0}') ;;
            evicteddeep) extra=(--set student.memory_keys=evicted --set "student.memory_layers=$DEEP") ;;
            evicteddeep8m) extra=(--set student.memory_keys=evicted --set "student.memory_layers=$DEEP"
                                  --set stage1.tokens=8388608) ;;
            *) echo "unknown variant $v" >&2; return 2 ;;
        esac
        CUDA_VISIBLE_DEVICES=$gpu python3 -m merge_xlstm linearize recipes/code.yaml "${common[@]}" \
            --set "seed=$root/$v" "${extra[@]}" > "$root/$v.log" 2>&1
    done
}
half=${SPLIT:-$(( (${#variants[@]} + 1) / 2 ))}   # how many variants GPU 0 trains (SPLIT balances their lengths)
# The teacher's and SWA-only rows do not depend on the variants: measured beside the training, once a machine.
base=$root/baselines
[ -f "$base/ablation.json" ] || CUDA_VISIBLE_DEVICES=${ABLATION_GPU:-0} python3 bench/longctx_ablation.py \
    --output "$base" > "$root/baselines.log" 2>&1 &
train 0 "${variants[@]:0:$half}" & train 1 "${variants[@]:$half}" & wait
args=()
for v in "${variants[@]}"; do
    grep -v 'it/s\]\|step/s\]' "$root/$v.log" | tail -3
    args+=(--variant "$v=$root/$v")
done
# every variant's stage-I metrics in one file: a call brings back at most 8
(cd "$root" && tar -czf "$out/stage1_metrics.tar.gz" */metrics.jsonl 2>/dev/null)
CUDA_VISIBLE_DEVICES=${ABLATION_GPU:-0} python3 bench/longctx_ablation.py "${args[@]}" --baselines "$base/ablation.json" \
    --output "$out" 2>&1 | grep -v 'it/s\]\|tok/s\]'
ls -la "$out"
