"""Long-context ablation (issue 12): a teacher, its SWA-only student and student variants, measured alike.

    python bench/longctx_ablation.py --teacher HuggingFaceTB/SmolLM2-135M-Instruct \\
        --variant today=experts/code --variant warmup=runs/warmup/code ... --output results/longctx-ablation
        [--documents 16] [--max-tokens 8192] [--passkey-lengths 256 1024 2048 4096 8192] [--passkey-trials 10]

For the teacher, the SWA-only student (the teacher converted with ``mixer: swa``, --window and --sinks,
untrained: a sliding window and nothing else) and every ``--variant LABEL=DIR`` (experts, seeds or any
model directory of the same tokenizer), with `merge_xlstm.eval.longctx`:

- mean cross-entropy per position bin on the held-out long documents (`merge_xlstm.eval.longdocs`),
  and in-window CE (positions 1 .. --window - 1);
- recovery per bin from --recovery-from: (CE_swa - CE) / (CE_swa - CE_teacher), the issue's figure;
- pass-key accuracy per length (the longctx suite's prompts and scorer, greedy, one batch per length);
- per-layer median of the output gate o on the documents (hybrid students), and how many layers
  have o >= --open-gate (the issue's "open" threshold).

Writes ``ablation.json`` (everything, incl. every pass-key answer), ``ablation.md`` (the tables the
issue asks for) and ``ce_by_position.png`` into --output, and prints the Markdown. bf16 on GPU; models
are loaded one at a time. On one H200, SmolLM2-135M with the defaults: an estimate of 5-15 s a model
(not measured here: this was written on CPU), plus the students' one-off compilations (FlexAttention
once per shape: the CE chunk and each pass-key length; the triton mLSTM kernels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from merge_xlstm.eval import longctx, longdocs
from merge_xlstm.io import atomic_file, write_json
from merge_xlstm.linearize.report import format_gates
from merge_xlstm.student import from_teacher
from merge_xlstm.teacher import load_teacher

TEACHER, SWA = "teacher", "swa_only"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR", help="a student to measure")
    parser.add_argument("--output", default="results/longctx-ablation")
    parser.add_argument("--documents", type=int, default=16, help="held-out long documents (at most 20)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens per document (capped by the context)")
    parser.add_argument("--bins", type=int, nargs="+", default=[0, 128, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="positions per forward pass")
    parser.add_argument("--batch-size", type=int, default=4, help="documents per forward pass")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--passkey-trials", type=int, default=10)
    parser.add_argument("--passkey-batch-size", type=int, default=10)
    parser.add_argument("--window", type=int, default=512, help="window of the SWA-only student; in-window CE")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of the SWA-only student")
    parser.add_argument("--recovery-from", type=int, default=1024, help="first bin start with a recovery figure")
    parser.add_argument("--open-gate", type=float, default=0.05, help="a layer's gate is open at this median")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baselines", type=Path, default=None, metavar="ABLATION_JSON",
                        help="take the teacher's and the SWA-only student's rows from this earlier run of the same "
                             "settings (e.g. measured beside the variants' training) instead of measuring them")
    args = parser.parse_args()
    args.variants = dict(v.split("=", 1) for v in args.variant)
    if len(args.variants) != len(args.variant) or any(not k or not d for k, d in args.variants.items()):
        parser.error("--variant takes LABEL=DIR, each label once")
    return args


def measure(model: torch.nn.Module, docs: list[list[int]], tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one model (see the module docstring)."""
    device = torch.device(args.device)
    start = time.monotonic()
    losses = longctx.position_losses(model, docs, chunk_tokens=args.chunk_tokens, batch_size=args.batch_size,
                                     device=device)  # fmt: skip
    passkey = longctx.passkey_accuracy(model, tokenizer, args.passkey_lengths, args.passkey_trials, device=device,
                                       batch_size=args.passkey_batch_size)  # fmt: skip
    keys = ("model_type", "mixer", "window_size", "num_sink_tokens", "memory_layers")
    return {
        "config": {key: getattr(model.config, key, None) for key in keys},
        "ce_by_position": losses.bins(args.bins),
        "in_window_ce": losses.mean(0, args.window),
        "passkey": passkey,
        "output_gate_medians": losses.gates,
        "open_layers": None if losses.gates is None else sum(g is not None and g >= args.open_gate
                                                               for g in losses.gates),
        "seconds": round(time.monotonic() - start, 1),
    }


