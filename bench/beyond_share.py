"""How much of the teacher's attention lies beyond the student's window, per layer (issue 12; CPU is enough).

The hybrid student is o·mLSTM + (1 − o)·SWA, and the teacher's attention splits exactly the same way:
A = a·SWA + b·O with b the softmax mass beyond the window and sinks (stage I's ``gate`` term teaches
o = b). So the teacher itself says how open each layer's gate should be: where b is ~0 the memory has
nothing to contribute and a closed gate is right; where b is large and the gate is shut, the memory is
dead. This reads b on the held-out long documents (`merge_xlstm.eval.longdocs`) at every position the
window no longer covers, with the recipe's window and sinks, and writes per layer its median, mean and
the share of (head, position) pairs with b >= 0.05 (the issue's "open" threshold) as JSON.

Usage: python bench/beyond_share.py --out docs/results/beyond_share.json [--teacher ID] [--documents 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from merge_xlstm.eval import longdocs
from merge_xlstm.io import write_json
from merge_xlstm.linearize.stage1 import TeacherAttentionTaps
from merge_xlstm.student import from_teacher
from merge_xlstm.teacher import load_teacher

OPEN = 0.05  # issue 12's threshold for an open gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens read of each document")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32, device=torch.device("cpu"))
    student = from_teacher(teacher, mixer="hybrid", window_size=args.window, num_sink_tokens=args.sinks).eval()
    taps = TeacherAttentionTaps(teacher)
    docs = longdocs.token_documents(tokenizer, args.documents, args.tokens, where="--documents / --tokens")
    shares: list[list[torch.Tensor]] = [[] for _ in student.model.layers]
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc])
            position_ids = torch.arange(len(doc))[None]
            inputs, _ = taps({"input_ids": ids, "position_ids": position_ids})
            for layer, out in enumerate(student.model.align_layers(inputs, position_ids, reference=True)):
                shares[layer].append(out["beyond"][0, :, args.window + args.sinks:].flatten())  # (H x positions)
    layers = []
    for values in shares:
        b = torch.cat(values)
        layers.append({"median": b.median().item(), "mean": b.mean().item(), "open_share": (b >= OPEN).float().mean().item()})
    result = {"teacher": args.teacher, "documents": [d.path for d in longdocs.LONG_DOCUMENTS[: len(docs)]],
              "tokens_per_document": args.tokens, "window": args.window, "sinks": args.sinks, "layers": layers,
              "layers_with_median_at_least_open": sum(row["median"] >= OPEN for row in layers)}
    write_json(args.out, result)
    print(" ".join(f"{row['median']:.2g}" for row in layers))
    print(f"layers whose median b >= {OPEN}: {result['layers_with_median_at_least_open']} of {len(layers)}")


if __name__ == "__main__":
    main()
