"""The Distil-xLSTM student of paper B (REFERENCE.md §5), in one file.

A stack of xLSTM blocks from the ``xlstm`` package (mLSTM blocks, and sLSTM blocks at the indices
``slstm_at``), as wide as the teacher, between the teacher's token embedding and LM head, which are
copied and frozen. The blocks start fresh; Delta-distillation (``merge_xlstm.linearize.distil``)
trains them.

How the package's blocks are used, and where this file had to step in:

- Parallel form (training, scoring): each block's own ``forward``. The package's forwards take no
  initial state and no reset signal, so documents are kept apart by *splitting*: every document of
  a packed row (a new one starts wherever ``position_ids`` is 0) and every left-padded row's real
  tokens become a row of their own, right-padded to the longest in its group, and the outputs are
  scattered back. Right padding cannot leak into causal outputs, so this is exact. Documents are
  grouped into power-of-two length buckets, so padding costs at most 2x the real tokens (4x for the
  mLSTM's quadratic parallel form) however unequal the documents are; packed rows of 20-900-token
  documents trained 13% slower than single-document rows (SmolLM2 size, H100).
- Recurrent form (``use_cache=True``, generate): each block's ``step`` one token at a time, prompt
  included. The package's mLSTM layer cannot return its final state from the parallel form, so
  there is no parallel prefill; the prompt costs one step per token (~10 ms per step for a batch of 8
  at SmolLM2 size on an H100). Padding tokens
  (``attention_mask`` 0) leave the state untouched and ``position_ids`` 0 resets it, so a left-padded
  batch decodes like each row alone.
- The mLSTM cell precomputes a ``context_length``² causal mask and silently mis-masks longer inputs;
  it is dropped, so the cell builds the mask per call and any length works.
- The sLSTM cell's CUDA and vanilla backends store their weights in different layouts. Checkpoints
  always hold the vanilla layout; on a GPU :class:`_SLSTMCell` converts the weights and runs the
  package's CUDA kernel (``slstm_backend="auto"``; built by torch on first use, ~30 s, then cached).
  A SmolLM2-size distillation step (teacher included) ran 43x faster with it than with the vanilla
  per-step Python loop on an H100 (26k vs 0.6k tokens/s); in fp32 both agree to 1e-6. Its recurrence
  runs in the activations' dtype; ``slstm_backend="vanilla"`` forces the portable path.
- transformers' generic ``_init_weights`` (normal(0, 0.02) on every Linear) would erase the blocks'
  own initialisation (small/Wang init, forget-gate bias ranges), so it is a no-op here: blocks are
  initialised by the package when built, embedding and head come from the teacher or a checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Cache,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from xlstm import (
    FeedForwardConfig,
    mLSTMBlockConfig,
    mLSTMLayerConfig,
    sLSTMBlockConfig,
    sLSTMLayerConfig,
    xLSTMBlockStack,
    xLSTMBlockStackConfig,
)
from xlstm.blocks.mlstm.cell import mLSTMCell
from xlstm.blocks.slstm.cell import sLSTMCell_vanilla, sLSTMCellFuncGenerator
from xlstm.blocks.slstm.layer import sLSTMLayer

from merge_xlstm.errors import UserError
from merge_xlstm.kinds import DistilXLSTMStudent, check_slstm_at
from merge_xlstm.student.cache import (
    RecurrentGenerationMixin,
    RecurrentLayer,
    RecurrentLayerTypes,
    StaticRecurrentLayer,
    resolve_cache,
)

SLSTMBackend = Literal["auto", "vanilla", "cuda"]
# One block's recurrent state as the package's ``step`` returns it: {"mlstm_state": (C, n, m),
# "conv_state": (window,)} for mLSTM blocks, {"conv_state": (window,), "slstm_state": (4, B, D)} for sLSTM.
BlockState = dict[str, Any]


_KIND_FIELDS = DistilXLSTMStudent.model_fields


class DistilXLSTMConfig(RecurrentLayerTypes, PreTrainedConfig):
    """The block stack's shape (paper B: 6 blocks, sLSTM at 0, 2, 4) plus the teacher's vocabulary.

    ``max_position_embeddings`` is the teacher's: the student has no length limit, but evaluation
    harnesses truncate by it, and teacher and student must see the same context.
    """

    model_type = "distil_xlstm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"num_hidden_layers": "num_blocks"}  # what transformers' caches count layers by
    cache_layer_type = "distil_xlstm"  # every block: DistilXLSTMLayerCache (see RecurrentLayerTypes)

    vocab_size: int = 49152
    hidden_size: int = 576
    # The kind's defaults (merge_xlstm.kinds), also what a saved config.json that omits them means.
    num_blocks: int = _KIND_FIELDS["num_blocks"].default
    slstm_at: list[int] = dataclasses.field(default_factory=_KIND_FIELDS["slstm_at"].default_factory)
    num_heads: int = _KIND_FIELDS["num_heads"].default
    conv1d_kernel_size: int = 4
    mlstm_proj_factor: float = 2.0
    mlstm_qkv_proj_blocksize: int = 4
    slstm_ffn_proj_factor: float = 1.3
    slstm_backend: SLSTMBackend = "auto"
    freeze_embeddings: bool = True
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        check_slstm_at(self.slstm_at, self.num_blocks)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        if self.slstm_backend not in ("auto", "vanilla", "cuda"):
            raise ValueError(f"slstm_backend must be auto, vanilla or cuda, got {self.slstm_backend!r}")
        super().__post_init__(**kwargs)

    def block_stack_config(self) -> xLSTMBlockStackConfig:
        """The ``xlstm`` package's config for this stack (dropout 0, the package's defaults elsewhere)."""
        return xLSTMBlockStackConfig(
            mlstm_block=mLSTMBlockConfig(
                mlstm=mLSTMLayerConfig(
                    conv1d_kernel_size=self.conv1d_kernel_size,
                    qkv_proj_blocksize=self.mlstm_qkv_proj_blocksize,
                    num_heads=self.num_heads,
                    proj_factor=self.mlstm_proj_factor,
                )
            ),
            slstm_block=sLSTMBlockConfig(
                slstm=sLSTMLayerConfig(
                    backend="vanilla",  # the stored layout; see _SLSTMCell for the GPU kernel
                    num_heads=self.num_heads,
                    conv1d_kernel_size=self.conv1d_kernel_size,
                ),
                feedforward=FeedForwardConfig(proj_factor=self.slstm_ffn_proj_factor, act_fn="gelu"),
            ),
            context_length=1,  # the cells' precomputed causal mask is dropped (module docstring)
            num_blocks=self.num_blocks,
            embedding_dim=self.hidden_size,
            slstm_at=list(self.slstm_at),
        )


# ------------------------------------------------------------------------------------ sLSTM cell
class _SLSTMCell(sLSTMCell_vanilla):
    """The package's sLSTM cell with its portable (vanilla) weight layout, run by the CUDA kernel on GPU.

    The kernel is the package's own (``sLSTMCellFuncGenerator``), built for the activations' dtype;
    only the weight and gate layouts are converted on the way in, so gradients reach the stored
    parameters through plain reshapes.
    """

    backend: SLSTMBackend = "auto"
    _kernels: dict[tuple[bool, str, int, int], type[torch.autograd.Function]] = {}  # per process

    def _impl(self, training: bool, input: Tensor, state: Tensor) -> Tensor:
        if self.backend == "vanilla" or (self.backend == "auto" and not input.is_cuda):
            return super()._impl(training, input, state)
        if not input.is_cuda:
            raise RuntimeError("slstm_backend 'cuda' needs the model on a CUDA device")
        cfg = self.config
        S, B = input.shape[:2]
        heads, head_dim, gates = cfg.num_heads, cfg.head_dim, cfg.num_gates
        # Gate pre-activations: vanilla order (gate, head, dim) -> CUDA order (head, gate, dim).
        x = input.view(S, B, gates, heads, head_dim).transpose(2, 3).reshape(S, B, -1)
        recurrent = self._recurrent_kernel_int2ext(self._recurrent_kernel).reshape(heads, head_dim, gates * head_dim)
        bias = self._bias_int2ext(self._bias).reshape(-1)
        kernel = self._kernel(training, input.dtype)
        return kernel.apply(training, x.contiguous(), state.contiguous(), recurrent.contiguous(), bias.contiguous())

    def _kernel(self, training: bool, dtype: torch.dtype) -> type[torch.autograd.Function]:
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        key = (training, name, self.config.hidden_size, self.config.num_heads)
        if key not in self._kernels:
            # dtype_* None: the config's __post_init__ derives them from `dtype` (biases stay float32).
            cfg = dataclasses.replace(
                self.config, backend="cuda", dtype=name, dtype_r=None, dtype_w=None, dtype_g=None, dtype_s=None
            )
            self._kernels[key] = sLSTMCellFuncGenerator(training, cfg)
        return self._kernels[key]


# ----------------------------------------------------------------------------------------- cache
class DistilXLSTMLayerCache(RecurrentLayer):
    """One block's recurrent state (the package's ``step`` state), constant in size.

    Stored flat: ``"mlstm_state.0"`` ... for the tuple entries of the package's state dict, so every
    tensor is one named buffer; the sLSTM state is (4, B, D), batch on dimension 1.
    """

    _layer_type = DistilXLSTMConfig.cache_layer_type

    @property
    def block_state(self) -> BlockState:
        """The state in the package's form, as ``block.step(x, **state)`` takes it ({} before the first token)."""
        state: BlockState = {}
        for name, tensor in self.state.items():
            key, _, idx = name.partition(".")
            if idx:
                state[key] = (*state.get(key, ()), tensor)
            else:
                state[key] = tensor
        return state

    def update_block_state(self, state: BlockState) -> None:
        """Store the state ``step`` returned (in place once allocated)."""
        flat = {}
        for key, value in state.items():
            if isinstance(value, tuple):
                flat |= {f"{key}.{i}": v for i, v in enumerate(value)}
            else:
                flat[key] = value
        if not self.is_initialized:
            self.allocate(flat, {name: 1 for name in flat if name.startswith("slstm_state")})
            return
        for name, value in flat.items():
            if value is not self.state[name]:  # the package updates its conv window in place
                self.state[name].copy_(value)


