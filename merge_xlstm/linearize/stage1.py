"""Stage I: align every mixer with the teacher's attention, layer-locally (REFERENCE.md §2).

Per layer l and position t the paper minimises ||h_t^(l) - ĥ_t^(l)||², the teacher attention module's
output (after o_proj, what enters the residual stream) against the student mixer's output on the
*teacher's* mixer input (the ``output`` term). Layer-local training is cheaper than running the
student stack (one teacher pass feeds all layers, no student MLPs run) and keeps layers from chasing
each other's errors. Only the new mixer parameters train; the teacher-copied q/k/v/o stay frozen.

Why more than the output term (issue 12, measured in docs/longctx.md): with a 512-token window the
SWA branch reproduces the teacher's attention exactly wherever the window covers the document and
nearly so elsewhere, so the output loss alone is minimised fastest by closing the gate (o -> 0);
once the sigmoid saturates, neither the gate nor the mLSTM branch receives gradient and the memory
is dead. The teacher's attention, however, splits *exactly* into the window part and the rest:

    A_t = a_t · SWA_t + (1 - a_t) · O_t,    a_t = the softmax mass on the window (and sinks),

which is the student's form with o_t = 1 - a_t and mLSTM_t = O_t. The ``gate`` term teaches o the
teacher's beyond-window mass (binary KL against 1 - a), the ``memory`` term teaches the
mLSTM branch the beyond-window part with the gate held at the teacher's value
(||(1 - a)·mLSTM + a·SWA - A||² per head), ``memory_share`` the same with each position's error weighted
by 1 - a instead of (1 - a)², and ``attention_transfer`` the memory's weights over its keys against the
teacher's attention weights beyond the window, at a sample of queries. All but ``output`` need the
teacher's attention per head, which the student computes from its own (teacher-copied, frozen) q, k, v. Every term is a registry entry;
the recipe weighs them (``stage1.loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from merge_xlstm.linearize.training import num_steps, train_loop, warmup_cosine
from merge_xlstm.recipe import LinearizeRecipe, Stage1Spec
from merge_xlstm.registry import Registry
from merge_xlstm.student import new_parameters, output_gate_parameters
from merge_xlstm.student.modeling_xlstm_hybrid import MixerParts


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


@dataclass
class LayerAlignment:
    """One layer's stage-I quantities, what the loss terms read."""

    output: Tensor  # (B, T, hidden) the mixer's output
    target: Tensor  # (B, T, hidden) the teacher attention module's output
    parts: MixerParts
    valid: Tensor  # (B, T) real tokens
    reference: Tensor | None = None  # (B, H, T, D) the teacher's attention per head (full causal, same q/k/v)
    beyond: Tensor | None = None  # (B, H, T) the teacher's attention mass beyond the window and sinks: 1 - a
    # at n query positions `rows`: the teacher's weights over the keys beyond the window and the memory's over
    # its keys, log-probabilities (B, H, n, T) (-inf: no weight), and the rows (n,)
    attention: tuple[Tensor, Tensor, Tensor] | None = None


@dataclass(frozen=True)
class Term:
    """A stage-I loss term: ``fn(layer) -> scalar``; ``needs_reference`` asks for the teacher's full attention."""

    fn: Callable[[LayerAlignment], Tensor]
    needs_reference: bool = False
    needs_weights: bool = False  # the attention weights at sampled queries (LayerAlignment.attention)
    # Reads both branches and the gate: 0 in a layer that has the window alone (student.memory_layers)
    needs_gate: bool = False

    def __call__(self, layer: LayerAlignment) -> Tensor:
        if self.needs_gate and layer.parts.o is None:
            return layer.output.sum() * 0  # zero, in the graph: every layer's row has every term
        return self.fn(layer)


STAGE1_TERMS: Registry[Term] = Registry("stage-1 loss term")


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of `values` (B, H, T[, ...]) over the positions `valid` (B, T)."""
    weight = valid[:, None, :].to(values.dtype)
    while weight.dim() < values.dim():
        weight = weight[..., None]
    return (values * weight).sum() / (weight.expand_as(values).sum()).clamp_min(1)


STAGE1_TERMS.register("output")(Term(lambda a: F.mse_loss(a.output.float(), a.target.float())))
def binary_kl(target: Tensor, prob: Tensor, eps: float = 1e-6) -> Tensor:
    """KL(Bernoulli(target) || Bernoulli(prob)) elementwise: cross-entropy minus the target's entropy, so 0 at prob = target."""
    t, p = target.clamp(eps, 1 - eps), prob.clamp(eps, 1 - eps)
    return t * (t.log() - p.log()) + (1 - t) * ((1 - t).log() - (1 - p).log())


STAGE1_TERMS.register("gate")(Term(
    lambda a: _masked_mean(binary_kl(a.beyond, a.parts.o[..., 0].float()), a.valid), needs_reference=True,
    needs_gate=True,
))
STAGE1_TERMS.register("memory")(Term(
    lambda a: _masked_mean(
        (torch.lerp(a.parts.swa.float(), a.parts.mlstm.float(), a.beyond[..., None]) - a.reference).square(), a.valid
    ),
    needs_reference=True,
    needs_gate=True,
))

# Below this share b of the teacher's attention beyond the window, the beyond part is too small to pin down
# the mLSTM's target (its error is the residual over b): memory_share's weight stops growing there.
MIN_SHARE = 0.01


