#!/usr/bin/env bash
# The GPU proof of issue 13, one resumable call at a time on the 2-GPU machine (nvidia-h200-x2): stage the
# kit (bench/stage_gpu_kit.sh), join the teacher, run bench/mission_smollm2.yaml until the call's time is
# up, and put the report and the compare JSON (or, before they exist, the run's log) under $OUT.
# State lives in /tmp/mission, which survives only between consecutive calls on the same warm machine:
# issue each call as soon as the last returns. Every call is the same command:
#
#   bash bench/mission_gpu.sh            (carry, with stage_gpu_kit.sh's 4 parts: call 1 .gpu/kit .gpu/gguf0;
#                                         call 2 .gpu/gguf1 .gpu/gguf2; call 3 .gpu/gguf3; later calls nothing)
#
# Exit 0 with "mission finished" when the report is complete; exit 3 when steps are left (call again).
set -uo pipefail
began=$SECONDS
limit=${CALL_SECONDS:-570}          # the call's own limit is 600 s: leave time to copy the results
. bench/gpu_env.sh
out=${OUT:-$state/out}
mkdir -p "$out"
[ "$GPU_TEACHER" = ready ] || exit 3

pipeline=bench/mission_smollm2.yaml
python3 -m merge_xlstm run "$pipeline" --dry-run | tee "$state/plan.txt"
minutes=$(python3 -c "print(max(0.5, ($limit - ($SECONDS - $began)) / 60 - 3.5))")   # a step may run ~3 min past it
python3 -m merge_xlstm run "$pipeline" --stop-after "$minutes" 2>&1 | tee -a "$state/run.log" | grep -v 'it/s\]\|tok/s\]'
code=${PIPESTATUS[0]}

report=$state/report
if [ "$code" -eq 0 ] && [ -f "$report/report.json" ]; then
    cp "$report"/report.md "$report"/report.json "$report"/compare.json "$report"/*.png "$out"/
    echo "mission finished in this call after $((SECONDS - began)) s; report and compare JSON in \$OUT"
else
    cp "$state/plan.txt" "$out/" && tail -c 4000000 "$state/run.log" > "$out/run.log"
    [ -f "$state/run/search.json" ] && cp "$state/run/search.json" "$out/"
    echo "run exited with $code after $((SECONDS - began)) s; call again to continue"
fi
exit "$code"