class DistilXLSTMStaticLayerCache(DistilXLSTMLayerCache, StaticRecurrentLayer):
    """The static form (``cache_implementation="static"``): buffers allocated once, written in place.

    Not compileable: the recurrent form steps through the package's blocks token by token in Python.
    """

    _layer_type = DistilXLSTMConfig.cache_layer_type
    is_compileable = False


def _map_state(fn: Callable[..., Tensor], state: BlockState, *others: BlockState) -> BlockState:
    """Apply ``fn(tensor, batch_dim, *matching tensors)`` to every tensor of a block state."""
    out: BlockState = {}
    for key, value in state.items():
        dim = 1 if key == "slstm_state" else 0  # the sLSTM state is (4, B, D); everything else batch-first
        if isinstance(value, tuple):
            out[key] = tuple(fn(v, dim, *(o[key][i] for o in others)) for i, v in enumerate(value))
        else:
            out[key] = fn(value, dim, *(o[key] for o in others))
    return out


def _pick_rows(rows: Tensor, if_true: BlockState, if_false: BlockState) -> BlockState:
    """Per batch row: ``if_true`` where ``rows``, else ``if_false``."""

    def pick(a: Tensor, dim: int, b: Tensor) -> Tensor:
        shape = [1] * a.dim()
        shape[dim] = -1
        return torch.where(rows.view(shape), a, b)

    return _map_state(pick, if_true, if_false)