def _memory_share(a: LayerAlignment) -> Tensor:
    """The memory term's error with each position weighted by b instead of b².

    The residual lerp(SWA, mLSTM, b) - A is b·(mLSTM - O), O the teacher's attention over the keys beyond
    the window, so ``memory`` weighs the mLSTM's error by b²: with b ~ 0.05 in most heads the branch barely
    learns O. This term is sum ||r||²/b over sum b, each position's ||mLSTM - O||² weighted by its share b.
    """
    residual = (torch.lerp(a.parts.swa.float(), a.parts.mlstm.float(), a.beyond[..., None]) - a.reference)
    weight = a.valid[:, None, :].float()
    share = (residual.square().mean(-1) / a.beyond.clamp_min(MIN_SHARE) * weight).sum()
    return share / (a.beyond * weight).sum().clamp_min(1e-6)


STAGE1_TERMS.register("memory_share")(Term(_memory_share, needs_reference=True, needs_gate=True))


def _attention_transfer(a: LayerAlignment) -> Tensor:
    """KL(teacher's attention beyond the window || memory's weights) at the sampled queries, weighted by b.

    The output terms see the memory only through its output, a D-dimensional average. This compares what
    it attends to, key by key (attention transfer, as Hedgehog trains its feature maps), with the teacher's
    attention over the same keys: the keys the window no longer sees. Each query counts by its share b.
    """
    if a.attention is None:  # no query past the window in these rows
        return a.output.sum() * 0
    teacher, memory, rows = a.attention
    p = teacher.exp()
    held = p > 0  # where the teacher attends, the memory holds the key (evicted keys or every key)
    kl = (p * (torch.where(held, teacher, 0) - torch.where(held, memory, 0))).sum(-1)  # (B, H, n)
    weight = a.beyond[:, :, rows] * a.valid[:, None, rows]
    return (kl * weight).sum() / weight.sum().clamp_min(1e-6)


STAGE1_TERMS.register("attention_transfer")(
    Term(_attention_transfer, needs_reference=True, needs_weights=True, needs_gate=True)
)


class MixerAlignment(nn.Module):
    """The student's mixers as one module computing stage I's loss terms, so DDP sees one forward."""

    def __init__(self, student: nn.Module, weights: dict[str, float], weight_queries: int = 0) -> None:
        super().__init__()
        self.student = student
        self.terms = {name: STAGE1_TERMS.get(name) for name, w in weights.items() if w > 0}
        self.weights = torch.tensor([weights[name] for name in self.terms])
        self.weight_queries = weight_queries if any(t.needs_weights for t in self.terms.values()) else 0

    def forward(self, mixer_inputs: list[Tensor], targets: list[Tensor], position_ids: Tensor) -> Tensor:
        """(layers, terms): every layer's value of every weighted term."""
        reference = any(term.needs_reference for term in self.terms.values())
        rows = []
        layers = self.student.model.align_layers(
            mixer_inputs, position_ids, reference=reference, weight_queries=self.weight_queries
        )
        for layer in layers:
            layer = LayerAlignment(target=targets[len(rows)], **layer)
            rows.append(torch.stack([term(layer) for term in self.terms.values()]))
        return torch.stack(rows)


@dataclass(frozen=True)
class Stage1Job:
    """What stage I reads of a recipe (its own section, the packed row length) and the counts that follow."""

    spec: Stage1Spec
    seq_len: int

    @classmethod
    def of(cls, recipe: LinearizeRecipe) -> Stage1Job:
        if recipe.stage1 is None:
            raise ValueError(f"student kind {recipe.student.kind} has no stage I")
        return cls(recipe.stage1, recipe.data.seq_len)

    @property
    def steps(self) -> int:
        return num_steps(self.spec, self.seq_len)

    @property
    def rows(self) -> int:
        """Packed rows stage I reads."""
        return self.steps * self.spec.batch_size

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


def run_stage1(
    job: Stage1Job,
    *,
    teacher: nn.Module,
    student: nn.Module,
    dataset: Any,
    accelerator: Accelerator,
    work_dir: Path,
) -> int:
    """Train the student's new mixer parameters in place; resumable from `work_dir`. Returns the tokens trained on."""
    spec, seq_len = job.spec, job.seq_len
    for p in student.parameters():
        p.requires_grad_(False)
    trainable = new_parameters(student)
    for p in trainable:
        p.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": trainable}]  # one group: checkpoints from before the option resume
    if spec.gate_lr_scale != 1.0:
        gates = {id(p) for p in output_gate_parameters(student)}
        groups = [{"params": [p for p in trainable if id(p) not in gates]},
                  {"params": [p for p in trainable if id(p) in gates], "lr_scale": spec.gate_lr_scale}]
        groups = [g for g in groups if g["params"]]  # an mLSTM-only mixer has no output gate
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    alignment = MixerAlignment(student, spec.loss.model_dump(), spec.attention_queries)
    aligner, optimizer = accelerator.prepare(alignment, optimizer)
    taps = TeacherAttentionTaps(teacher)
    total = job.steps
    names = list(alignment.terms)

    def step_fn(batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        inputs, targets = taps(batch)
        per_layer = aligner([x.to(torch.float32) for x in inputs], targets, batch["position_ids"])  # (L, terms)
        values = per_layer.detach().tolist()  # one device sync, not one per layer and term
        parts = {f"{name}_l{l}": row[j] for l, row in enumerate(values) for j, name in enumerate(names)}
        parts |= {name: sum(row[j] for row in values) for j, name in enumerate(names)}
        return (per_layer * alignment.weights.to(per_layer.device)).sum(), parts

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
    return job.tokens
