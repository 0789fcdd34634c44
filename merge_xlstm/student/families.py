"""Teacher families: what the student needs to know about each transformer family it converts.

The student keeps the teacher's macro-architecture and reuses its modules' *code* (MLP, RMSNorm,
rotary embedding) through these adapters, so its weights load bit-for-bit and its non-attention
computation is the teacher's own. Adding a family is one entry of a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import LlamaConfig, Olmo2Config, PreTrainedConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.olmo2.modeling_olmo2 import Olmo2MLP, Olmo2RMSNorm, Olmo2RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

from merge_xlstm.errors import UserError
from merge_xlstm.registry import Registry


@dataclass(frozen=True)
class Family:
    """How one teacher family is built.

    post_norm: OLMo2 normalises each sublayer's *output* (post_attention_layernorm,
    post_feedforward_layernorm) instead of its input (input_layernorm, post_attention_layernorm).
    qk_norm: OLMo2 RMS-normalises q and k over all heads before RoPE.
    """

    config_class: type[PreTrainedConfig]
    mlp: type[nn.Module]
    norm: type[nn.Module]
    rotary: type[nn.Module]
    post_norm: bool = False
    qk_norm: bool = False

    def qkv_bias(self, config: PreTrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config: PreTrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))


@dataclass(frozen=True)
class Qwen2Family(Family):
    """Qwen2 always has q/k/v biases and never an o_proj bias."""

    def qkv_bias(self, config: PreTrainedConfig) -> bool:
        return True

    def o_bias(self, config: PreTrainedConfig) -> bool:
        return False


FAMILIES: Registry[Family] = Registry("teacher family")
FAMILIES.register("llama")(Family(LlamaConfig, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding))
FAMILIES.register("qwen2")(Qwen2Family(Qwen2Config, Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding))
FAMILIES.register("olmo2")(
    Family(Olmo2Config, Olmo2MLP, Olmo2RMSNorm, Olmo2RotaryEmbedding, post_norm=True, qk_norm=True)
)


def supported_family(model_type: str | None, *, where: str | None = None) -> str:
    """`model_type` if it is a registered family; the one refusal of an unsupported teacher."""
    if model_type not in FAMILIES:
        supported = ", ".join(FAMILIES.names())
        raise UserError(f"teacher model_type {model_type!r} is not supported (supported: {supported})", where=where)
    return model_type
