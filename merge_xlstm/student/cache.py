"""What both students' caches share: cache layers on transformers' public cache-layer API.

transformers builds a model's cache from ``config.layer_types``: ``DynamicCache(config=...)`` (what
``generate()`` makes by default) and ``StaticCache(config=..., max_cache_len=...)``
(``cache_implementation="static"``) create one layer object per entry, looked up by the layer type a
``CacheLayerMixin`` subclass registers through ``_layer_type``. Each student registers a dynamic and a
static layer under its own type, so ``generate()``, beam search and the static cache all work through
transformers' own ``Cache`` containers, on every release we allow, whatever the class is called.

A recurrent state has a fixed size, so both forms hold the same buffers, written in place. The static
form marks them as static addresses when they are allocated and keeps its token count in a tensor,
so ``torch.compile`` (CUDA graphs included) captures a decode step once and replays it.

transformers renamed the cache argument and output field from ``past_key_values`` to ``cache``
(5.24); :data:`CACHE_FIELD` is the name of the release in use, and the students' ``forward`` takes
both names explicitly (:func:`resolve_cache`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, StaticLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output field (and generation's keyword) under which this transformers release carries a cache.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def resolve_cache(cache: object | None, past_key_values: object | None) -> object | None:
    """The cache passed under either name (``cache`` since transformers 5.24, ``past_key_values`` before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class RecurrentLayer(CacheLayerMixin):
    """One layer's recurrent state: named tensors of a fixed size, whatever the number of tokens seen.

    Subclasses allocate their buffers with :meth:`allocate` at the first update and change them only
    in place (``copy_``, ``scatter_``, ``masked_fill_``), so a static layer's addresses never move.
    ``batch_dims`` names tensors whose batch dimension is not 0.
    """

    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier token
    is_sliding = True  # constant size: never worth offloading
    supports_early_init = False  # shapes are known at the first update, not from a (keys, values) pair
    static = False

    def __init__(self, **kwargs: object) -> None:
        # `max_cache_len` (StaticCache) and other per-layer options are irrelevant: the state never grows.
        CacheLayerMixin.__init__(self)
        self.state: dict[str, Tensor] = {}
        self.batch_dims: dict[str, int] = {}
        self.cumulative_length: int | Tensor = torch.zeros((), dtype=torch.long) if self.static else 0

    def allocate(self, tensors: dict[str, Tensor], batch_dims: dict[str, int] | None = None) -> None:
        """Add copies of ``tensors`` to this layer's buffers (a static layer marks them as static addresses)."""
        new = {name: t.clone() for name, t in tensors.items()}
        self.state |= new
        self.batch_dims |= batch_dims or {}
        device = next(iter(new.values())).device
        if self.static:
            if not self.is_initialized:
                self.cumulative_length = self.cumulative_length.to(device)
                new["cumulative_length"] = self.cumulative_length
            if not torch.compiler.is_compiling():
                for t in new.values():
                    torch._dynamo.mark_static_address(t)
        self.device = device
        self.is_initialized = True

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more consumed tokens (a tensor in place when static: no recompiles per step)."""
        if self.static:
            self.cumulative_length.add_(tokens)
        else:
            self.cumulative_length += tokens

    # -- CacheLayerMixin ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} allocates its state at the first update")

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is updated by its student's own methods")

    def get_seq_length(self) -> int | Tensor:
        """Tokens consumed so far (padding included): where generate() continues."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # no maximum: the state does not grow

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # the students build their masks themselves from the 2D padding mask

    def reset(self) -> None:
        for t in self.state.values():
            t.zero_()
        self.cumulative_length = self.cumulative_length.zero_() if self.static else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(f"{type(self).__name__} cannot be cropped: a recurrent state cannot be rolled back")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i takes row beam_idx[i]'s state (in place, so static addresses stay)."""
        for name, t in self.state.items():
            t.copy_(t.index_select(self.batch_dims.get(name, 0), beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = {n: t.repeat_interleave(repeats, self.batch_dims.get(n, 0)) for n, t in self.state.items()}

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state = {n: t.index_select(self.batch_dims.get(n, 0), indices.to(t.device)) for n, t in self.state.items()}

    def offload(self) -> None:
        self.state = {n: t.to("cpu", non_blocking=True) for n, t in self.state.items()}

    def prefetch(self) -> None:
        if self.is_initialized:
            self.state = {n: t.to(self.device, non_blocking=True) for n, t in self.state.items()}


class StaticRecurrentLayer(RecurrentLayer, StaticLayer):
    """The static form: a ``StaticLayer`` (so ``StaticCache`` picks it) with static buffer addresses."""

    static = True
    is_compileable = True


class RecurrentLayerTypes:
    """Config mixin: every layer's cache is the student's own ``cache_layer_type``.

    ``layer_types`` is what transformers' ``DynamicCache``/``StaticCache`` read to choose each
    layer's cache class. transformers' save-time validation accepts only its own layer types, so
    :meth:`validate` runs it without ours and checks ours itself.
    """

    cache_layer_type: ClassVar[str]

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # A config made without the teacher's fields (transformers makes some to read defaults) has no layers.
        layers = getattr(self, "num_hidden_layers", None)
        self.layer_types = None if layers is None else [self.cache_layer_type] * layers

    def validate(self) -> None:
        ours = self.__dict__.pop("layer_types", None)
        try:
            super().validate()
        finally:
            self.layer_types = ours
        if ours is not None and list(ours) != [self.cache_layer_type] * self.num_hidden_layers:
            raise ValueError(
                f"layer_types must be {self.cache_layer_type!r} for each of the {self.num_hidden_layers} layers, "
                f"got {ours}"
            )


class RecurrentGenerationMixin:
    """What generate() and callers need from a student whose cache layers come from ``config.layer_types``.

    Mixed into each student's causal LM before ``GenerationMixin``.
    """

    _is_stateful = True  # no assisted generation: a recurrent state cannot be rolled back
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() may build its default cache: ``layer_types`` make it the student's own layers.

        Said explicitly because transformers' fallback rule refuses a cache to any class whose name
        contains "xlstm".
        """
        return True

    @staticmethod
    def create_masks_for_generate(
        inputs_embeds: Tensor, attention_mask: Tensor | None = None, **unused: Any
    ) -> Tensor | None:
        """The 2D padding mask of the step's own tokens: a student needs no other (the cache knows the past).

        generate() asks for this with a compileable (static) cache, to precompute a transformer's 4D
        masks, whose window rule and layout differ from ours; ``unused`` takes the inputs of that
        computation. Keeping only the step's columns gives a decode step one fixed input shape, so
        a compiled step (CUDA graphs included) is captured once instead of once per length.
        """
        return None if attention_mask is None else attention_mask[:, -inputs_embeds.shape[1] :]

    def lm_output(
        self,
        hidden: Tensor,
        cache: object | None,
        all_hidden: tuple[Tensor, ...] | None,
        labels: Tensor | None,
        logits_to_keep: int | Tensor,
        return_dict: bool | None,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """The LM head over the kept positions, the loss with ``labels``, and the output in the asked form."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden, **{CACHE_FIELD: cache})
        return output if return_dict is not False else output.to_tuple()


def output_cache(output: CausalLMOutputWithPast) -> object | None:
    """The cache a model output carries, under this transformers release's field name."""
    return output.get(CACHE_FIELD)
