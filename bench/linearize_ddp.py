"""Smoke test of `linearize` under `accelerate launch` with several processes (not run by CI).

Writes a tiny random-init Llama teacher, a local corpus and a recipe under --workdir, then
`accelerate launch --num_processes N -m merge_xlstm linearize <recipe>` runs it unchanged (DDP).

Usage: python bench/linearize_ddp.py --workdir /tmp/ddp && accelerate launch --num_processes 2 \\
       -m merge_xlstm linearize /tmp/ddp/recipe.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from merge_xlstm.testing import tiny_teacher, tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    tiny_teacher("llama").save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    with (root / "corpus.jsonl").open("w") as handle:
        for i in range(2000):
            handle.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n")
    recipe = {
        "name": "ddp",
        "teacher": str(root / "teacher"),
        "student": {"kind": "hybrid", "mixer": "hybrid", "window_size": 64, "num_sink_tokens": 4},
        "data": {"sources": [{"path": str(root / "corpus.jsonl")}], "seq_len": 256},
        "stage1": {"tokens": 256 * 8 * 20, "batch_size": 8, "micro_batch_size": 2, "log_every": 5},
        "stage2": {"tokens": 256 * 8 * 20, "batch_size": 8, "micro_batch_size": 2, "lr": 1e-4, "top_k": 16,
                   "log_every": 5, "save_every": 10},
        "seed": str(root / "experts" / "seed"),
        "output": str(root / "experts" / "ddp"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    print(root / "recipe.yaml")


if __name__ == "__main__":
    main()
