"""Wall time and scores of `merge-xlstm eval` per packaged suite, for one model, offline.

    python bench/eval_suites.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--suites math code stem chat]
                                [--limit 8] [--batch-size 8] [--output results-bench]

Runs each suite in a fresh process (so suites do not share warm caches), records its wall time and
then reads the score `merge-xlstm compare` would use for every task back from lm-eval's results file.
Prints one JSON object: {"model", "limit", "batch_size", "device", "suites": {suite: {"seconds", "tasks":
{task: {"metric", "score", "documents", "split"}}}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from merge_xlstm.eval.runner import output_name
from merge_xlstm.eval.scores import load_scores
from merge_xlstm.eval.suites import get_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--suites", nargs="+", default=["math", "code", "stem", "chat"])
    parser.add_argument("--limit", type=int, default=8, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="results-bench")
    args = parser.parse_args()

    report = {"model": args.model, "limit": args.limit, "batch_size": args.batch_size, "device": args.device,
              "suites": {}}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in args.suites:
        command = [sys.executable, "-m", "merge_xlstm", "eval", args.model, "--suite", name, "--limit",
                   str(args.limit), "--batch-size", str(args.batch_size), "--device", args.device,
                   "--output", args.output]  # fmt: skip
        start = time.monotonic()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.monotonic() - start
        scores = load_scores(str(Path(args.output) / output_name(args.model) / name))
        tasks = {}
        for task in get_suite(name).tasks:
            entry = scores.tasks[task.name]
            documents = len(entry.docs.values) if entry.docs else None
            tasks[task.name] = {"metric": entry.metric, "score": entry.score, "documents": documents,
                                "split": task.split}  # fmt: skip
        report["suites"][name] = {"seconds": round(seconds, 1), "tasks": tasks}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
