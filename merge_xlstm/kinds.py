"""Student kinds: one object per kind, everything the pipeline asks about a student.

A kind is its recipe's ``student:`` schema (a pydantic class, whose field defaults are the only place
the kind's defaults are written), plus class-level answers: which builder makes it from a teacher,
which stage-II loss trains it, whether it has a stage I (hidden-state alignment) and whether stage II
takes the Delta schedule. Whether it trains from the teacher's top-k targets follows from its loss
(``Stage2Loss.needs_teacher``). The pipeline, the recipe and the stages ask the kind; none of them
tests a kind's name. A new kind is one class here, registered in ``STUDENT_KINDS``.

This module is light (pydantic only): recipes are read without torch. What needs torch (the builder,
the loss registry) is imported when it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from merge_xlstm.registry import Registry

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class StudentKind(Strict):
    """What every kind answers; subclasses are the recipe's ``student:`` sections."""

    kind: str
    builder: ClassVar[str]  # "module:function" building the student: function(teacher, **options)
    loss: ClassVar[str]  # the stage-II loss, an entry of linearize.losses.LOSSES
    has_stage1: ClassVar[bool]
    delta_schedule: ClassVar[bool] = False  # stage2.distil (paper B's annealing) applies

    def options(self) -> dict[str, Any]:
        """The builder's keyword arguments: this section's fields but the kind's name."""
        return self.model_dump(exclude={"kind"})

    def build(self, teacher: PreTrainedModel) -> PreTrainedModel:
        module, name = self.builder.split(":")
        return getattr(importlib.import_module(module), name)(teacher, **self.options())

    def trains_from_targets(self) -> bool:
        """Whether stage II reads the teacher's top-k targets (stored or online) instead of a live teacher."""
        from merge_xlstm.linearize.stage2 import LOSSES  # every loss registered (torch: imported on use)

        return not LOSSES.get(self.loss).needs_teacher

    def new_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the teacher did not have: what stage I trains, and what LoRA leaves fully trainable."""
        from merge_xlstm.student import new_parameters

        return new_parameters(model)

    def fit_stage1_loss(self, loss: Any) -> None:
        """Adjust (or refuse) stage I's loss terms for this student; `loss` is a recipe's Stage1Loss."""

    def check_teacher(self, config: dict[str, Any]) -> None:
        """Refuse (ValueError naming the field) options this teacher's `config` (its config.json) cannot take."""


STUDENT_KINDS: Registry[type[StudentKind]] = Registry("student kind")