def markdown(models: dict[str, dict[str, Any]], args: argparse.Namespace, documents: int, length: int) -> str:
    """The issue's table: CE bins, in-window CE, recovery, pass-key, gates; then per-layer gate medians."""
    labels = [longctx.bin_label(b) for b in models[TEACHER]["ce_by_position"]]
    recovered = [longctx.bin_label(r) for r in models[TEACHER]["recovery"]]
    lengths = [str(r["length"]) for r in models[TEACHER]["passkey"]]
    head = ["model", f"CE <{args.window}", *(f"CE {b}" for b in labels), *(f"recovery {b}" for b in recovered),
            *(f"pass-key {n}" for n in lengths), f"gates >= {args.open_gate}"]  # fmt: skip
    lines = [f"Held-out long documents: {documents} x {length} tokens (merge_xlstm.eval.longdocs); pass-key: "
             f"{args.passkey_trials} trials per length; SWA-only: window {args.window}, {args.sinks} sinks.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for label, m in models.items():
        gates = m["output_gate_medians"]
        row = [label, f"{m['in_window_ce']:.3f}", *(f"{b['ce']:.3f}" for b in m["ce_by_position"]),
               *("" if r["recovery"] is None else f"{r['recovery']:.2f}" for r in m["recovery"]),
               *(f"{r['correct']}/{r['trials']}" for r in m["passkey"]),
               "" if gates is None else f"{m['open_layers']}/{sum(g is not None for g in gates)}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    gated = {label: m["output_gate_medians"] for label, m in models.items() if m["output_gate_medians"]}
    if gated:
        lines += ["", "Output-gate median per layer (1 = mLSTM, 0 = SWA):", ""]
        lines += [f"- {label}: " + format_gates(gates) for label, gates in gated.items()]
    return "\n".join(lines) + "\n"


# What the baselines' figures depend on: an earlier run must have used the same.
SAME = ("teacher", "documents", "max_tokens", "bins", "chunk_tokens", "batch_size", "passkey_lengths",
        "passkey_trials", "window", "sinks", "open_gate")


def baselines(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The teacher's and SWA-only rows of an earlier run (--baselines), refused unless its settings match."""
    earlier = json.loads(args.baselines.read_text())
    settings = earlier["settings"] | {"teacher": earlier["teacher"]}
    differ = [key for key in SAME if settings.get(key) != getattr(args, key)]
    if differ:
        raise SystemExit(f"{args.baselines}: measured with other {', '.join(differ)} than this run")
    return {label: earlier["models"][label] for label in (TEACHER, SWA)}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    output = Path(args.output)
    teacher, tokenizer = load_teacher(args.teacher, dtype=longctx.eval_dtype(device), device=device)
    length = min(args.max_tokens, teacher.config.max_position_embeddings)
    docs = longdocs.token_documents(tokenizer, args.documents, length, where="--documents / --max-tokens")
    if args.baselines:
        models = baselines(args)
    else:
        models = {TEACHER: measure(teacher, docs, tokenizer, args)}
        swa = from_teacher(teacher, mixer="swa", window_size=args.window, num_sink_tokens=args.sinks)
        models[SWA] = measure(swa, docs, tokenizer, args)
        del swa
    for label, path in args.variants.items():
        if AutoTokenizer.from_pretrained(path, trust_remote_code=False).get_vocab() != tokenizer.get_vocab():
            raise SystemExit(f"{path}: not the teacher's tokenizer; the documents are the teacher's tokens")
        model = longctx.load_model(path, device)
        models[label] = measure(model, docs, tokenizer, args)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for m in models.values():
        m["recovery"] = longctx.recovery(m["ce_by_position"], models[TEACHER]["ce_by_position"],
                                         models[SWA]["ce_by_position"], start=args.recovery_from)  # fmt: skip
    table = markdown(models, args, len(docs), length)
    settings = {key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items() if key not in ("variant", "variants")}
    write_json(output / "ablation.json", {
        "teacher": args.teacher, "variants": args.variants, "settings": settings, "tokens_per_document": length,
        "documents": [doc.path for doc in longdocs.LONG_DOCUMENTS[: len(docs)]], "models": models,
    })  # fmt: skip
    with atomic_file(output / "ablation.md") as handle:
        handle.write(table)
    longctx.plot_ce_curves({label: m["ce_by_position"] for label, m in models.items()}, output / "ce_by_position.png",
                           title=f"CE by position, {len(docs)} held-out documents")  # fmt: skip
    print(table)
    print(f"wrote {output}/ablation.json, ablation.md, ce_by_position.png")


if __name__ == "__main__":
    main()
