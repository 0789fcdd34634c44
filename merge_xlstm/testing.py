"""Tiny random-init teachers for tests and benchmarks (no network, no weights on disk).

They keep every structural feature the conversion must handle: grouped-query attention (4 query
heads sharing 2 KV heads), Qwen2's q/k/v biases, OLMo2's q_norm/k_norm and post-norm layout, and
RoPE. Sizes are small enough that a forward pass on CPU takes milliseconds.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Olmo2Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

FAMILY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "olmo2": Olmo2Config,
}


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A 2-layer, 64-wide config of `family` with GQA (4 query heads, 2 KV heads)."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return FAMILY_CONFIGS[family](**fields)


def tiny_teacher(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-init tiny causal LM of `family` in eval mode, fp32, eager attention."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    if family == "qwen2":  # Qwen2 initialises q/k/v biases to zero; make them matter in tests
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


# ------------------------------------------------------------------------------------ tokenizer
TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# One token per printable ASCII character plus newline: any English/code text round-trips exactly.
TINY_CHARACTERS = ["\n"] + [chr(code) for code in range(32, 127)]
# ChatML-like and short: role marker, content, eos; the generation prompt opens an assistant turn.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """The serialized character-level `tokenizers` model behind :func:`tiny_tokenizer`."""
    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS + TINY_CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return backend.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """An offline character-level tokenizer matching the tiny teachers (103 ids < their vocab of 128).

    Ids 0 pad, 1 bos, 2 eos, 3 unk, 4-6 chat roles, then newline and printable ASCII (anything else is
    unk). Like SmolLM2 and Qwen2 it adds no bos itself. The built model is cached; each call returns a
    fresh wrapper, because callers mutate tokenizers (padding_side, pad_token) and a shared instance
    would leak such changes from one test into the next.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[4:],
        chat_template=TINY_CHAT_TEMPLATE,
    )
