"""Students: `from_teacher(teacher, kind=..., **options)` converts a teacher into a student.

Importing this package registers every student model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(student_dir)`` works after ``import merge_xlstm.student``
(``import merge_xlstm`` alone stays light, for the command line).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry
from merge_xlstm.student.families import FAMILIES
from merge_xlstm.student.modeling_distil_xlstm import build_distil_xlstm
from merge_xlstm.student.modeling_xlstm_hybrid import HybridMixer, XLSTMHybridConfig, XLSTMHybridForCausalLM

STUDENT_KINDS: Registry[Callable[..., PreTrainedModel]] = Registry("student kind")
STUDENT_KINDS.register("distil_xlstm")(build_distil_xlstm)

# Config entries that describe the teacher's *class* or its saving, not its architecture.
_NOT_ARCHITECTURE = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}


def from_teacher(teacher: PreTrainedModel, kind: str = "hybrid", **options: Any) -> PreTrainedModel:
    """Build the `kind` student of `teacher`; `options` are the recipe's `student:` fields."""
    return STUDENT_KINDS.get(kind)(teacher, **options)


def teacher_family(teacher: PreTrainedModel) -> str:
    family = teacher.config.model_type
    if family not in FAMILIES:
        raise UserError(f"teacher model_type {family!r} is not supported (supported: {', '.join(FAMILIES.names())})")
    return family


@STUDENT_KINDS.register("hybrid")
def build_hybrid(teacher: PreTrainedModel, **options: Any) -> XLSTMHybridForCausalLM:
    """The paper-A student: the teacher's weights (copied) + new mixer parameters (initialised).

    `options` are :class:`XLSTMHybridConfig`'s mixer fields (mixer, window_size, num_sink_tokens,
    feature_dim, ...); what is not given keeps the config's default. The student is built on the meta
    device and receives copies of the teacher's tensors, so an 8B teacher is not randomly initialised
    a second time; only the new parameters are materialised.
    """
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    config = XLSTMHybridConfig(teacher_family=teacher_family(teacher), **options, **fields)
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


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the teacher did not have (what stage I trains)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, HybridMixer)
        for name, p in m.named_parameters()
        if name.split(".")[0] in m.new_parameter_names()
    ]
