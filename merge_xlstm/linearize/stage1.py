"""Stage I: align every mixer with the teacher's attention, layer-locally (REFERENCE.md §2).

Per layer l and position t we minimise ||h_t^(l) - ĥ_t^(l)||², the teacher attention module's
output (after o_proj, i.e. what enters the residual stream) against the student mixer's output on
the *teacher's* mixer input. Layer-local training is cheaper than running the student stack (one
teacher pass feeds all layers, no student MLPs run) and keeps layers from chasing each other's
errors. Only the new mixer parameters train; the teacher-copied q/k/v/o stay frozen. The loss is
the sum over layers of the mean squared error over positions and channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from merge_xlstm.linearize.training import num_steps, train_loop, warmup_cosine
from merge_xlstm.recipe import LinearizeRecipe
from merge_xlstm.student import new_parameters


class TeacherAttentionTaps:
    """Forward hooks that record each teacher layer's attention input and output."""

    def __init__(self, teacher: nn.Module) -> None:
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.teacher = teacher
        self.handles = [
            layer.self_attn.register_forward_hook(self._record, with_kwargs=True) for layer in teacher.model.layers
        ]

    def _record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self.inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run the teacher on a packed batch (block-diagonal over documents via position_ids)."""
        self.inputs, self.outputs = [], []
        # No attention mask and no cache: transformers then reads document boundaries from position_ids.
        self.teacher.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return self.inputs, self.outputs


class MixerAlignment(nn.Module):
    """The student's mixers as one module, so DDP sees a forward it can synchronise."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, mixer_inputs: list[Tensor], position_ids: Tensor) -> list[Tensor]:
        return self.student.model.mixer_outputs(mixer_inputs, position_ids)


def run_stage1(
    recipe: LinearizeRecipe,
    *,
    teacher: nn.Module,
    student: nn.Module,
    dataset: Any,
    accelerator: Accelerator,
    work_dir: Path,
) -> None:
    """Train the student's new mixer parameters in place; resumable from `work_dir`."""
    spec, seq_len = recipe.stage1, recipe.data.seq_len
    for p in student.parameters():
        p.requires_grad_(False)
    trainable = new_parameters(student)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    aligner, optimizer = accelerator.prepare(MixerAlignment(student), optimizer)
    taps = TeacherAttentionTaps(teacher)
    total = num_steps(spec, seq_len)

    def step_fn(batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        inputs, targets = taps(batch)
        outputs = aligner([x.to(torch.float32) for x in inputs], batch["position_ids"])
        per_layer = torch.stack([F.mse_loss(o.float(), t.float()) for o, t in zip(outputs, targets)])
        parts = {f"mse_l{l}": v for l, v in enumerate(per_layer.tolist())}  # one device sync, not one per layer
        return per_layer.sum(), parts

    train_loop(
        stage="stage1",
        accelerator=accelerator,
        model=aligner,
        optimizer=optimizer,
        spec=spec,
        total_steps=total,
        lr_at=lambda step: warmup_cosine(step, total, spec.warmup_steps, spec.lr, spec.min_lr),
        dataset=dataset,
        rows_per_epoch=len(dataset),
        seq_len=seq_len,
        step_fn=step_fn,
        work_dir=work_dir,
    )
    for handle in taps.handles:
        handle.remove()
    for p in student.parameters():
        p.requires_grad_(True)
