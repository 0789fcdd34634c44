"""Stage II: distil the whole student on the domain's data (REFERENCE.md §2 and §5).

The loss is a registry entry the student's kind names (`merge_xlstm.kinds`): `sparse_kd` (paper A:
γ·CE + β·KL on the teacher's stored top-k) for the hybrid student, `delta_distil` (paper B: annealed CE/KL + Frobenius,
with a live teacher) for Distil-xLSTM. Full fine-tuning by default (it beat LoRA in paper A); with
`stage2.lora` the teacher-copied linear layers get LoRA adapters (peft) while the new mixer
parameters still train fully, and the adapters are merged back before saving, so every expert is a
plain student of the same shapes (the condition for merging).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from merge_xlstm.errors import UserError
from merge_xlstm.linearize import distil  # noqa: F401  (registers the delta_distil loss)
from merge_xlstm.linearize.losses import LOSSES
from merge_xlstm.linearize.sharding import plain_model
from merge_xlstm.linearize.training import num_steps, train_loop, warmup_constant
from merge_xlstm.kinds import StudentKind
from merge_xlstm.recipe import LinearizeRecipe, Stage2Spec


@dataclass(frozen=True)
class Stage2Job:
    """What stage II reads of a recipe (its own section, the row length, the student's kind) and its counts.

    The pipeline, preflight and the dry run ask the job for steps, rows and tokens; none recomputes them.
    """

    spec: Stage2Spec
    seq_len: int
    student: StudentKind

    @classmethod
    def of(cls, recipe: LinearizeRecipe) -> Stage2Job:
        return cls(recipe.stage2, recipe.data.seq_len, recipe.student)

    @property
    def epochs(self) -> int:
        """One epoch unless the Delta schedule asks for more; the stage's tokens are split evenly."""
        return self.spec.distil.epochs if self.spec.distil else 1

    @property
    def steps_per_epoch(self) -> int:
        return max(1, num_steps(self.spec, self.seq_len) // self.epochs)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def rows_per_epoch(self) -> int:
        """Packed rows of one epoch (each epoch reads the same rows again)."""
        return self.steps_per_epoch * self.spec.batch_size

    @property
    def tokens(self) -> int:
        """Tokens processed over all epochs."""
        return self.total_steps * self.spec.batch_size * self.seq_len


def stage2_loss(job: Stage2Job, steps_per_epoch: int) -> Any:
    return LOSSES.get(job.student.loss)(job.spec, steps_per_epoch=steps_per_epoch)


def run_stage2(
    job: Stage2Job,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    dataset: Any,
    accelerator: Accelerator,
    work_dir: Path,
) -> tuple[nn.Module, int]:
    """Train `student` (resumable from `work_dir`); return it with any LoRA adapters merged in, and the
    tokens it trained on."""
    spec, seq_len = job.spec, job.seq_len
    per_epoch = job.steps_per_epoch
    total = job.total_steps
    loss_fn = stage2_loss(job, per_epoch)
    model = student
    if spec.lora is not None:
        if accelerator.is_fsdp2:  # the adapters would have to be merged on sharded weights
            raise UserError("LoRA is not supported under FSDP; train with DDP (configs/accelerate/ddp.yaml)",
                            where="stage2.lora")
        from peft import LoraConfig, get_peft_model

        mixer_params = job.student.new_parameters(student)
        config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                            target_modules=spec.lora.target_modules)
        model = get_peft_model(student, config)
        for p in mixer_params:
            p.requires_grad_(True)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]  # norms, biases, gate biases: never decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    train_loop(
        stage="stage2",
        accelerator=accelerator,
        model=wrapped,
        optimizer=optimizer,
        spec=spec,
        total_steps=total,
        lr_at=lambda step: warmup_constant(step, spec.warmup_steps, spec.lr),
        dataset=dataset,
        rows_per_epoch=min(len(dataset), per_epoch * spec.batch_size),
        seq_len=seq_len,
        step_fn=lambda batch, step: loss_fn(wrapped, batch, step=step, teacher=teacher),
        work_dir=work_dir,
    )
    model = plain_model(accelerator, wrapped)  # FSDP: full weights, one plain model per rank
    if spec.lora is not None:
        model = model.merge_and_unload()
    return model.eval(), job.tokens
