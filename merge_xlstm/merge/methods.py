"""The merge methods a recipe may name: our names -> mergekit methods and the knobs they expose.

The arithmetic is mergekit's (REFERENCE.md §3); an entry here only says which mergekit method runs,
which of its parameters a recipe may set, and which are pinned. Whether a parameter applies to the
whole merge or may differ per expert, and whether a base is required, is read from mergekit's own
method spec, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from mergekit import merge_methods
from mergekit.merge_methods.base import BasePolicy, MergeMethodSpec, ParameterScope

from merge_xlstm.errors import UserError
from merge_xlstm.recipe import MergeRecipe
from merge_xlstm.registry import Registry

Scalar = float | bool


@dataclass(frozen=True)
class MergeMethodInfo:
    """One recipe `method:`: the mergekit method it runs and the parameters a recipe may set."""

    mergekit_name: str
    summary: str  # one line for the model card
    parameters: tuple[str, ...] = ()  # besides each expert's `weight`
    fixed: Mapping[str, Scalar] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def spec(self) -> MergeMethodSpec:
        return merge_methods.get(self.mergekit_name).spec

    @property
    def needs_base(self) -> bool:
        """Task-vector methods merge differences to the base, so the shared seed is required."""
        return self.spec.contract.base is BasePolicy.REQUIRED

    def per_expert(self, name: str) -> bool:
        """Whether `name` may be set per expert (mergekit binds shared parameters once per merge)."""
        return self._param(name).scope is not ParameterScope.SHARED

    def expects_bool(self, name: str) -> bool:
        return self._param(name).value_type is bool

    def _param(self, name: str) -> Any:
        return next(p for p in self.spec.parameters if p.name == name)


METHODS: Registry[MergeMethodInfo] = Registry("merge method")

_TIES = ("lambda", "normalize", "rescale", "int8_mask")
_LINEAR_DELTAS = ("lambda", "normalize", "rescale")

# linear is the paper's convex average: normalisation is pinned so the weights always sum to one.
METHODS.register("linear")(
    MergeMethodInfo("linear", "convex combination sum_i (w_i / sum_j w_j) theta_i", fixed={"normalize": True})
)
METHODS.register("task_arithmetic")(
    MergeMethodInfo("task_arithmetic", "theta_0 + lambda * sum_i w_i (theta_i - theta_0)", ("lambda", "normalize"))
)
METHODS.register("ties")(
    MergeMethodInfo("ties", "TIES: magnitude-pruned task vectors, sign consensus", (*_TIES, "density"))
)
METHODS.register("dare_ties")(
    MergeMethodInfo("dare_ties", "DARE: randomly dropped, rescaled task vectors, sign consensus", (*_TIES, "density"))
)
METHODS.register("dare_linear")(
    MergeMethodInfo("dare_linear", "DARE: randomly dropped, rescaled task vectors, summed",
                    (*_LINEAR_DELTAS, "density"))
)
METHODS.register("breadcrumbs")(
    MergeMethodInfo("breadcrumbs", "Model Breadcrumbs: task vectors without small and outlier entries",
                    (*_LINEAR_DELTAS, "density", "gamma"))
)
METHODS.register("breadcrumbs_ties")(
    MergeMethodInfo("breadcrumbs_ties", "Model Breadcrumbs with TIES sign consensus", (*_TIES, "density", "gamma"))
)
METHODS.register("della")(
    MergeMethodInfo("della", "DELLA: magnitude-ranked random pruning, sign consensus", (*_TIES, "density", "epsilon"))
)
METHODS.register("della_linear")(
    MergeMethodInfo("della_linear", "DELLA: magnitude-ranked random pruning, summed",
                    (*_LINEAR_DELTAS, "density", "epsilon"))
)

# A density outside (0, 1] is always a typo; mergekit would silently keep or drop everything.
_RANGES = {"density": (0.0, 1.0)}


def get_method(name: str, where: str) -> MergeMethodInfo:
    try:
        return METHODS.get(name)
    except KeyError as exc:
        raise UserError(exc.args[0], where=f"{where}: method") from None


def _check(method: MergeMethodInfo, recipe: MergeRecipe, key: str, value: Scalar, where: str) -> None:
    if key == "weight":
        raise UserError("an expert's weight is set as experts[i].weight", where=where)
    if key not in method.parameters:
        known = ", ".join(method.parameters) or "none"
        raise UserError(f"method {recipe.method} takes no parameter {key!r} (known: {known})", where=where)
    if method.expects_bool(key) != isinstance(value, bool):
        raise UserError(f"expected {'true or false' if method.expects_bool(key) else 'a number'}, got {value!r}",
                        where=where)
    low, high = _RANGES.get(key, (float("-inf"), float("inf")))
    if not low < value <= high:
        raise UserError(f"expected a value in ({low:g}, {high:g}], got {value!r}", where=where)


def mergekit_parameters(
    method: MergeMethodInfo, recipe: MergeRecipe, where: str
) -> tuple[dict[str, Scalar], list[dict[str, Scalar]]]:
    """The recipe's method parameters as mergekit's (global, per-expert) settings, validated.

    Unknown names fail with the known ones listed; a parameter mergekit binds once per merge is
    refused under an expert, where mergekit would silently ignore it.
    """
    for key, value in recipe.parameters.items():
        _check(method, recipe, key, value, f"{where}: parameters.{key}")
    for i, expert in enumerate(recipe.experts):
        for key, value in expert.parameters.items():
            spot = f"{where}: experts.{i}.parameters.{key}"
            _check(method, recipe, key, value, spot)
            if not method.per_expert(key):
                raise UserError(f"{key} applies to the whole merge: set it under parameters", where=spot)
    if all(e.weight == 0 for e in recipe.experts):  # weights are >= 0: their sum is zero
        outcome = "returns the base unchanged" if method.needs_base else "is 0/0 (no convex combination)"
        raise UserError(f"every expert's weight is 0, so the merge {outcome}; give an expert a weight above 0",
                        where=f"{where}: experts.*.weight")  # fmt: skip
    if recipe.parameters.get("lambda") == 0:
        raise UserError("lambda 0 scales every task vector away and returns the base unchanged",
                        where=f"{where}: parameters.lambda")  # fmt: skip
    expert_parameters = [{"weight": e.weight, **e.parameters} for e in recipe.experts]
    return {**recipe.parameters, **method.fixed}, expert_parameters
