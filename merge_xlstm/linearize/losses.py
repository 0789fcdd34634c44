"""Stage-II losses, one registry entry each.

A loss owns "how one batch becomes a scalar": it runs the student (and, if it needs one, the live
teacher) on the batch, so the training loop stays the same for every student kind.

Batches are packed rows (see ``merge_xlstm.linearize.data``): ``input_ids``, ``position_ids`` (reset
to 0 at each document start, so neither teacher nor student attends across documents) and
``labels`` (``input_ids`` with -100 at each document's first token, so no position is trained to
predict the next document). Stored teacher targets add ``topk_logprobs`` / ``topk_indices``
(B, T, k): the teacher's next-token distribution at position t, aligned with the logits at t; with
online targets the live teacher supplies them per batch (``merge_xlstm.linearize.targets``).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge_xlstm.linearize.targets import teacher_topk
from merge_xlstm.recipe import Stage2Spec
from merge_xlstm.registry import Registry


class Stage2Loss(Protocol):
    """What the stage-II loop calls; `needs_teacher` asks for a live teacher instead of stored targets."""

    needs_teacher: ClassVar[bool]

    def __init__(self, spec: Stage2Spec, *, steps_per_epoch: int) -> None: ...

    def __call__(
        self, student: nn.Module, batch: dict[str, Tensor], *, step: int, teacher: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, float]]: ...


LOSSES: Registry[type[Stage2Loss]] = Registry("stage-2 loss")


def next_token_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: positions t whose next token t+1 is a trained label (same document, not padding)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def sparse_topk_kl(
    student_logits: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(p_T^(k) || p_S^(k)) per position, both distributions restricted to the teacher's top-k and renormalised.

    Renormalising both sides on the same support makes the KL a proper divergence between two
    distributions over k tokens, zero exactly when the student ranks that support like the teacher,
    independent of the (unstored) teacher tail mass. With temperature T both sides are softened by T
    on the support and the result is scaled by T² (Hinton et al.) so gradients keep their size.
    """
    teacher = F.log_softmax(topk_logprobs.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float().gather(-1, topk_indices.long()) / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1) * temperature**2


@LOSSES.register("sparse_kd")
class SparseKDLoss:
    """γ·CE + β·KL on the teacher's stored top-k support (paper A, stage II), averaged over tokens."""

    needs_teacher: ClassVar[bool] = False

    def __init__(self, spec: Stage2Spec, *, steps_per_epoch: int) -> None:
        self.ce_weight = spec.ce_weight
        self.kl_weight = spec.kl_weight
        self.temperature = spec.temperature
        self.top_k = spec.top_k

    def __call__(
        self, student: nn.Module, batch: dict[str, Tensor], *, step: int, teacher: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        if "topk_logprobs" not in batch:  # online targets (stage2.targets: online): the live teacher's top-k
            batch = {**batch, **teacher_topk(teacher, batch["input_ids"], batch["position_ids"], self.top_k)}
        logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        mask = next_token_mask(batch["labels"])
        n = mask.sum().clamp_min(1)
        targets = batch["labels"][:, 1:]
        ce = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none"
        )
        ce = (ce * mask[:, :-1]).sum() / n
        kl = sparse_topk_kl(logits, batch["topk_logprobs"], batch["topk_indices"], self.temperature)
        kl = (kl * mask).sum() / n
        loss = self.ce_weight * ce + self.kl_weight * kl
        return loss, {"ce": ce.item(), "kl": kl.item()}