def _zeros_like(state: BlockState) -> BlockState:
    """A fresh state: the package's steps start from zeros (C, n, m, conv window and sLSTM state)."""
    return _map_state(lambda t, dim: torch.zeros_like(t), state)


# ----------------------------------------------------------------------------------------- model
class DistilXLSTMPreTrainedModel(PreTrainedModel):
    config_class = DistilXLSTMConfig
    config: DistilXLSTMConfig
    base_model_prefix = "model"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: see the module docstring (the package initialises the blocks when it builds them)."""


class DistilXLSTMModel(DistilXLSTMPreTrainedModel):
    """Embedding -> xLSTM block stack (with its post-blocks LayerNorm); returns every block's output."""

    def __init__(self, config: DistilXLSTMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.blocks = xLSTMBlockStack(config.block_stack_config())
        for module in self.blocks.modules():
            if isinstance(module, mLSTMCell):
                module.register_buffer("causal_mask", None, persistent=False)
            if isinstance(module, sLSTMLayer):
                module.slstm_cell = _SLSTMCell(module.config)
        self.set_slstm_backend(config.slstm_backend)
        self.post_init()

    def set_slstm_backend(self, backend: SLSTMBackend) -> None:
        """Run the sLSTM recurrence with ``backend`` (the weights are the same for all)."""
        for module in self.blocks.modules():
            if isinstance(module, _SLSTMCell):
                module.backend = backend

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> tuple[Tensor, Cache | None, tuple[Tensor, ...] | None]:
        """Hidden states after the final norm, the cache (recurrent form) and, if asked, every layer's output.

        Like transformers' models, ``hidden_states`` holds the embedding output, each block's output
        and, last, the normalised final state (what the LM head reads) in place of the last block's.
        """
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = embeds.shape[:2]
        valid = torch.ones(B, T, dtype=torch.bool, device=embeds.device)
        if attention_mask is not None:
            valid = attention_mask[:, -T:].bool()  # generate() passes the whole mask with one new token
        starts = torch.zeros_like(valid) if position_ids is None else valid & (position_ids[:, -T:] == 0)
        if use_cache or cache is not None:
            if cache is None:
                cache = DynamicCache(config=self.config)  # this student's cache layers, from config.layer_types
            layers = self._recurrent(embeds, valid, starts, cache, bool(output_hidden_states))
        else:
            first_real = valid & (valid.cumsum(1) == 1)  # a row's first real token starts a document too
            layers = self._parallel(embeds, valid, starts | first_real, bool(output_hidden_states))
        return layers[-1], cache, (tuple(layers) if output_hidden_states else None)

    def _run_blocks(self, x: Tensor, keep_all: bool) -> list[Tensor]:
        """[block outputs..., normed final] (only the normed final if not ``keep_all``)."""
        layers = []
        for block in self.blocks.blocks:
            x = block(x)
            layers.append(x)
        layers[-1] = self.blocks.post_blocks_norm(x)
        return layers if keep_all else layers[-1:]

    def _parallel(self, embeds: Tensor, valid: Tensor, starts: Tensor, keep_all: bool) -> list[Tensor]:
        """Every document through the blocks' parallel forward on its own (module docstring)."""
        B, T, D = embeds.shape
        tokens = valid.reshape(-1).nonzero().squeeze(1)  # flat positions of the real tokens, in order
        doc = starts.reshape(-1)[tokens].long().cumsum(0) - 1  # each real token's document
        lengths = torch.bincount(doc)
        offset = torch.arange(len(doc), device=doc.device) - (lengths.cumsum(0) - lengths)[doc]
        bucket = torch.ceil(torch.log2(lengths.float())).long()  # documents of similar length run together
        outs = [embeds.new_zeros(B * T, D) for _ in range(len(self.blocks.blocks) if keep_all else 1)]
        flat = embeds.reshape(B * T, D)
        for b in bucket.unique().tolist():
            docs = (bucket == b).nonzero().squeeze(1)
            row = torch.full_like(lengths, -1)
            row[docs] = torch.arange(len(docs), device=docs.device)
            mine = (row[doc] >= 0).nonzero().squeeze(1)  # real tokens of this bucket's documents
            at = (row[doc[mine]], offset[mine])
            x = embeds.new_zeros(len(docs), int(lengths[docs].max()), D)
            x[at] = flat[tokens[mine]]
            for out, layer in zip(outs, self._run_blocks(x, keep_all)):
                out[tokens[mine]] = layer[at]
        return ([embeds] if keep_all else []) + [out.view(B, T, D) for out in outs]

    def _recurrent(
        self, embeds: Tensor, valid: Tensor, starts: Tensor, cache: Cache, keep_all: bool
    ) -> list[Tensor]:
        """One ``step`` per token and block; padding keeps the state, document starts reset it."""
        has_pad = (~valid).any(0).tolist()
        has_start = starts.any(0).tolist()
        per_token: list[list[Tensor]] = []
        for t in range(embeds.shape[1]):
            x = embeds[:, t : t + 1]
            layers = [x]  # the embedding, then each block's output
            for block, layer_cache in zip(self.blocks.blocks, cache.layers):
                state = layer_cache.block_state
                if state and has_start[t]:
                    state = _pick_rows(starts[:, t], _zeros_like(state), state)
                # The conv window is updated in place by step(); keep a copy for rows that must not move.
                old = _map_state(lambda s, dim: s.clone(), state) if has_pad[t] and state else None
                x, new = block.step(x, **state)
                if has_pad[t]:
                    new = _pick_rows(valid[:, t], new, old if old is not None else _zeros_like(new))
                layer_cache.update_block_state(new)
                layer_cache.advance(1)
                layers.append(x)
            layers[-1] = self.blocks.post_blocks_norm(x)
            per_token.append(layers if keep_all else layers[-1:])
        return [torch.cat(column, dim=1) for column in zip(*per_token)]


class DistilXLSTMForCausalLM(RecurrentGenerationMixin, DistilXLSTMPreTrainedModel, GenerationMixin):
    """Causal LM head (the teacher's, frozen) over :class:`DistilXLSTMModel`.

    A plain ``model(input_ids)`` takes the parallel form and builds no cache; with ``use_cache`` (or a
    cache) it takes the recurrent form. generate() works through transformers' own caches: the
    config's ``layer_types`` make them hold :class:`DistilXLSTMLayerCache` layers.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DistilXLSTMConfig):
        super().__init__(config)
        self.model = DistilXLSTMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Tie (if configured), then freeze embedding and head (``freeze_embeddings``).

        transformers calls this after building the model and after loading a checkpoint, and loading
        installs fresh, trainable Parameters: freezing here keeps a reloaded student frozen.
        """
        super().tie_weights(*args, **kwargs)
        if self.config.freeze_embeddings:
            self.model.embed_tokens.requires_grad_(False)
            self.lm_head.requires_grad_(False)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """Logits (and loss with `labels`); the cache comes as `cache` or, before transformers 5.24, `past_key_values`."""
        hidden, cache, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        return self.lm_output(hidden, cache, all_hidden, labels, logits_to_keep, return_dict)


# --------------------------------------------------------------------------------------- builder
def build_distil_xlstm(
    teacher: PreTrainedModel,
    *,
    num_blocks: int,
    slstm_at: tuple[int, ...] | list[int],
    num_heads: int,
) -> DistilXLSTMForCausalLM:
    """The paper-B student of ``teacher``: fresh xLSTM blocks between its embedding and LM head.

    Embedding and head are copied and frozen; a tied teacher gives a tied student. The student's
    post-blocks LayerNorm starts with the teacher's final-norm gains (when the teacher has such a
    norm), because the frozen head was trained on inputs scaled by them; it stays trainable.
    The block options' defaults are the kind's (:class:`merge_xlstm.kinds.DistilXLSTMStudent`).
    """
    tconfig = teacher.config
    if tconfig.hidden_size % num_heads:  # the recipe cannot check this: it does not know the teacher
        raise UserError(
            f"must divide the teacher's hidden size {tconfig.hidden_size}, got {num_heads}", where="student.num_heads"
        )
    config = DistilXLSTMConfig(
        vocab_size=tconfig.vocab_size,
        hidden_size=tconfig.hidden_size,
        num_blocks=num_blocks,
        slstm_at=list(slstm_at),
        num_heads=num_heads,
        max_position_embeddings=getattr(tconfig, "max_position_embeddings", 8192),
        tie_word_embeddings=bool(getattr(tconfig, "tie_word_embeddings", False)),
        pad_token_id=tconfig.pad_token_id,
        bos_token_id=tconfig.bos_token_id,
        eos_token_id=tconfig.eos_token_id,
    )
    config.architectures = [DistilXLSTMForCausalLM.__name__]
    reference = teacher.get_input_embeddings().weight
    student = DistilXLSTMForCausalLM(config).to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(reference)
        if not config.tie_word_embeddings:
            student.lm_head.weight.copy_(teacher.get_output_embeddings().weight)
        final_norm = getattr(teacher.base_model, "norm", None)
        gains = getattr(final_norm, "weight", None)
        if gains is not None and gains.shape == (config.hidden_size,):
            student.model.blocks.post_blocks_norm.weight.copy_(gains - 1)  # xlstm's LayerNorm scales by 1 + weight
    return student.train(teacher.training)


AutoConfig.register(DistilXLSTMConfig.model_type, DistilXLSTMConfig)
AutoModelForCausalLM.register(DistilXLSTMConfig, DistilXLSTMForCausalLM)
