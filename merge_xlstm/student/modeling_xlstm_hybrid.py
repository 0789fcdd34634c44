"""The xLSTM + sliding-window-attention hybrid student of paper A (REFERENCE.md §1), in one file.

The student keeps its teacher's macro-architecture: embeddings, every decoder layer's norms and MLP,
q/k/v/o projections (with biases, and OLMo2's q_norm/k_norm), RoPE, final norm and LM head are the
teacher's, bit for bit. Only the attention computation changes; every layer mixes two branches that
read the same q, k, v:

    SWA_t   = softmax(q_t K_W^T / sqrt(d)) V_W        K_W: the last W keys of the document + its first S (sinks)
    mLSTM_t = phi(q_t) C_t / (phi(q_t) n_t)             C_t = f_t C_t-1 + i_t phi(k_t) v_t^T,  n_t likewise
    h_t     = o_t * mLSTM_t + (1 - o_t) * SWA_t        o_t = sigmoid(W_og [q_t, k_t, v_t]), a scalar per head
    out     = h W_o                                     (teacher o_proj; no norm in between)

Design decisions the paper leaves open (each measured or tested, see tests/ and bench/):

- GQA: the mLSTM runs one state per *query* head. Keys and values are shared within a KV group, as
  in the teacher's attention, but each query head has its own feature maps and gates, so the student
  keeps the teacher's per-head resolution; the state costs H x F x D per layer, constant in length.
- RoPE: the SWA branch uses RoPE-rotated q/k (it *is* the teacher's attention inside the window). The
  mLSTM branch reads q/k before RoPE by default (``mlstm_rope=False``): a softmax feature map of a
  rotated vector does not keep RoPE's relative-position property, and the forget gate already encodes
  recency. ``mlstm_rope=True`` switches it on for comparison.
- Normaliser: exactly phi(q) n_t, the one paper A keeps, so the branch is normalised linear attention
  (a convex combination of values) with gated decay. mlstm_kernels' own denominator
  max(|phi(q) n|, e^-m) would add a floor, and its fused backward ignores the denominator's gradient;
  `kernels.MLSTMBackend` computes the exact ratio with exact gradients on every backend.
- Memory keys: by default (``memory_keys="evicted"``) the mLSTM state takes each key when the window
  lets go of it: at token t the key, value and input gate of token t - W enter (past the sinks, same
  document), so C_t holds exactly the keys SWA no longer sees, and o·mLSTM + (1 - o)·SWA has the form of
  the teacher's attention split at the window's edge. With every key (``"all"``) the recent keys the
  window already covers dominate the decayed state. The cache's ring of the last W keys is where a
  decode step finds the key it evicts.
- Memory layers: ``memory_layers`` lists the layers that have the mLSTM branch and the gate; the others
  are the SWA branch alone (default: every layer has both). A teacher's long-context gain need not live
  in every layer (bench/layer_reach.py measures where it does), and a layer without memory costs what its
  window costs.
- Decoding: on CUDA a decode step (one token per row after a cached pass) runs each hybrid layer's
  gates, window, memory and mix as one Triton kernel (fused_decode.py, the ``fused`` decode backend): the
  layer-by-layer step is some forty small kernels per layer, and a step is bound by their count.
- Initialisation: feature maps start as the identity (phi = softmax of q or k itself); forget-gate
  biases spread over [3, 6] across heads (memories of ~20 to ~400 tokens, as in xLSTM); gate weights
  and the input-gate bias start at zero (a constant input gate cancels in the normalised ratio); the
  output gate starts at o = 0.5 so stage I sends gradient to both branches.
- Documents: a document starts wherever ``position_ids`` is 0 (and at the first real token of a
  row). Padding (``attention_mask`` 0) is invisible: SWA never attends to it, the mLSTM state skips it
  (input gate shut, forget gate open), and sinks are the first real tokens. At a document start the
  forget gate is shut, which resets the state, and SWA only sees keys of the same document.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from merge_xlstm.kinds import HybridStudent, check_memory_layers
from merge_xlstm.student import fused_decode
from merge_xlstm.student.cache import (
    RecurrentGenerationMixin,
    RecurrentLayer,
    RecurrentLayerTypes,
    StaticRecurrentLayer,
    resolve_cache,
)
from merge_xlstm.student.families import FAMILIES, Family
from merge_xlstm.student.kernels import (
    DECODE_BACKENDS,
    FLEX_MIN_QUERIES,
    MLSTM_BACKENDS,
    SWA_BACKENDS,
    MLSTMState,
    TokenLayout,
    default_backends,
)

# Gate pre-activation that makes a gate fully open (+) or shut (-) in float32 and bfloat16:
# logsigmoid(-GATE) = -80 is a reset (e^-80 of the old state survives), exp(-GATE) ~ 1e-35 adds nothing.
GATE = 80.0
# A window longer than any sequence: the SWA rule with it is plain causal attention (the teacher's).
FULL_WINDOW = 2**62
MIXERS = ("hybrid", "mlstm", "swa")


_KIND_FIELDS = HybridStudent.model_fields


class XLSTMHybridConfig(RecurrentLayerTypes, PreTrainedConfig):
    """The teacher's config fields (flat, as the teacher had them) plus the mixer's options.

    Keeping the teacher's fields flat means everything transformers reads from a config
    (vocab_size, hidden_size, tie_word_embeddings, token ids...) is where it expects it, and
    :meth:`teacher_config` rebuilds the teacher's own config class for its MLP, norm and RoPE.
    """

    model_type = "xlstm_hybrid"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    cache_layer_type = "xlstm_hybrid"  # every layer: XLSTMHybridLayerCache (see RecurrentLayerTypes)

    teacher_family: str = "llama"
    # The kind's defaults (merge_xlstm.kinds.HybridStudent), also what a saved config.json omitting them means;
    # except memory_outside_window and memory_keys: configs saved before these options existed omit them and
    # mean "off" and "all".
    mixer: str = _KIND_FIELDS["mixer"].default
    window_size: int = _KIND_FIELDS["window_size"].default
    num_sink_tokens: int = _KIND_FIELDS["num_sink_tokens"].default
    feature_dim: int | None = _KIND_FIELDS["feature_dim"].default
    mlstm_rope: bool = _KIND_FIELDS["mlstm_rope"].default
    memory_outside_window: bool = False
    forget_bias: tuple[float, float] = _KIND_FIELDS["forget_bias"].default
    memory_keys: str = "all"
    memory_layers: list[int] | None = _KIND_FIELDS["memory_layers"].default
    prefill_chunk_length: int = 16384

    def layer_mixer(self, layer_idx: int) -> str:
        """The mixer of layer `layer_idx`: ``mixer``, or SWA alone in a layer ``memory_layers`` leaves out."""
        return self.mixer if self.memory_layers is None or layer_idx in self.memory_layers else "swa"

    def teacher_config(self) -> PreTrainedConfig:
        own = {"teacher_family", "mixer", "window_size", "num_sink_tokens", "feature_dim", "mlstm_rope",
               "memory_outside_window", "forget_bias", "memory_keys", "memory_layers", "prefill_chunk_length",
               "layer_types"}
        fields = {k: v for k, v in self.to_dict().items() if k not in own and k != "model_type"}
        return FAMILIES.get(self.teacher_family).config_class.from_dict(fields)


# ----------------------------------------------------------------------------------------- cache
class XLSTMHybridLayerCache(RecurrentLayer):
    """Decoding state of one layer, constant in size: mLSTM (C, n, m), the sink K/V and the last-W K/V.

    Key slots ``0..S-1`` hold the document's first S tokens (the sinks), slots ``S..S+W-1`` a ring of
    its last W tokens (a token at position p >= S lives in slot S + (p - S) mod W), and one more slot
    takes the writes of tokens the state does not keep, so every update is a single ``scatter_`` of
    fixed shape. ``positions`` holds each slot's position in the document, -1 where empty; ``seen``
    each row's next position. Attention reads the slots *before* a step's writes plus the step's own
    keys (:meth:`update`), so a step of any length sees exactly the keys its window allows.
    """

    _layer_type = XLSTMHybridConfig.cache_layer_type

    def prepare(self, k: Tensor, v: Tensor, sinks: int, window: int) -> None:
        """Allocate empty key slots shaped after the first step's keys ``k``, ``v`` (B, Hkv, T, D)."""
        if self.is_initialized:
            return
        B, Hkv, _, D = k.shape
        slots = sinks + window + 1
        self.allocate({
            "keys": k.new_zeros(B, Hkv, slots, D),
            "values": v.new_zeros(B, Hkv, slots, v.shape[-1]),
            "positions": torch.full((B, slots), -1, dtype=torch.long, device=k.device),
            "seen": torch.zeros(B, dtype=torch.long, device=k.device),
        })

    @property
    def mlstm_state(self) -> MLSTMState | None:
        """(C, n, m) after the tokens seen, None before the first step (the kernels then start from zeros)."""
        return (self.state["C"], self.state["n"], self.state["m"]) if "C" in self.state else None

    def update(self, key_states: Tensor, value_states: Tensor, plan: "CachePlan") -> tuple[Tensor, Tensor]:
        """Return the keys/values a step attends to (cached slots, then the step's own), then store the step's."""
        keys, values = key_states, value_states
        if plan.with_slots:
            cached_keys, cached_values = self.state["keys"][:, :, :-1], self.state["values"][:, :, :-1]
            if plan.order is not None:  # the slots in position order (see CachePlan.order)
                index = plan.order[:, None, :, None]
                cached_keys = cached_keys.gather(2, index.expand(*cached_keys.shape[:2], -1, cached_keys.shape[-1]))
                cached_values = cached_values.gather(
                    2, index.expand(*cached_values.shape[:2], -1, cached_values.shape[-1]))
            keys = torch.cat([cached_keys, key_states], dim=2)
            values = torch.cat([cached_values, value_states], dim=2)
        index = plan.slots[:, None, :, None]
        self.state["keys"].scatter_(2, index.expand_as(key_states), key_states)
        self.state["values"].scatter_(2, index.expand_as(value_states), value_states)
        self.record(plan)
        return keys, values

    def record(self, plan: "CachePlan") -> None:
        """Note the positions of a pass's kept tokens in their slots and the row's next position."""
        positions = self.state["positions"]
        positions.masked_fill_(plan.restart[:, None], -1)
        positions.scatter_(1, plan.slots, plan.kept_pos)
        positions[:, -1] = -1  # the slot of unkept tokens stays empty
        self.state["seen"].copy_(plan.seen)
        self.advance(plan.slots.shape[1])

    def evicted(self, keys: Tensor, igates: Tensor, plan: "CachePlan") -> tuple[Tensor, ...]:
        """For ``memory_keys: evicted``: the memory keys (B, Hkv, n, D), values and input-gate pre-activations
        (B, n, H) of the n = min(T, W) tokens W positions before the first n new tokens, read from the ring
        before this step's writes (meaningless below the sinks: the caller shuts their gates). Then stores the
        new tokens' memory keys and input gates in their slots (:meth:`update` stores their values).
        """
        B, Hkv, T, D = keys.shape
        if "memory_keys" not in self.state:
            slots = self.state["keys"].shape[2]
            self.allocate({"memory_keys": keys.new_zeros(B, Hkv, slots, D),
                           "igates": igates.new_zeros(B, slots, igates.shape[-1])})
        slot = plan.evicts
        n = slot.shape[1]
        ring = (
            self.state["memory_keys"].gather(2, slot[:, None, :, None].expand(B, Hkv, n, D)),
            self.state["values"].gather(2, slot[:, None, :, None].expand(B, Hkv, n, self.state["values"].shape[-1])),
            self.state["igates"].gather(1, slot[:, :, None].expand(B, n, igates.shape[-1])),
        )
        self.state["memory_keys"].scatter_(2, plan.slots[:, None, :, None].expand_as(keys), keys)
        self.state["igates"].scatter_(1, plan.slots[:, :, None].expand_as(igates), igates)
        return ring

    def update_mlstm_state(self, state: MLSTMState) -> None:
        if "C" not in self.state:
            self.allocate(dict(zip("Cnm", state)))
            return
        for name, value in zip("Cnm", state):
            self.state[name].copy_(value)

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.state["positions"].fill_(-1)


