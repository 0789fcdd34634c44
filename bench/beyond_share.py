"""How much of the teacher's attention lies beyond the student's window, per layer (issue 12; CPU is enough).

The hybrid student is o·mLSTM + (1 − o)·SWA, and the teacher's attention splits exactly the same way:
A = a·SWA + b·O with b the softmax mass beyond the window and sinks (stage I's ``gate`` term teaches
o = b). So the teacher itself says how open each layer's gate should be: where b is ~0 the memory has
nothing to contribute and a closed gate is right; where b is large and the gate is shut, the memory is
dead. This reads b on the held-out long documents (`merge_xlstm.eval.longdocs`) at every position the
window no longer covers, with the recipe's window and sinks, and writes per layer its median, mean and
the share of (head, position) pairs with b >= 0.05 (the issue's "open" threshold) as JSON.

With ``--queries N`` it also says how the mass beyond the window is spread, at N query positions a
document: over the keys beyond the window, the teacher's attention renormalised there has an effective
number of keys exp(entropy), its top 1, 8 and 64 keys hold some share of it, the document's first
``--early`` tokens (just past the sinks) another, and the ``--edge`` keys just beyond the window's edge
another (medians over heads and queries). Mass on a few early
tokens at every query is a wider sink, which a memory keeps easily; mass spread over a hundred or more keys
that change from query to query is content-addressed reading, which a memory of a few dozen features a
head has to approximate.

Usage: python bench/beyond_share.py --out docs/results/beyond_share.json [--teacher ID] [--documents 4]
       [--queries 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merge_xlstm.eval import longdocs
from merge_xlstm.io import write_json
from merge_xlstm.linearize.stage1 import TeacherAttentionTaps
from merge_xlstm.student import from_teacher
from merge_xlstm.teacher import load_teacher

OPEN = 0.05  # issue 12's threshold for an open gate
TOP = (1, 8, 64)  # the top-k shares reported with --queries


def concentration(
    logp: torch.Tensor, rows: torch.Tensor, window: int, early: int, edge: int
) -> dict[str, torch.Tensor]:
    """Per (head, query) of the teacher's log-probabilities over the keys beyond the window (B, H, n, T; -inf
    elsewhere, and everywhere for a query with none; key index = position, one uncached document; the
    queries at positions `rows`): the effective number of keys, exp(entropy), the share of the top k keys,
    of the keys before position `early` and of the `edge` keys nearest the window, flattened over rows,
    heads and queries that have such keys."""
    p = logp.exp()
    has = torch.isfinite(logp).any(-1)
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    top = p.sort(-1, descending=True).values.cumsum(-1)
    stats = {"effective_keys": entropy.exp(), "beyond_keys": torch.isfinite(logp).sum(-1).float()}
    stats |= {f"top{k}_share": top[..., min(k, p.shape[-1]) - 1] for k in TOP}
    stats["early_share"] = p[..., :early].sum(-1)
    near = torch.arange(p.shape[-1], device=p.device)[None, :] > rows[:, None] - window - edge  # (n, T)
    stats["edge_share"] = (p * near).sum(-1)
    return {name: value[has] for name, value in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens read of each document")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--queries", type=int, default=0, help="query positions a document for the spread")
    parser.add_argument("--early", type=int, default=64, help="the first tokens whose share --queries reports")
    parser.add_argument("--edge", type=int, default=64, help="the keys beyond the window's edge whose share it reports")
    args = parser.parse_args()
    teacher, tokenizer = load_teacher(args.teacher, dtype=torch.float32, device=torch.device("cpu"))
    student = from_teacher(teacher, mixer="hybrid", window_size=args.window, num_sink_tokens=args.sinks).eval()
    taps = TeacherAttentionTaps(teacher)
    docs = longdocs.token_documents(tokenizer, args.documents, args.tokens, where="--documents / --tokens")
    shares: list[list[torch.Tensor]] = [[] for _ in student.model.layers]
    spread: list[list[dict[str, torch.Tensor]]] = [[] for _ in student.model.layers]
    progress = tqdm(total=sum(len(doc) for doc in docs), unit="tok", desc="teacher attention")
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc])
            position_ids = torch.arange(len(doc))[None]
            inputs, _ = taps({"input_ids": ids, "position_ids": position_ids})
            outputs = student.model.align_layers(inputs, position_ids, reference=True, weight_queries=args.queries)
            for layer, out in enumerate(outputs):
                shares[layer].append(out["beyond"][0, :, args.window + args.sinks:].flatten())  # (H x positions)
                if args.queries:
                    logp, _, rows = out["attention"]
                    spread[layer].append(concentration(logp, rows, args.window, args.early, args.edge))
            progress.update(len(doc))
    progress.close()
    layers = []
    for values, spreads in zip(shares, spread, strict=True):
        b = torch.cat(values)
        layers.append({"median": b.median().item(), "mean": b.mean().item(),
                       "open_share": (b >= OPEN).float().mean().item()})
        for name in spreads[0] if spreads else ():
            layers[-1][f"{name}_median"] = torch.cat([s[name] for s in spreads]).median().item()
    result = {"teacher": args.teacher, "documents": [d.path for d in longdocs.LONG_DOCUMENTS[: len(docs)]],
              "tokens_per_document": args.tokens, "window": args.window, "sinks": args.sinks,
              "queries_per_document": args.queries, "early_tokens": args.early, "edge_tokens": args.edge,
              "layers": layers,
              "layers_with_median_at_least_open": sum(row["median"] >= OPEN for row in layers)}
    write_json(args.out, result)
    print(" ".join(f"{row['median']:.2g}" for row in layers))
    if args.queries:
        print("effective keys beyond the window:", " ".join(f"{row['effective_keys_median']:.0f}" for row in layers))
        print("top-8 share:", " ".join(f"{row['top8_share_median']:.2f}" for row in layers))
        print(f"first {args.early} tokens' share:", " ".join(f"{row['early_share_median']:.2f}" for row in layers))
        edge = " ".join(f"{row['edge_share_median']:.2f}" for row in layers)
        print(f"share of the {args.edge} keys past the edge:", edge)
    print(f"layers whose median b >= {OPEN}: {result['layers_with_median_at_least_open']} of {len(layers)}")


if __name__ == "__main__":
    main()
