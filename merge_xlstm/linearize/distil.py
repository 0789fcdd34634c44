"""Delta-distillation of paper B (REFERENCE.md §5): the stage-II loss of the ``distil_xlstm`` student.

    L = (1 - a) * CE + a * T² * KL(softmax(z_T / T) || softmax(z_S / T)) + w_F * L_F
    L_F = || mean_l h_T^(l) - h_S ||_F / sqrt(N * D)

with a and T annealed by the Delta schedule (:class:`DeltaSchedule`). Unlike paper A's stage II it
needs the live teacher: the KL runs over the full vocabulary and L_F reads the teacher's hidden states.

Decisions the paper leaves open:

- Positions: CE, KL and L_F all average over the positions whose next token is a trained label
  (``losses.next_token_mask``): the same document, not padding. N in L_F counts those positions
  (it is B * S for an unpadded single-document batch, the paper's normalisation).
- Teacher layers: the mean runs over the outputs of the L decoder layers, ``hidden_states[1:]``
  as transformers returns them (the last one after the final norm). The embedding output is left
  out: it is the frozen embedding the student shares, so it carries nothing to distil (paper B's
  code skips it too).
- Student state: the final hidden state after the student's post-blocks norm, the input of the
  frozen LM head it shares with the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merge_xlstm.errors import UserError
from merge_xlstm.linearize.losses import LOSSES, next_token_mask
from merge_xlstm.recipe import DistilSchedule, Stage2Spec


@dataclass(frozen=True)
class DeltaSchedule:
    """One annealed scalar: within epoch e, at optimiser step k of that epoch,

        x_k = x_final + (x_0 - x_final) / (1 + ln(1 + k))

    so x starts each epoch at its x_0 and decays towards x_final. At each epoch end the restart value
    shrinks, x_0 <- max(x_0 * (1 - delta), x_final): later epochs restart lower, and the max() is a
    floor, so x_0 never goes below x_final and, once there, the schedule stays at x_final. The floor
    only makes sense for a schedule that decreases (paper B: a 0.8 -> 0.5, T 2 -> 1), so
    ``start < end`` is refused.
    """

    start: float
    end: float
    delta: float

    def __post_init__(self) -> None:
        if self.start < self.end:
            raise ValueError(f"the Delta schedule decreases: start {self.start} must be >= end {self.end}")

    def epoch_start(self, epoch: int) -> float:
        """x_0 of epoch ``epoch`` (0-based)."""
        x0 = self.start
        for _ in range(epoch):
            x0 = max(x0 * (1 - self.delta), self.end)
        return x0

    def value(self, step_in_epoch: int, epoch: int) -> float:
        """x at optimiser step ``step_in_epoch`` (0-based) of epoch ``epoch`` (0-based)."""
        x0 = self.epoch_start(epoch)
        return self.end + (x0 - self.end) / (1 + math.log1p(step_in_epoch))


@LOSSES.register("delta_distil")
class DeltaDistilLoss:
    """(1 - a)·CE + a·T²·KL over the full vocabulary + w_F·L_F, a and T on the Delta schedule.

    ``step`` is the 0-based optimiser step of the stage; with ``steps_per_epoch`` it gives the
    epoch and the step within it.
    """

    needs_teacher: ClassVar[bool] = True

    def __init__(self, spec: Stage2Spec, *, steps_per_epoch: int) -> None:
        distil = spec.distil or DistilSchedule()
        try:
            self.alpha = DeltaSchedule(distil.alpha_start, distil.alpha_end, distil.delta)
            self.temperature = DeltaSchedule(distil.temperature_start, distil.temperature_end, distil.delta)
        except ValueError as err:
            raise UserError(str(err), where="stage2.distil") from None
        self.frobenius_weight = distil.frobenius_weight
        self.steps_per_epoch = max(1, steps_per_epoch)

    def schedule(self, step: int) -> tuple[float, float]:
        """(a, T) at optimiser step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.alpha.value(k, epoch), self.temperature.value(k, epoch)

    def __call__(
        self, student: nn.Module, batch: dict[str, Tensor], *, step: int, teacher: nn.Module | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        if teacher is None:
            raise ValueError("delta_distil needs the live teacher")
        alpha, temperature = self.schedule(step)
        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        with torch.no_grad():
            teacher_out = teacher(**inputs, output_hidden_states=True)
        student_out = student(**inputs, output_hidden_states=True)

        mask = next_token_mask(batch["labels"])  # (B, S): position t predicts a trained token t+1
        n = int(mask.sum())
        targets = batch["labels"].roll(-1, dims=1)[mask]  # the token at t+1 for every selected t
        student_logits = student_out.logits[mask].float()  # (N, V): only the positions that count
        teacher_logits = teacher_out.logits[mask].float()
        ce = F.cross_entropy(student_logits, targets, reduction="sum") / max(n, 1)
        kl = F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            log_target=True,
            reduction="sum",
        ) / max(n, 1)

        layers = teacher_out.hidden_states[1:]
        teacher_mean = sum(h[mask].float() for h in layers) / len(layers)
        diff = teacher_mean - student_out.hidden_states[-1][mask].float()
        frobenius = diff.norm() / math.sqrt(max(diff.numel(), 1))

        loss = (1 - alpha) * ce + alpha * temperature**2 * kl + self.frobenius_weight * frobenius
        metrics = {
            "ce": ce.item(),
            "kl": kl.item(),
            "frobenius": frobenius.item(),
            "alpha": alpha,
            "temperature": temperature,
        }
        return loss, metrics
