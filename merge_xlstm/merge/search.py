"""Merge weights chosen on held-out validation rows instead of by hand sweeps (REFERENCE.md §3).

Three registries, each entry a few lines:

- COMBINE: how a candidate merge is computed in memory from the experts' state dicts, exactly as
  mergekit computes the same method (``linear``: sum_i w_i theta_i / sum_i w_i; ``task_arithmetic``:
  theta_0 + lambda sum_i w_i (theta_i - theta_0)). A candidate is written into one model's parameters
  in place, so scoring it costs a forward pass over the validation rows and no disk.
- OBJECTIVES: what one domain's validation metrics (student CE, top-k KL to the teacher, from
  ``linearize.report.validation_metrics``) are reduced to; the search minimises its mean over domains,
  each domain weighing the same whatever its row count.
- STRATEGIES: how weights are searched on the probability simplex (convex weights) for a given
  objective function. ``coordinate``: from uniform weights, move a share ``step`` of the total weight
  towards or away from one expert at a time, keep what lowers the objective, halve the step when no move
  helps, stop below ``min_step`` or after ``max_evaluations``. Task arithmetic repeats it per scaling.

The validation rows are the domain recipes' held-out documents (``data.validation_fraction``), which
no training step and no evaluation suite reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from merge_xlstm.registry import Registry

StateDict = dict[str, Tensor]


# ------------------------------------------------------------------------------------- combine
Combine = Callable[[Tensor | None, Sequence[Tensor], Sequence[float], float], Tensor]
COMBINE: Registry[Combine] = Registry("searchable merge method")


@COMBINE.register("linear")
def _linear(base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], scale: float) -> Tensor:
    total = sum(weights)
    return sum(w / total * t for w, t in zip(weights, experts))


@COMBINE.register("task_arithmetic")
def _task_arithmetic(base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], scale: float) -> Tensor:
    return base + scale * sum(w * (t - base) for w, t in zip(weights, experts))


class InMemoryMerge:
    """The experts' (and base's) float32 tensors on one device, written as a weighted merge into `model`."""

    def __init__(self, model: nn.Module, method: str, experts: Sequence[StateDict], base: StateDict | None) -> None:
        self.model, self.combine = model, COMBINE.get(method)
        self.params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.experts = [{n: sd[n].to(device, torch.float32) for n in self.params} for sd in experts]
        self.base = {n: base[n].to(device, torch.float32) for n in self.params} if base is not None else None

    @torch.no_grad()
    def apply(self, weights: Sequence[float], scale: float) -> nn.Module:
        for name, param in self.params.items():
            base = self.base[name] if self.base is not None else None
            param.copy_(self.combine(base, [sd[name] for sd in self.experts], weights, scale))
        return self.model


# ------------------------------------------------------------------------------------ objectives
Objective = Callable[[dict[str, float], Any], float]
OBJECTIVES: Registry[Objective] = Registry("search objective")


def _kl(metrics: dict[str, float]) -> float:
    return next(v for k, v in metrics.items() if k.startswith("top") and k.endswith("_kl"))


@OBJECTIVES.register("validation_kl")
def _validation_kl(metrics: dict[str, float], stage2: Any) -> float:
    """Top-k KL(teacher || merged) on the domain's validation rows: closeness to the teacher."""
    return _kl(metrics)


@OBJECTIVES.register("validation_ce")
def _validation_ce(metrics: dict[str, float], stage2: Any) -> float:
    """The merged model's own next-token cross-entropy on the domain's validation rows."""
    return metrics["student_ce"]


@OBJECTIVES.register("validation_loss")
def _validation_loss(metrics: dict[str, float], stage2: Any) -> float:
    """The domain's stage-II loss (ce_weight * CE + kl_weight * KL), what each expert was trained on."""
    return stage2.ce_weight * metrics["student_ce"] + stage2.kl_weight * _kl(metrics)


# ------------------------------------------------------------------------------------ strategies
@dataclass
class Evaluation:
    weights: list[float]
    scale: float
    value: float


@dataclass
class SearchTrace:
    """Every candidate scored, in order; the best is the first with the lowest value."""

    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def best(self) -> Evaluation:
        return min(self.evaluations, key=lambda e: e.value)


Score = Callable[[Sequence[float]], float]
Strategy = Callable[[Score, int, Any], list[float]]
STRATEGIES: Registry[Strategy] = Registry("search strategy")


@STRATEGIES.register("coordinate")
def coordinate_search(score: Score, n: int, spec: Any) -> list[float]:
    """Coordinate moves on the simplex from uniform weights; returns the best weights found."""
    best_w = [1.0 / n] * n
    best = score(best_w)
    evaluations, step = 1, spec.step
    while step >= spec.min_step and evaluations < spec.max_evaluations:
        improved = False
        for i in range(n):
            for move in (_towards, _away):
                candidate = move(best_w, i, step)
                if candidate is None or evaluations >= spec.max_evaluations:
                    continue
                value = score(candidate)
                evaluations += 1
                if value < best:
                    best_w, best, improved = candidate, value, True
        if not improved:
            step /= 2
    return best_w


def _towards(w: list[float], i: int, step: float) -> list[float]:
    """A share `step` of every weight moves to expert i (stays on the simplex)."""
    return [x * (1 - step) + (step if j == i else 0.0) for j, x in enumerate(w)]


def _away(w: list[float], i: int, step: float) -> list[float] | None:
    """Expert i gives up `step` of the total, spread over the others in proportion (None if it has less)."""
    if w[i] < step or math.isclose(w[i], 1.0):
        return None
    rest = 1.0 - w[i]
    return [x - step if j == i else x + step * x / rest for j, x in enumerate(w)]


def search(score: Callable[[Sequence[float], float], float], n: int, spec: Any, scales: Sequence[float]) -> SearchTrace:
    """Run the strategy once per scale; every scored candidate is recorded in the trace."""
    trace = SearchTrace()
    strategy = STRATEGIES.get(spec.strategy)
    for scale in scales:
        def scored(weights: Sequence[float], scale: float = scale) -> float:
            value = score(weights, scale)
            trace.evaluations.append(Evaluation([float(w) for w in weights], scale, value))
            return value

        strategy(scored, n, spec)
    return trace