@STUDENT_KINDS.register("hybrid")
class HybridStudent(StudentKind):
    """The xLSTM + sliding-window-attention student of paper A (REFERENCE.md §1)."""

    builder: ClassVar[str] = "merge_xlstm.student:build_hybrid"
    loss: ClassVar[str] = "sparse_kd"
    has_stage1: ClassVar[bool] = True

    kind: Literal["hybrid"] = "hybrid"
    mixer: Literal["hybrid", "mlstm", "swa"] = "hybrid"
    window_size: int = Field(512, ge=1, description="SWA window W in tokens (keys t-W+1..t).")
    num_sink_tokens: int = Field(4, ge=0, description="First tokens of each document every query also sees.")
    feature_dim: int | None = Field(
        None, ge=1, description="Size of the softmax feature map phi per head; default: the head dim."
    )
    mlstm_rope: bool = Field(
        False, description="Feed RoPE-rotated q/k to the mLSTM branch (SWA always uses RoPE)."
    )
    memory_outside_window: bool = Field(
        True, description="Mix the mLSTM in only where the window no longer covers the document (SWA is exact there)."
    )
    forget_bias: tuple[float, float] = Field(
        (3.0, 6.0), description="Initial forget-gate biases, spread linearly over the heads (memory length)."
    )
    memory_keys: Literal["all", "evicted"] = Field(
        "evicted", description="What the mLSTM state holds: only the keys the window has let go, positions "
        "sinks..t-W (evicted: window and memory see disjoint keys, the split of the teacher's attention that "
        "stage I's gate and memory terms teach), or every key of the document (all). Evicted is the default "
        "because it recovered more of the teacher's long-context gain in every bin from 1K to 8K at 16M "
        "stage-I tokens (docs/results, issue 12's ablation). A mixer without both branches, or without "
        "memory_outside_window, falls back to all."
    )

    memory_layers: list[int] | None = Field(
        None, description="The layers (0-based) whose mixer has the mLSTM memory and the gate; the others are "
        "SWA only (no memory, no new parameters, nothing to compute for it). None: every layer. Where a "
        "teacher's long-context gain lives is measured by bench/layer_reach.py (issue 12: SmolLM2's lives in "
        "layers 11-29); a layer without memory is also a layer without the memory's cost (issue 11)."
    )

    @model_validator(mode="after")
    def _memory_layers_distinct(self) -> HybridStudent:
        layers = self.memory_layers
        if layers is not None and (not layers or min(layers) < 0 or len(set(layers)) != len(layers)):
            raise ValueError(f"memory_layers: expected distinct layer indices >= 0 (at least one; for none, "
                             f"mixer swa), got {layers}")
        return self

    @model_validator(mode="after")
    def _evicted_needs_the_window(self) -> HybridStudent:
        if self.memory_keys == "evicted" and not (self.mixer == "hybrid" and self.memory_outside_window):
            if "memory_keys" in self.model_fields_set:  # asked for: refuse; the default: fall back
                raise ValueError("memory_keys evicted: needs mixer hybrid and memory_outside_window true")
            self.memory_keys = "all"
        return self

    def check_teacher(self, config: dict[str, Any]) -> None:
        check_memory_layers(self.memory_layers, config.get("num_hidden_layers"))

    def fit_stage1_loss(self, loss: Any) -> None:
        if self.mixer == "hybrid":
            return
        # Every term but paper A's output term needs both branches and a gate: refuse them when asked for,
        # else switch them off.
        split = [t for t in type(loss).model_fields if t != "output"]
        asked = [t for t in split if t in loss.model_fields_set and getattr(loss, t) > 0]
        if asked:
            raise ValueError(f"stage1.loss.{asked[0]}: needs student.mixer hybrid (both branches and a "
                             f"gate), got {self.mixer!r}; set it to 0")
        for term in split:
            setattr(loss, term, 0.0)


def check_memory_layers(memory_layers: list[int] | None, num_layers: int | None) -> None:
    """Memory layers must be layers of the teacher (the recipe's preflight and the model config both ask)."""
    outside = [i for i in memory_layers or [] if num_layers is not None and i >= num_layers]
    if outside:
        raise ValueError(f"memory_layers: the teacher has {num_layers} layers (0..{num_layers - 1}), got {outside}")


def check_slstm_at(slstm_at: list[int], num_blocks: int) -> None:
    """sLSTM positions must name blocks of the stack (the recipe and the model config both ask)."""
    bad = [i for i in slstm_at if not 0 <= i < num_blocks]
    if bad:
        raise ValueError(f"slstm_at entries must lie in [0, {num_blocks}), got {bad}")


@STUDENT_KINDS.register("distil_xlstm")
class DistilXLSTMStudent(StudentKind):
    """The Distil-xLSTM student of paper B (REFERENCE.md §5): a fresh xLSTM block stack."""

    builder: ClassVar[str] = "merge_xlstm.student.modeling_distil_xlstm:build_distil_xlstm"
    loss: ClassVar[str] = "delta_distil"
    has_stage1: ClassVar[bool] = False
    delta_schedule: ClassVar[bool] = True

    kind: Literal["distil_xlstm"]
    num_blocks: int = Field(6, ge=1)
    slstm_at: list[int] = Field(default_factory=lambda: [0, 2, 4])
    num_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _slstm_in_range(self) -> DistilXLSTMStudent:
        check_slstm_at(self.slstm_at, self.num_blocks)
        return self


def student_kind(kind: str, **options: Any) -> StudentKind:
    """The `kind` section with `options` (a recipe's ``student:`` fields), defaults filled in from its schema.

    Options that only other kinds have are ignored, so one set of options can serve several kinds (as
    the builders always allowed); an option no kind has is refused.
    """
    schema = STUDENT_KINDS.get(kind)
    others = {field for name in STUDENT_KINDS if name != kind for field in STUDENT_KINDS.get(name).model_fields}
    own = {key: value for key, value in options.items() if key in schema.model_fields or key not in others}
    return schema.model_validate({**own, "kind": kind})
