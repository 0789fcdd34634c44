"""What storing the teacher's top-k log-probabilities in 16 bits does to the stage-II KL (CPU or GPU).

The teacher (SmolLM2-135M-Instruct by default, the packaged one offline) and a student (a trained one
from --student, else a freshly converted hybrid student) read the same packed rows of the code recipe's data; the top-k KL(teacher || student) is computed
from float32 targets (what online mode uses) and from the same targets rounded to float16 and bfloat16
(what stored mode keeps). Also the bytes per token each stored form takes. JSON on stdout.

Usage: python bench/targets_precision.py [--student experts/code] [--rows 8] [--seq-len 512] [--top-k 256]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

from merge_xlstm.linearize.losses import next_token_mask, sparse_topk_kl
from merge_xlstm.linearize.pipeline import recipe_data
from merge_xlstm.linearize.targets import stored_bytes_per_token, teacher_topk
from merge_xlstm.recipe import load_linearize_recipe
from merge_xlstm.student import from_teacher
from merge_xlstm.teacher import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/code.yaml")
    parser.add_argument("--student", default=None, help="a student directory (default: convert the teacher)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    recipe = load_linearize_recipe(args.recipe, [f"data.seq_len={args.seq_len}", f"stage1.tokens={args.seq_len}",
                                                 f"stage2.tokens={args.rows * args.seq_len}", "stage2.batch_size=1"])
    teacher, tokenizer = load_teacher(recipe.teacher, dtype=torch.float32, device=args.device)
    if args.student:
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    else:
        student = from_teacher(teacher, **recipe.student.model_dump())
    student = student.to(args.device).eval()
    rows = recipe_data(recipe, tokenizer).train
    batch = {k: torch.stack([rows[i][k] for i in range(args.rows)]).to(args.device) for k in rows[0]}
    with torch.no_grad():
        targets = teacher_topk(teacher, batch["input_ids"], batch["position_ids"], args.top_k)
        logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    mask = next_token_mask(batch["labels"])

    def kl(values: torch.Tensor) -> float:
        per_token = sparse_topk_kl(logits, values, targets["topk_indices"])
        return float((per_token * mask).sum() / mask.sum())

    exact = kl(targets["topk_logprobs"])
    result = {"teacher": recipe.teacher, "student": args.student or "converted, untrained", "tokens": int(mask.sum()), "top_k": args.top_k, "kl_float32": exact}
    for dtype in ("float16", "bfloat16"):
        rounded = kl(targets["topk_logprobs"].to(getattr(torch, dtype)))
        result[f"kl_{dtype}"] = rounded
        result[f"relative_change_{dtype}"] = abs(rounded - exact) / exact
    result["bytes_per_token"] = {"stored": stored_bytes_per_token(args.top_k, teacher.config.vocab_size),
                                 "int32 indices (before)": args.top_k * 6 + 4, "online": 0}
    result["gb_per_100M_tokens"] = {k: v * 1e8 / 1e9 for k, v in result["bytes_per_token"].items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
