"""What an expert directory tells a person: validation metrics, gate analysis, loss curves, card."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from merge_xlstm.linearize.losses import next_token_mask, sparse_topk_kl
from merge_xlstm.linearize.training import MetricsLog
from merge_xlstm.recipe import LongContextSpec


@torch.no_grad()
def validation_metrics(student: nn.Module, rows: Any, device: torch.device, top_k: int) -> dict[str, float]:
    """Student CE, teacher CE and top-k KL(teacher || student) on held-out rows with stored targets."""
    student.eval()
    ce = nll_teacher = kl = count = 0.0
    for row in range(len(rows)):
        item = {k: v[None].to(device) for k, v in rows[row].items()}
        logits = student(input_ids=item["input_ids"], position_ids=item["position_ids"], use_cache=False).logits
        mask = next_token_mask(item["labels"])
        token_ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), item["input_ids"][:, 1:], reduction="none")
        ce += (token_ce * mask[:, :-1]).sum().item()
        nll_teacher += (item["teacher_nll"] * mask).sum().item()
        kl += (sparse_topk_kl(logits, item["topk_logprobs"], item["topk_indices"]) * mask).sum().item()
        count += mask.sum().item()
    count = max(count, 1.0)
    return {
        "student_ce": ce / count,
        "teacher_ce": nll_teacher / count,
        f"top{top_k}_kl": kl / count,
        "student_ppl": _exp(ce / count),
        "teacher_ppl": _exp(nll_teacher / count),
        "validation_tokens": int(count),
    }


def _exp(x: float) -> float:
    """exp that overflows to inf (written as null in JSON) instead of raising OverflowError."""
    return math.inf if x > 709.0 else math.exp(x)


@contextlib.contextmanager
def output_gates(model: nn.Module) -> Iterator[list[list[Tensor]] | None]:
    """While the block runs, collect every layer's mixing gate o (1 = mLSTM, 0 = SWA) where it decides.

    The student records them itself (``record_gates``: positions beyond its window and sinks); yields
    one list per layer of the tensors of each forward call, or None for a model without gates.
    """
    record = getattr(model, "record_gates", None)
    if record is None:
        yield None
        return
    with record() as gates:
        yield gates


@torch.no_grad()
def output_gate_medians(student: nn.Module, item: dict[str, Tensor], device: torch.device) -> list[float] | None:
    """Per-layer median of the mixing gate o (1 = mLSTM, 0 = SWA) on one validation row (paper A's analysis),
    over the positions beyond the window and sinks, where the gate decides anything."""
    with output_gates(student) as gates:
        if gates is None:
            return None
        student(input_ids=item["input_ids"][None].to(device), position_ids=item["position_ids"][None].to(device),
                use_cache=False)  # fmt: skip
    return gate_medians(gates)


def gate_medians(gates: list[list[Tensor] | None]) -> list[float | None] | None:
    """Per-layer median of recorded gates, over every call, token and head together; None for a layer without
    a gate (``student.memory_layers``), and None altogether if no position was recorded."""
    values = [None if layer is None else torch.cat([g.flatten() for g in layer]) for layer in gates]
    if any(v is not None and not v.numel() for v in values):
        return None
    return [None if v is None else v.median().item() for v in values]


def format_gates(medians: list[float | None], spec: str = ".2g") -> str:
    """Gate medians in one line, "-" for a layer without a gate."""
    return " ".join("-" if g is None else format(g, spec) for g in medians)


@torch.no_grad()
def long_context_report(
    student: nn.Module, tokenizer: Any, spec: LongContextSpec, *, teacher: str, device: torch.device
) -> dict[str, Any] | None:
    """CE by position and pass-key accuracy of the expert, its teacher and the SWA-only student (issue 12).

    The SWA-only student (hybrid experts only) is the teacher converted with the expert's window and
    sinks and no memory: the recovery per bin says how much of the teacher's gain over it the expert
    keeps. Measured as `merge-xlstm eval --suite longctx` measures (`merge_xlstm.eval.longctx`), on a
    budget the recipe's ``longctx`` section sets; on GPUs under bf16 autocast. None when it is off.
    """
    from merge_xlstm.eval import longctx, longdocs
    from merge_xlstm.eval.suites import passkey
    from merge_xlstm.student import from_teacher
    from merge_xlstm.teacher import load_teacher

    if not spec.ce.documents and not spec.passkey_trials:
        return None
    reference, _ = load_teacher(teacher, dtype=longctx.eval_dtype(device), device=device)
    models = {"expert": student.eval(), "teacher": reference}
    window = getattr(student.config, "window_size", None)
    if window is not None:
        models["swa_only"] = from_teacher(reference, mixer="swa", window_size=window,
                                          num_sink_tokens=student.config.num_sink_tokens)  # fmt: skip
    report: dict[str, Any] = {"settings": spec.model_dump()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if spec.ce.documents:
            length = min(spec.ce.max_tokens, passkey.context_length(student.config) or spec.ce.max_tokens)
            docs = longdocs.token_documents(tokenizer, spec.ce.documents, length, where="longctx.ce.documents")
            losses = {name: longctx.position_losses(model, docs, chunk_tokens=spec.ce.chunk_tokens,
                                                    batch_size=spec.ce.batch_size, device=device,
                                                    desc=f"CE by position ({name})")
                      for name, model in models.items()}  # fmt: skip
            bins = {name: loss.bins(spec.ce.bins) for name, loss in losses.items()}
            report["ce_by_position"] = {
                "documents": [doc.path for doc in longdocs.LONG_DOCUMENTS[: spec.ce.documents]],
                "tokens_per_document": length, **bins,
            }  # fmt: skip
            report["output_gate_medians"] = losses["expert"].gates  # on the long documents
            if "swa_only" in bins:
                report["recovery"] = longctx.recovery(bins["expert"], bins["teacher"], bins["swa_only"],
                                                      start=spec.recovery_from)  # fmt: skip
        if spec.passkey_trials:
            report["passkey"] = {
                name: longctx.passkey_accuracy(models[name], tokenizer, spec.passkey_lengths, spec.passkey_trials,
                                               device=device, batch_size=spec.ce.batch_size)
                for name in ("expert", "teacher")
            }  # fmt: skip
    return report


def _long_context_card(report: dict[str, Any]) -> list[str]:
    """The card's section for :func:`long_context_report`: a table of bins, a line of pass-key scores."""
    from merge_xlstm.eval.longctx import bin_label

    lines = ["", "## Long context (held-out long documents of merge_xlstm.eval.longdocs; pass-key retrieval)"]
    ce = report.get("ce_by_position")
    if ce:
        names = [name for name in ("expert", "teacher", "swa_only") if name in ce]
        recovery = {r["start"]: r["recovery"] for r in report.get("recovery", [])}
        lines += ["", f"Mean cross-entropy by position, {len(ce['documents'])} documents of "
                  f"{ce['tokens_per_document']} tokens (recovery: share of the teacher's gain over SWA-only kept)", "",
                  "| positions | " + " | ".join(f"{n} CE" for n in names) + " | recovery |",
                  "|---" * (len(names) + 2) + "|"]  # fmt: skip
        for i, entry in enumerate(ce["expert"]):
            share = recovery.get(entry["start"])
            lines.append(f"| {bin_label(entry)} | " + " | ".join(f"{ce[n][i]['ce']:.3f}" for n in names)
                         + f" | {'' if share is None else f'{share:.2f}'} |")  # fmt: skip
    for name, results in report.get("passkey", {}).items():
        scores = ", ".join(f"{r['correct']}/{r['trials']} at {r['tokens']} tokens" for r in results)
        lines += ["", f"Pass-key retrieval, {name}: {scores}"]
    return lines


def plot_losses(metrics: Path, png: Path) -> None:
    """Loss curves of every stage in `metrics.jsonl`, one panel per stage, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics)
    stages = sorted({r["stage"] for r in rows})
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        mine = [r for r in rows if r["stage"] == stage]
        tokens = [r["tokens"] for r in mine]
        ax.plot(tokens, [r["loss"] for r in mine], label="loss")
        for part in ("ce", "kl"):
            if part in mine[0]:
                ax.plot(tokens, [r[part] for r in mine], label=part)
        ax.set_title(stage)
        ax.set_xlabel("tokens")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def model_card(
    *, name: str, recipe: dict[str, Any], provenance: dict[str, Any], metrics: dict[str, Any], gates: list[float] | None
) -> str:
    """The expert's README.md: what it is, where it came from, how well it matches its teacher."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge-xlstm, xlstm, distillation, linearization]",
        f"base_model: {recipe['teacher']}",
        "---",
        f"# {name}: a merge-xlstm {recipe['student'].get('kind', 'hybrid')} student of {recipe['teacher']}",
        "",
        "Load with `import merge_xlstm.student` first (it registers the model type), then "
        "`AutoModelForCausalLM.from_pretrained(<this dir>)`.",
        "",
        "## Provenance",
        f"- seed: `{provenance.get('seed_path')}` (seed_id `{provenance.get('seed_id')}`)",
        f"- stage I tokens: {provenance.get('tokens', {}).get('stage1')}; stage II tokens: "
        f"{provenance.get('tokens', {}).get('stage2')}",
        *(["- stage I did not run for this expert: the seed already existed and was reused; the recipe below "
           "shows the seed's own stage-I settings (from its merge_xlstm.json)"] if provenance.get("seed_reused") else []),
        "",
        "## Validation (held-out packed rows of the recipe's data)",
        *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()],
    ]
    if gates:
        lines += ["", "## Output-gate medians per layer (1 = mLSTM, 0 = SWA)", "",
                  format_gates(gates)]
    if provenance.get("long_context"):
        lines += _long_context_card(provenance["long_context"])
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
