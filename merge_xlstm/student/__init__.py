"""Students: `from_teacher(teacher, kind=..., **options)` converts a teacher into a student.

A kind is one object of :mod:`merge_xlstm.kinds` (its options' schema and defaults, its builder, its
loss, its stages); this package holds the builders and the models. Importing it registers every
student model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(student_dir)`` works after ``import merge_xlstm.student``
(``import merge_xlstm`` alone stays light, for the command line).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from merge_xlstm.kinds import student_kind
from merge_xlstm.student import modeling_distil_xlstm  # noqa: F401  (registers distil_xlstm with Auto*)
from merge_xlstm.student.families import FAMILIES, supported_family
from merge_xlstm.student.modeling_xlstm_hybrid import HybridMixer, XLSTMHybridConfig, XLSTMHybridForCausalLM

# Config entries that describe the teacher's *class* or its saving, not its architecture.
_NOT_ARCHITECTURE = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}


def from_teacher(teacher: PreTrainedModel, kind: str = "hybrid", **options: Any) -> PreTrainedModel:
    """Build the `kind` student of `teacher`; `options` are the recipe's `student:` fields (the kind's
    schema fills in the rest)."""
    return student_kind(kind, **options).build(teacher)


def build_hybrid(teacher: PreTrainedModel, **options: Any) -> XLSTMHybridForCausalLM:
    """The paper-A student: the teacher's weights (copied) + new mixer parameters (initialised).

    `options` are the hybrid kind's fields (:class:`merge_xlstm.kinds.HybridStudent`: mixer,
    window_size, num_sink_tokens, feature_dim, ...), every one given: the kind holds the defaults. The student is built on the meta
    device and receives copies of the teacher's tensors, so an 8B teacher is not randomly initialised
    a second time; only the new parameters are materialised.
    """
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    config = XLSTMHybridConfig(teacher_family=supported_family(teacher.config.model_type), **options, **fields)
    config.architectures = [XLSTMHybridForCausalLM.__name__]
    param = next(teacher.parameters())
    with torch.device("meta"):
        student = XLSTMHybridForCausalLM(config)
    state = {name: tensor.detach().clone() for name, tensor in teacher.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    new = {
        f"model.layers.{i}.self_attn.{name}"
        for i, layer in enumerate(student.model.layers)
        for name in (n for n, _ in layer.self_attn.named_parameters() if n.split(".")[0] in layer.self_attn.new_parameter_names())
    }
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - new - tied:
        raise ValueError(f"teacher/student mismatch: missing {sorted(set(missing) - new - tied)}, unexpected {unexpected}")
    _materialize(student, device=param.device, dtype=param.dtype)
    if config.tie_word_embeddings:
        student.lm_head.weight = student.model.embed_tokens.weight
    return student.train(teacher.training)


def _materialize(model: PreTrainedModel, *, device: torch.device, dtype: torch.dtype) -> None:
    """Give meta parameters real storage, initialise them, and rebuild the (non-persistent) RoPE buffers."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), p.requires_grad))
    for module in model.modules():
        if isinstance(module, HybridMixer):
            module.reset_new_parameters()
    family = FAMILIES.get(model.config.teacher_family)
    with torch.device(device):
        model.model.rotary_emb = family.rotary(model.config.teacher_config())


def output_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The hybrid mixers' output gates o (stage I may step them at a smaller learning rate)."""
    return [p for m in model.modules() if isinstance(m, HybridMixer) and hasattr(m, "ogate") for p in m.ogate.parameters()]


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the teacher did not have (what stage I trains)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, HybridMixer)
        for name, p in m.named_parameters()
        if name.split(".")[0] in m.new_parameter_names()
    ]