class XLSTMHybridStaticLayerCache(XLSTMHybridLayerCache, StaticRecurrentLayer):
    """The static form (``cache_implementation="static"``): same buffers, static addresses, compileable."""

    _layer_type = XLSTMHybridConfig.cache_layer_type


# ------------------------------------------------------------------------------------ the mixer
@dataclass
class MixerParts:
    """One mixer call's intermediate results: what stage I's losses look at besides the output."""

    q: Tensor  # (B, H, T, D) RoPE-rotated queries, keys and values as the SWA branch reads them
    k: Tensor  # (B, Hkv, T, D)
    v: Tensor  # (B, Hkv, T, D)
    swa: Tensor | None  # (B, H, T, D) the SWA branch
    swa_lse: Tensor | None  # (B, H, T) its log-sum-exp of scores (when asked for)
    mlstm: Tensor | None  # (B, H, T, D) the mLSTM branch
    o: Tensor | None  # (B, H, T, 1) the mixing gate
    memory_inputs: tuple[Tensor, ...] | None = None  # what the mLSTM read: q, k, v, i, f (_memory_inputs)


class HybridMixer(nn.Module):
    """The teacher's attention projections plus the new mixer parameters of one layer."""

    def __init__(self, config: XLSTMHybridConfig, family: Family, teacher_config: PreTrainedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer = config.layer_mixer(layer_idx)
        self.num_heads = teacher_config.num_attention_heads
        self.num_kv_heads = teacher_config.num_key_value_heads
        self.head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.window = config.window_size
        self.sinks = config.num_sink_tokens
        self.mlstm_rope = config.mlstm_rope
        self.memory_outside_window = config.memory_outside_window
        self.forget_bias = tuple(config.forget_bias)
        self.memory_keys = config.memory_keys
        hidden, H, Hkv, D = teacher_config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        qkv_bias = family.qkv_bias(teacher_config)
        self.q_proj = nn.Linear(hidden, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, Hkv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, Hkv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=family.o_bias(teacher_config))
        if family.qk_norm:
            self.q_norm = family.norm(H * D, eps=teacher_config.rms_norm_eps)
            self.k_norm = family.norm(Hkv * D, eps=teacher_config.rms_norm_eps)
        if self.mixer in ("hybrid", "mlstm"):
            feat = config.feature_dim or D
            self.feature_dim = feat
            self.phi_q = nn.Parameter(torch.empty(H, D, feat))
            self.phi_k = nn.Parameter(torch.empty(H, D, feat))
            self.igate = nn.Linear(hidden, H)
            self.fgate = nn.Linear(hidden, H)
        if self.mixer == "hybrid":
            self.ogate = nn.Linear((H + 2 * Hkv) * D, H)
        # None: chosen per call from the input's device (see kernels.default_backends)
        self.mlstm_backend: str | None = None
        self.swa_backend: str | None = None
        self.decode_backend: str | None = None
        self.gate_log: list[Tensor] | None = None  # set by XLSTMHybridForCausalLM.record_gates

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        """Initialise the parameters the teacher does not have (see the module docstring for why)."""
        if self.mixer in ("hybrid", "mlstm"):
            eye = torch.eye(self.head_dim, self.feature_dim, device=self.phi_q.device, dtype=self.phi_q.dtype)
            self.phi_q.copy_(eye.expand_as(self.phi_q))
            self.phi_k.copy_(eye.expand_as(self.phi_k))
            self.igate.weight.zero_()
            self.igate.bias.zero_()
            self.fgate.weight.zero_()
            self.fgate.bias.copy_(torch.linspace(*self.forget_bias, self.num_heads))
        if self.mixer == "hybrid":
            self.ogate.weight.zero_()
            self.ogate.bias.zero_()

    def new_parameter_names(self) -> list[str]:
        names = {"hybrid": ["phi_q", "phi_k", "igate", "fgate", "ogate"], "mlstm": ["phi_q", "phi_k", "igate", "fgate"]}
        return names.get(self.mixer, [])

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layout: TokenLayout,
        starts: Tensor,
        cache: XLSTMHybridLayerCache | None,
        plan: "CachePlan | None",
    ) -> Tensor:
        """x (B, T, hidden) -> (B, T, hidden). `starts` (B, T) marks document starts among x's tokens.

        With a `cache`, the step attends to the cached keys too, continues the cached mLSTM state,
        and leaves its own keys and state in the cache (`plan` says where). A decode step (one token
        per row after a cached pass) of a hybrid layer goes through the decode backend (``fused`` on CUDA).
        """
        if cache is not None and plan.with_slots and x.shape[1] == 1 and self.mixer == "hybrid":
            step = DECODE_BACKENDS.get(self.decode_backend or default_backends(x.device)[2])
            return step(self, x, rope, layout, starts, cache, plan)
        return self.output(self.parts(x, rope, layout, starts, cache, plan))

    def output(self, parts: MixerParts) -> Tensor:
        """h = o·mLSTM + (1 − o)·SWA (or the one branch a single-branch mixer has), through o_proj."""
        if parts.o is None:
            h = parts.swa if parts.mlstm is None else parts.mlstm
        else:
            # Under autocast the branches may differ in dtype (CPU SDPA computes in float32)
            h = torch.lerp(parts.swa, parts.mlstm.to(parts.swa.dtype), parts.o.to(parts.swa.dtype))
        B, H, T, D = h.shape
        return self.o_proj(h.transpose(1, 2).reshape(B, T, H * D))

    def parts(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layout: TokenLayout,
        starts: Tensor,
        cache: XLSTMHybridLayerCache | None = None,
        plan: "CachePlan | None" = None,
        swa_lse: bool = False,
    ) -> MixerParts:
        """Both branches and the gate; `swa_lse` also returns the SWA branch's log-sum-exp (stage I)."""
        q_flat, k_flat, v_flat, q, k, v, q_rot, k_rot = self.project(x, rope)
        if cache is not None:
            cache.prepare(k_rot, v, self.sinks, self.window)
        if self.mixer in ("hybrid", "mlstm"):  # before the cache update: the evicted keys may be in its ring
            memory = self._memory_inputs(x, *((q_rot, k_rot) if self.mlstm_rope else (q, k)), v, layout, cache, plan)
        keys, values = k_rot, v
        if cache is not None:
            keys, values = cache.update(k_rot, v, plan)
        swa = lse = mlstm = o = None
        if self.mixer in ("hybrid", "swa"):
            swa = self.attention(q_rot, keys, values, layout, return_lse=swa_lse)
            if swa_lse:
                swa, lse = swa
        if self.mixer in ("hybrid", "mlstm"):
            initial = cache.mlstm_state if cache is not None else None
            mlstm, last = self._mlstm(
                *memory, layout.q_valid, starts, initial, cache is not None,
                self.mlstm_backend or default_backends(x.device)[0],
            )
            if cache is not None:
                cache.update_mlstm_state(last)
        if self.mixer == "hybrid":
            o = self.mixing_gate(q_flat, k_flat, v_flat, layout).transpose(1, 2).unsqueeze(-1)
        return MixerParts(q_rot, k_rot, v, swa, lse, mlstm, o, memory if self.mixer != "swa" else None)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        """The teacher's projections of x (B, T, hidden): q, k, v flat (B, T, ·) as the gate reads them, q (B, H,
        T, D), k, v (B, Hkv, T, D), and the RoPE-rotated q and k."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q_flat, k_flat, v_flat = q, k, v
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, *rope)
        return q_flat, k_flat, v_flat, q, k, v, q_rot, k_rot

    def mixing_gate(self, q_flat: Tensor, k_flat: Tensor, v_flat: Tensor, layout: TokenLayout) -> Tensor:
        """o (B, T, H): 1 sends a head's output to the memory, 0 to the window (recorded under record_gates)."""
        o = torch.sigmoid(self.ogate(torch.cat([q_flat, k_flat, v_flat], dim=-1)))
        if self.memory_outside_window:  # where the window still covers the document, SWA is exact
            o = o * (layout.q_pos >= self.window + self.sinks)[..., None]
        if self.gate_log is not None:  # where the memory may act: the window and sinks no longer cover it
            free = layout.q_valid & (layout.q_pos >= self.window + self.sinks)
            self.gate_log.append(o.detach()[free].float().cpu())
        return o

    def fused_step(
        self, x: Tensor, rope: tuple[Tensor, Tensor], layout: TokenLayout, starts: Tensor,
        cache: XLSTMHybridLayerCache, plan: "CachePlan",
    ) -> Tensor:
        """A decode step through one Triton kernel (fused_decode.py): what :meth:`forward` computes for one
        token per row after a cached pass, in a few kernels instead of some forty. Sizes the kernel does
        not take, and steps whose gates are being recorded, go the layer-by-layer way."""
        if not fused_decode.fusable(self.head_dim, self.feature_dim) or self.gate_log is not None:
            return self.output(self.parts(x, rope, layout, starts, cache, plan))
        B = x.shape[0]
        q_flat, k_flat, v_flat, q, k, v, q_rot, k_rot = self.project(x, rope)
        q_mem, k_mem = (q_rot, k_rot) if self.mlstm_rope else (q, k)
        evicted = self.memory_keys == "evicted"
        h = fused_decode.fused_step(
            x=x[:, 0], qkv=(q_flat[:, 0], k_flat[:, 0], v_flat[:, 0]),
            q=q_rot[:, :, 0], k=k_rot[:, :, 0], v=v[:, :, 0], q_mem=q_mem[:, :, 0], k_mem=k_mem[:, :, 0],
            gates=(self.igate, self.fgate, self.ogate), state=cache.state, phi_q=self.phi_q, phi_k=self.phi_k,
            q_pos=layout.q_pos[:, 0], valid=layout.q_valid[:, 0], start=starts[:, 0], slot=plan.slots[:, 0],
            evict=plan.evicts[:, 0] if evicted else None,
            scale=self.scaling, window=self.window, sinks=self.sinks, gate=GATE,
            memory_outside_window=self.memory_outside_window,
        )
        cache.record(plan)
        return self.o_proj(h.reshape(B, 1, -1))

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, return_lse: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Softmax attention under `layout`'s rule, on this mixer's SWA backend (the teacher's with a full window)."""
        backend = SWA_BACKENDS.get(self.swa_backend or default_backends(q.device)[1])
        return backend(q, k, v, layout, self.scaling, return_lse=return_lse)

    def _memory_inputs(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout,
        cache: XLSTMHybridLayerCache | None, plan: "CachePlan | None",
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The mLSTM's q (B, H, T, D), k, v (B, Hkv, T, D) and input/forget-gate pre-activations (B, T, H).

        With ``memory_keys: evicted`` the state takes each key when the window lets go of it: at token t
        the key, value and input gate of token t - W, if that token is of the same document and past the
        sinks (else the input gate is shut), so the memory holds exactly the keys SWA no longer sees.
        """
        i, f = self.igate(x), self.fgate(x)
        if self.memory_keys == "evicted":
            B, Hkv, T, D = k.shape
            n = min(T, self.window)
            # the n tokens W before the first n: the cache's ring, or nothing before an uncached pass
            ring = (cache.evicted(k, i, plan) if cache is not None else
                    (k.new_zeros(B, Hkv, n, D), v.new_zeros(B, Hkv, n, v.shape[-1]), i.new_zeros(B, n, i.shape[-1])))
            k, v, i = shift_in(ring[0], k, 2), shift_in(ring[1], v, 2), shift_in(ring[2], i, 1)
            i = torch.where((layout.q_pos >= self.window + self.sinks)[..., None], i, -GATE)
        return q, k, v, i, f

    def memory_log_weights(self, parts: MixerParts, layout: TokenLayout, starts: Tensor, rows: Tensor) -> Tensor:
        """(B, H, n, T): the log of the weight the mLSTM branch gives key s at each query of `rows` (n,), -inf
        where it holds no such key; an uncached pass. The branch is exactly sum_s softmax(these)_s v_s (its
        normaliser is the weights' sum), so stage I can hold what the memory attends to against the
        teacher's attention weights (the attention_transfer term), not only its output.
        """
        q, k, _, i, f = parts.memory_inputs
        T = q.shape[2]
        phi_q, phi_k = self._feature_maps(q[:, :, rows].float(), k.float())
        i, f = gate_preactivations(i.float(), f.float(), layout.q_valid, starts)
        decay = F.logsigmoid(f).cumsum(-1)  # a key entering at tau has decayed by decay[t] - decay[tau] at t
        logw = decay[..., rows, None] - decay[..., None, :] + i[..., None, :] + torch.log(phi_q @ phi_k.transpose(-1, -2))
        logw = logw.masked_fill(torch.arange(T, device=q.device) > rows[:, None], float("-inf"))  # (B, H, n, entry)
        delay = self.window if self.memory_keys == "evicted" else 0  # key s enters at s + delay
        return F.pad(logw[..., delay:], (0, delay), value=float("-inf"))

    def _feature_maps(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """phi(q) (B, H, T, F) and phi(k) per query head (B, H, Tk, F) from q (B, H, T, D), k (B, Hkv, Tk, D).

        GQA: head h reads KV head h // groups, as attention does; each query head has its own phi_k, applied
        to the shared key without copying it per head.
        """
        H, Hkv = self.num_heads, self.num_kv_heads
        phi_k_w = self.phi_k.view(Hkv, H // Hkv, *self.phi_k.shape[1:])
        phi_q = torch.softmax(torch.einsum("bhtd,hdf->bhtf", q, self.phi_q), dim=-1)
        phi_k = torch.softmax(torch.einsum("bgtd,gjdf->bgjtf", k, phi_k_w), dim=-1).flatten(1, 2)
        return phi_q, phi_k

    def _mlstm(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        i: Tensor,
        f: Tensor,
        valid: Tensor,
        starts: Tensor,
        initial: MLSTMState | None,
        return_state: bool,
        backend: str,
    ) -> tuple[Tensor, MLSTMState | None]:
        phi_q, phi_k = self._feature_maps(q, k)
        v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        i, f = gate_preactivations(i, f, valid, starts)
        out, last = MLSTM_BACKENDS.get(backend)(
            phi_q.to(v.dtype), phi_k.to(v.dtype), v, i.to(v.dtype), f.to(v.dtype), initial, return_state=return_state
        )
        return out.to(v.dtype), last


@torch.no_grad()
def beyond_window_log_probs(q: Tensor, k: Tensor, layout: TokenLayout, rows: Tensor, scale: float) -> Tensor:
    """(B, H, n, T) the teacher's attention at the queries `rows` restricted to the keys beyond the window and
    sinks (same document, past the sinks, at least W back), renormalised: log-probabilities, -inf elsewhere
    and everywhere for a query with no such key. q (B, H, T, D) and k (B, Hkv, T, D) RoPE-rotated; uncached."""
    groups = q.shape[1] // k.shape[1]
    scores = (q[:, :, rows].float() @ k.float().repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    q_doc, q_pos = layout.q_doc[:, rows, None], layout.q_pos[:, rows, None]
    k_doc, k_pos = layout.k_doc[:, None, :], layout.k_pos[:, None, :]
    beyond = layout.k_valid[:, None, :] & (k_doc == q_doc) & (k_pos >= layout.sinks) & (q_pos - k_pos >= layout.window)
    beyond = beyond[:, None]  # (B, 1, n, T)
    has = beyond.any(-1, keepdim=True)  # a query without such keys keeps its scores (finite), then is masked
    logp = scores.masked_fill(~beyond & has, float("-inf")).log_softmax(-1)
    return torch.where(beyond & has, logp, float("-inf"))


def ring_slots(seen: Tensor, window: int, sinks: int, count: int) -> Tensor:
    """(B, count) the ring slots of positions seen - W, seen - W + 1, ...: the oldest `count` tokens of the
    window before a row's next position `seen` (a slot's content is that position's only where it is >= sinks)."""
    before = seen[:, None] - window + torch.arange(count, device=seen.device)
    return sinks + (before - sinks).remainder(window)


def shift_in(head: Tensor, x: Tensor, dim: int) -> Tensor:
    """x delayed along `dim` by head's length, `head` filling the first slots: entry t of the result is
    x's entry t - len(head), or head's entry t where that is before x begins. Same shape as x."""
    return torch.cat([head, x], dim=dim).narrow(dim, 0, x.shape[dim])


def gate_preactivations(i: Tensor, f: Tensor, valid: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, H) gate pre-activations -> (B, H, T), with padding and document starts applied.

    Padding: input shut, forget open -> state untouched. Document start: forget shut -> state reset.
    """
    pad = ~valid[:, :, None]
    i = torch.where(pad, -GATE, i)
    f = torch.where(pad, GATE, torch.where(starts[:, :, None], -GATE, f))
    return i.transpose(1, 2), f.transpose(1, 2)


# --------------------------------------------------------------------------- bookkeeping of a batch
@dataclass
class CachePlan:
    """Where one forward pass's tokens go in every layer's cache (the same for all layers).

    Only the row's *last* document is kept: a document start among the new tokens drops what the
    cache held before, which is what a reset means.
    """

    slots: Tensor  # (B, T) the key slot of each new token; the spare last slot for tokens not kept
    kept_pos: Tensor  # (B, T) the kept tokens' document positions, -1 elsewhere
    restart: Tensor  # (B,) rows whose new tokens start a new document
    seen: Tensor  # (B,) each row's next document position after this pass
    # Whether the step attends to the cached slots too. A fresh cache holds no key, so its first pass
    # (the prefill) attends to its own keys alone: queries and keys then line up block for block, the
    # layout FlexAttention's block mask handles best, instead of trailing S + W + 1 empty slots.
    with_slots: bool = True
    # (B, S + W) the cached slots in position order (sinks, then the ring from its oldest token), or None
    # for slot order. A pass long enough for FlexAttention reads them in this order: its keys are then the
    # sinks followed by one run of positions ending at the queries, a layout whose rule FlexAttention
    # evaluates from indices alone (TokenLayout.is_one_document). Short steps keep slot order: their dense
    # mask does not care, and a decode step skips the gather.
    order: Tensor | None = None
    # (B, min(T, W)) the ring slots of the oldest min(T, W) tokens of the window before this pass: where
    # ``memory_keys: evicted`` finds the keys the window lets go of (meaningless below the sinks).
    evicts: Tensor | None = None


def token_layout(
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    cache: Cache | None,
    window: int,
    sinks: int,
) -> tuple[TokenLayout, Tensor, Tensor, CachePlan | None]:
    """Documents, in-document positions and validity of a batch's tokens (and of cached keys).

    Returns the layout, the document-start flags, the RoPE position ids, and the cache plan.
    Computed once per forward pass from the first layer's cache, which every layer's equals.
    """
    B, T = shape
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
    first = cache.layers[0] if cache is not None else None
    cached = first is not None and first.is_initialized
    seen = first.state["seen"] if cached else torch.zeros(B, dtype=torch.long, device=device)
    running = valid.long().cumsum(1)  # real tokens so far in this call, inclusive
    first_real = valid & (running == 1) & (seen[:, None] == 0)
    starts = first_real if position_ids is None else first_real | (valid & (position_ids == 0))
    start_count = torch.where(starts, running, 0).cummax(1).values  # running count at the last start
    pos = torch.where(start_count > 0, running - start_count, seen[:, None] + running - 1)
    pos = torch.where(valid, pos, -1)
    doc = starts.long().cumsum(1)  # 0 = continues the cached document
    if position_ids is None:
        position_ids = pos.clamp_min(0)

    k_doc, k_pos, k_valid = doc, pos, valid
    plan = None
    if cache is not None:
        order = None
        if cached:  # the cached slots' keys come first (see CachePlan.with_slots)
            slot_pos = first.state["positions"][:, :-1]
            if T >= FLEX_MIN_QUERIES:
                ring = ring_slots(seen, window, sinks, window)
                order = torch.cat([torch.arange(sinks, device=device).expand(B, sinks), ring], dim=1)
                slot_pos = slot_pos.gather(1, order)
            k_pos = torch.cat([slot_pos, pos], dim=1)
            k_valid = k_pos >= 0
            k_doc = torch.cat([doc.new_zeros(B, sinks + window), doc], dim=1)
        last_doc = torch.where(valid, doc, -1).max(1).values.clamp_min(0)  # (B,)
        keep = valid & (doc == last_doc[:, None])
        last_pos = torch.where(keep, pos, -1).max(1).values
        is_sink = pos < sinks
        kept = keep & (is_sink | (pos > last_pos[:, None] - window))
        slot = torch.where(is_sink, pos, sinks + (pos - sinks) % window)
        plan = CachePlan(
            slots=torch.where(kept, slot, sinks + window),
            kept_pos=torch.where(kept, pos, -1),
            restart=last_doc > 0,
            seen=torch.where(last_pos >= 0, last_pos + 1, seen),
            with_slots=cached,
            order=order,
            evicts=ring_slots(seen, window, sinks, min(T, window)),
        )
    layout = TokenLayout(doc, pos, valid, k_doc, k_pos, k_valid, window=window, sinks=sinks)
    return layout, starts, position_ids, plan


# ----------------------------------------------------------------------------------- the model
class XLSTMHybridDecoderLayer(nn.Module):
    """The teacher's decoder layer with the hybrid mixer as its attention (pre- or post-norm)."""

    def __init__(self, config: XLSTMHybridConfig, family: Family, teacher_config: PreTrainedConfig, layer_idx: int):
        super().__init__()
        self.post_norm = family.post_norm
        self.self_attn = HybridMixer(config, family, teacher_config, layer_idx)
        self.mlp = family.mlp(teacher_config)
        eps = teacher_config.rms_norm_eps
        if family.post_norm:
            self.post_attention_layernorm = family.norm(teacher_config.hidden_size, eps=eps)
            self.post_feedforward_layernorm = family.norm(teacher_config.hidden_size, eps=eps)
        else:
            self.input_layernorm = family.norm(teacher_config.hidden_size, eps=eps)
            self.post_attention_layernorm = family.norm(teacher_config.hidden_size, eps=eps)

    def mixer_input(self, hidden: Tensor) -> Tensor:
        """What the mixer reads: the normalised hidden state (pre-norm) or the hidden state (post-norm)."""
        return hidden if self.post_norm else self.input_layernorm(hidden)

    def forward(self, hidden: Tensor, *mixer_args: Any) -> Tensor:
        attn = self.self_attn(self.mixer_input(hidden), *mixer_args)
        if self.post_norm:
            hidden = hidden + self.post_attention_layernorm(attn)
            return hidden + self.post_feedforward_layernorm(self.mlp(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class XLSTMHybridPreTrainedModel(PreTrainedModel):
    config_class = XLSTMHybridConfig
    config: XLSTMHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XLSTMHybridDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HybridMixer):
            module.reset_new_parameters()


class XLSTMHybridModel(XLSTMHybridPreTrainedModel):
    def __init__(self, config: XLSTMHybridConfig):
        super().__init__(config)
        if config.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {config.mixer!r}")
        family = FAMILIES.get(config.teacher_family)
        teacher_config = config.teacher_config()
        check_memory_layers(config.memory_layers, teacher_config.num_hidden_layers)
        self.embed_tokens = nn.Embedding(teacher_config.vocab_size, teacher_config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            XLSTMHybridDecoderLayer(config, family, teacher_config, i) for i in range(teacher_config.num_hidden_layers)
        )
        self.norm = family.norm(teacher_config.hidden_size, eps=teacher_config.rms_norm_eps)
        self.rotary_emb = family.rotary(teacher_config)
        self.gradient_checkpointing = False
        self.post_init()

    def set_backends(self, mlstm: str | None = None, swa: str | None = None, decode: str | None = None) -> None:
        """Pin kernel backends for every layer; None restores the per-device default."""
        for name, registry in ((mlstm, MLSTM_BACKENDS), (swa, SWA_BACKENDS), (decode, DECODE_BACKENDS)):
            if name is not None:
                registry.get(name)  # fail early on unknown names
        for layer in self.layers:
            mixer = layer.self_attn
            mixer.mlstm_backend, mixer.swa_backend, mixer.decode_backend = mlstm, swa, decode

    def align_layers(
        self, mixer_inputs: list[Tensor], position_ids: Tensor, *, reference: bool, weight_queries: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Every layer's mixer on the given per-layer inputs (the teacher's, in stage I): its output,
        branches and gate; with `reference`, also the teacher's full attention per head and its mass
        beyond the window (from the same, teacher-copied q/k/v), in the layers with a gate. With
        `weight_queries`, at that many query positions spread over those the window no longer covers,
        also the teacher's attention weights over the keys beyond the window and the memory's weights
        over its keys (log-probabilities, (B, H, n, T)). Yields one dict per layer.

        Layer-local alignment: each mixer learns from the teacher's own hidden states, so layers train
        in parallel from one teacher pass and errors of earlier student layers do not compound.
        """
        x = mixer_inputs[0]
        layout, starts, rope_pos, _ = token_layout(
            None, position_ids, x.shape[:2], x.device, None, self.config.window_size, self.config.num_sink_tokens
        )
        rope = self.rotary_emb(x, rope_pos)
        full = dataclasses.replace(layout, window=FULL_WINDOW, sinks=0, masks={})
        first = self.config.window_size + self.config.num_sink_tokens  # the first query with a key beyond
        queries = weight_queries if first < x.shape[1] else 0  # rows no longer than the window have none
        rows = torch.linspace(first, x.shape[1] - 1, queries, device=x.device).long().unique()
        for layer, inp in zip(self.layers, mixer_inputs):
            mixer = layer.self_attn
            parts = mixer.parts(inp, rope, layout, starts, swa_lse=reference)
            out = {"output": mixer.output(parts), "parts": parts, "valid": layout.q_valid}
            gated = parts.o is not None  # what the split terms read exists only in layers with both branches
            if reference and gated:
                with torch.no_grad():
                    attention, lse = mixer.attention(parts.q, parts.k, parts.v, full, return_lse=True)
                    out["reference"] = attention.float()
                    out["beyond"] = (1 - torch.exp(parts.swa_lse.detach().float() - lse.float())).clamp(0, 1)
            if weight_queries and len(rows) and gated:
                teacher = beyond_window_log_probs(parts.q, parts.k, layout, rows, mixer.scaling)
                out["attention"] = (teacher, mixer.memory_log_weights(parts, layout, starts, rows).log_softmax(-1), rows)
            yield out

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
        """Final hidden states, the cache (given, or new when `use_cache`), and every layer's output if asked.

        With a cache, a prompt longer than ``config.prefill_chunk_length`` runs in chunks through it: the
        same result as one pass, with activation memory bounded by the chunk instead of the prompt.
        """
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # this student's cache layers, from config.layer_types
        chunk = self.config.prefill_chunk_length if cache is not None else T
        if attention_mask is not None:
            attention_mask = attention_mask[:, -T:]
        outputs = [
            self._forward_tokens(
                hidden[:, start : start + chunk],
                None if attention_mask is None else attention_mask[:, start : start + chunk],
                None if position_ids is None else position_ids[:, start : start + chunk],
                cache,
                bool(output_hidden_states),
            )
            for start in range(0, T, chunk)
        ]
        layers = [torch.cat(parts, dim=1) for parts in zip(*outputs)]
        return layers[-1], cache, tuple(layers) if output_hidden_states else None

    def _forward_tokens(
        self, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache: Cache | None,
        output_hidden_states: bool,
    ) -> list[Tensor]:
        """One pass over `hidden`'s tokens: [embeddings, every layer's output..., final normed] or [final normed]."""
        B, T = hidden.shape[:2]
        layout, starts, rope_pos, plan = token_layout(
            attention_mask, position_ids, (B, T), hidden.device, cache,
            self.config.window_size, self.config.num_sink_tokens,
        )
        rope = self.rotary_emb(hidden, rope_pos)
        all_hidden = [hidden] if output_hidden_states else []
        for idx, layer in enumerate(self.layers):
            layer_cache = cache.layers[idx] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, rope, layout, starts, layer_cache, plan)
            else:
                hidden = layer(hidden, rope, layout, starts, layer_cache, plan)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        return all_hidden[:-1] + [hidden] if output_hidden_states else [hidden]


class XLSTMHybridForCausalLM(RecurrentGenerationMixin, XLSTMHybridPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`XLSTMHybridModel`.

    Generation goes through transformers' own caches: the config's ``layer_types`` make
    ``DynamicCache`` (the default) and ``StaticCache`` (``cache_implementation="static"``) hold
    :class:`XLSTMHybridLayerCache` layers, beam search reorders them, and the static form lets
    ``torch.compile`` capture a decode step.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: XLSTMHybridConfig):
        super().__init__(config)
        self.model = XLSTMHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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

    @contextlib.contextmanager
    def record_gates(self) -> Iterator[list[list[Tensor]] | None]:
        """While the block runs, record every layer's mixing gate o (1 = mLSTM, 0 = SWA).

        Only where the memory may act, positions the window and sinks no longer cover (the gates of
        the rest are closed by ``memory_outside_window`` or, without it, do not decide anything the
        teacher's attention would not): per layer, one float32 CPU tensor (positions x heads) per
        forward call; None for a layer without a gate (``memory_layers`` leaves it out). Yields None for a
        student without a gate (mixer ``swa`` or ``mlstm``).
        """
        mixers = [layer.self_attn for layer in self.model.layers if layer.self_attn.mixer == "hybrid"]
        if not mixers:
            yield None
            return
        for mixer in mixers:
            mixer.gate_log = []
        try:
            yield [layer.self_attn.gate_log for layer in self.model.layers]
        finally:
            for mixer in mixers:
                mixer.gate_log = None


AutoConfig.register(XLSTMHybridConfig.model_type, XLSTMHybridConfig)
AutoModelForCausalLM.register(XLSTMHybridConfig, XLSTMHybridForCausalLM)
