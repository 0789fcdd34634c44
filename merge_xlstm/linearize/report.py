"""What an expert directory tells a person: validation metrics, gate analysis, loss curves, card."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from merge_xlstm.linearize.losses import next_token_mask, sparse_topk_kl
from merge_xlstm.linearize.training import MetricsLog


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


@torch.no_grad()
def output_gate_medians(student: nn.Module, item: dict[str, Tensor], device: torch.device) -> list[float] | None:
    """Per-layer median of the mixing gate o (1 = mLSTM, 0 = SWA) on one validation row (paper A's analysis)."""
    gates = [m for name, m in student.named_modules() if name.endswith("self_attn.ogate")]
    if not gates:
        return None
    medians: list[float] = []
    handles = [g.register_forward_hook(lambda m, i, o: medians.append(torch.sigmoid(o.float()).median().item()))
               for g in gates]
    student(input_ids=item["input_ids"][None].to(device), position_ids=item["position_ids"][None].to(device),
            use_cache=False)
    for h in handles:
        h.remove()
    return medians


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
        "Load with `import merge_xlstm` first (it registers the model type), then "
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
                  " ".join(f"{g:.2f}" for g in gates)]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
