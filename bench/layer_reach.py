"""Which layers carry the teacher's long-context gain? (issue 12; CPU is enough at SmolLM2 size)

The hybrid's memory can at best give back, layer by layer, the teacher's attention beyond the window:
o = b and mLSTM = the teacher's beyond-window output O make o·mLSTM + (1 − o)·SWA the teacher's full
attention exactly. So "the memory works perfectly in layers L" is the model with full attention in
the layers of L and the window (512 + 4 sinks) in every other. This measures the CE by position of
such models on the held-out long documents (`merge_xlstm.eval.longdocs`) and the share of the
teacher's gain over the SWA-only student each recovers, per bin: where the gain lives tells where the
memory must work, whatever its gates do elsewhere. Each document is read in one pass (full attention
needs every key; the student's cache keeps only the window's).

Usage: python bench/layer_reach.py --out docs/results/layer_reach.json [--set early=0-10 --set deep=11-29 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from merge_xlstm.eval import longctx, longdocs
from merge_xlstm.io import write_json
from merge_xlstm.student import from_teacher
from merge_xlstm.student.modeling_xlstm_hybrid import FULL_WINDOW
from merge_xlstm.teacher import load_teacher

BINS = [0, 128, 512, 1024, 2048, 4096, 8192]


def layer_set(text: str) -> list[int]:
    """'0-10,24' -> [0, ..., 10, 24]."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


def with_full_attention(model: torch.nn.Module, layers: list[int]) -> None:
    """Give the SWA-only student's `layers` the teacher's full causal attention (same q, k, v)."""
    for index in layers:
        mixer = model.model.layers[index].self_attn
        window = mixer.attention  # the bound method, before the instance attribute shadows it

        def full(q, k, v, layout, return_lse=False, window=window):  # noqa: ANN001, ANN202
            return window(q, k, v, dataclasses.replace(layout, window=FULL_WINDOW, sinks=0, masks={}), return_lse)

        mixer.attention = full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of each document, read in one pass")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="LABEL=LAYERS",
                        help="layers given full attention, e.g. deep=11-29 (0-based, ranges and commas)")
    args = parser.parse_args()
    device = torch.device("cpu")
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32, device=device)
    docs = longdocs.token_documents(tokenizer, args.documents, args.tokens, where="--documents / --tokens")
    count = len(teacher.model.layers)
    sets = {"swa_only": [], "teacher (all layers)": list(range(count))}
    sets |= {label: layer_set(layers) for label, layers in (item.split("=", 1) for item in args.set)}
    rows: dict[str, Any] = {}
    for label, layers in sets.items():
        began = time.monotonic()
        model = from_teacher(teacher, mixer="swa", window_size=args.window, num_sink_tokens=args.sinks).eval()
        with_full_attention(model, layers)
        losses = longctx.position_losses(model, docs, chunk_tokens=args.tokens, batch_size=1, device=device,
                                         desc=label)  # fmt: skip
        rows[label] = {"layers": layers, "ce_by_position": losses.bins(BINS), "seconds": round(time.monotonic() - began)}
        print(label, " ".join(f"{b['ce']:.3f}" for b in rows[label]["ce_by_position"]), flush=True)
    for row in rows.values():
        row["recovery"] = longctx.recovery(row["ce_by_position"], rows["teacher (all layers)"]["ce_by_position"],
                                           rows["swa_only"]["ce_by_position"], start=args.window * 2)  # fmt: skip
    # the check that makes the others mean something: full attention everywhere is the teacher itself
    reference = longctx.position_losses(teacher, docs, chunk_tokens=args.tokens, batch_size=1, device=device,
                                        desc="teacher").bins(BINS)  # fmt: skip
    result = {"teacher": args.teacher, "documents": [d.path for d in longdocs.LONG_DOCUMENTS[: len(docs)]],
              "tokens_per_document": args.tokens, "window": args.window, "sinks": args.sinks,
              "teacher_itself": reference, "sets": rows}
    write_json(args.out, result)
    for label, row in rows.items():
        print(f"{label:>24}: recovery " + " ".join(f"{r['recovery']:.2f}" for r in row["recovery"]))


if __name__ == "__main__":
    main()
