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

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from merge_xlstm.student.families import FAMILIES, Family
from merge_xlstm.student.kernels import (
    MLSTM_BACKENDS,
    SWA_BACKENDS,
    MLSTMState,
    TokenLayout,
    default_backends,
)

# Gate pre-activation that makes a gate fully open (+) or shut (-) in float32 and bfloat16:
# logsigmoid(-GATE) = -80 is a reset (e^-80 of the old state survives), exp(-GATE) ~ 1e-35 adds nothing.
GATE = 80.0
MIXERS = ("hybrid", "mlstm", "swa")


class XLSTMHybridConfig(PreTrainedConfig):
    """The teacher's config fields (flat, as the teacher had them) plus the mixer's options.

    Keeping the teacher's fields flat means everything transformers reads from a config
    (vocab_size, hidden_size, tie_word_embeddings, token ids...) is where it expects it, and
    :meth:`teacher_config` rebuilds the teacher's own config class for its MLP, norm and RoPE.
    """

    model_type = "xlstm_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    teacher_family: str = "llama"
    mixer: str = "hybrid"
    window_size: int = 512
    num_sink_tokens: int = 4
    feature_dim: int | None = None
    mlstm_rope: bool = False

    def teacher_config(self) -> PreTrainedConfig:
        own = {"teacher_family", "mixer", "window_size", "num_sink_tokens", "feature_dim", "mlstm_rope"}
        fields = {k: v for k, v in self.to_dict().items() if k not in own and k != "model_type"}
        return FAMILIES.get(self.teacher_family).config_class.from_dict(fields)


# ----------------------------------------------------------------------------------------- cache
@dataclass
class LayerState:
    """Decoding state of one layer: constant size whatever the context length."""

    mlstm: MLSTMState | None  # (C, n, m) or None before the first token / for mixer "swa"
    sink_k: Tensor  # (B, Hkv, S, D) keys of the document's first S tokens
    sink_v: Tensor
    sink_pos: Tensor  # (B, S) their positions in the document, -1 where empty
    win_k: Tensor  # (B, Hkv, W, D) the last W keys
    win_v: Tensor
    win_pos: Tensor  # (B, W) positions, -1 where empty (or a sink, which the sink slots hold)


class XLSTMHybridCache:
    """Per-layer recurrent state: mLSTM (C, n, m), the sink K/V and the last W K/V.

    ``seen[b]`` is the number of real tokens of row b's current document already processed; the next
    token's position in the document. Memory is O(layers x (H·F·D + (S + W)·Hkv·D)), independent of
    how many tokens have been decoded.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[LayerState | None] = [None] * num_layers
        self.seen: Tensor | None = None
        self.steps = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (what generate() asks to slice its inputs)."""
        return self.steps


# ------------------------------------------------------------------------------------ the mixer
class HybridMixer(nn.Module):
    """The teacher's attention projections plus the new mixer parameters of one layer."""

    def __init__(self, config: XLSTMHybridConfig, family: Family, teacher_config: PreTrainedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer = config.mixer
        self.num_heads = teacher_config.num_attention_heads
        self.num_kv_heads = teacher_config.num_key_value_heads
        self.head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.window = config.window_size
        self.sinks = config.num_sink_tokens
        self.mlstm_rope = config.mlstm_rope
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
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
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
        state: LayerState | None,
        update: "CacheUpdate | None",
    ) -> tuple[Tensor, LayerState | None]:
        """x (B, T, hidden) -> (B, T, hidden). `starts` (B, T) marks document starts among x's tokens."""
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
        default_mlstm, default_swa = default_backends(x.device)

        new_state = state
        if self.mixer in ("hybrid", "swa"):
            keys, values = k_rot, v
            if state is not None:
                keys = torch.cat([state.sink_k, state.win_k, k_rot], dim=2)
                values = torch.cat([state.sink_v, state.win_v, v], dim=2)
            swa = SWA_BACKENDS.get(self.swa_backend or default_swa)(q_rot, keys, values, layout, self.scaling)
        if self.mixer in ("hybrid", "mlstm"):
            mq, mk = (q_rot, k_rot) if self.mlstm_rope else (q, k)
            mlstm, mlstm_state = self._mlstm(
                x, mq, mk, v, layout.q_valid, starts, state, update is not None, self.mlstm_backend or default_mlstm
            )
        if update is not None:
            new_state = update.layer_state(state, k_rot, v, mlstm_state if self.mixer != "swa" else None)

        if self.mixer == "swa":
            h = swa
        elif self.mixer == "mlstm":
            h = mlstm
        else:
            o = torch.sigmoid(self.ogate(torch.cat([q_flat, k_flat, v_flat], dim=-1)))  # (B, T, H)
            o = o.transpose(1, 2).unsqueeze(-1)
            h = o * mlstm + (1 - o) * swa
        return self.o_proj(h.transpose(1, 2).reshape(B, T, H * D)), new_state

    def _mlstm(
        self,
        x: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        valid: Tensor,
        starts: Tensor,
        state: LayerState | None,
        return_state: bool,
        backend: str,
    ) -> tuple[Tensor, MLSTMState | None]:
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)  # GQA: head h reads KV head h // groups, as attention does
        v = v.repeat_interleave(groups, dim=1)
        phi_q = torch.softmax(torch.einsum("bhtd,hdf->bhtf", q, self.phi_q), dim=-1)
        phi_k = torch.softmax(torch.einsum("bhtd,hdf->bhtf", k, self.phi_k), dim=-1)
        i = self.igate(x).transpose(1, 2)  # (B, H, T)
        f = self.fgate(x).transpose(1, 2)
        pad = ~valid[:, None, :]
        # Padding: input shut, forget open -> state untouched. Document start: forget shut -> state reset.
        # The kernels take one dtype for all inputs (autocast leaves softmax outputs in float32).
        i = torch.where(pad, -GATE, i)
        f = torch.where(pad, GATE, torch.where(starts[:, None, :], -GATE, f))
        initial = state.mlstm if state is not None else None
        out, last = MLSTM_BACKENDS.get(backend)(
            phi_q.to(v.dtype), phi_k.to(v.dtype), v, i.to(v.dtype), f.to(v.dtype), initial, return_state=return_state
        )
        return out.to(v.dtype), last


# --------------------------------------------------------------------------- bookkeeping of a batch
@dataclass
class CacheUpdate:
    """Folds one forward pass's new keys into a layer's decoding state (sinks, window, mLSTM).

    Only the row's *last* document is kept: a document start inside the new tokens drops what the
    cache held before, which is what a reset means.
    """

    pos: Tensor  # (B, T) positions of the new tokens in their documents, -1 for padding
    keep: Tensor  # (B, T) new tokens that belong to the row's last document
    restart: Tensor  # (B,) rows whose new tokens start a new document
    window: int
    sinks: int

    # Positions are the same in every layer: computed once per forward pass, not once per layer.
    @cached_property
    def kept_pos(self) -> Tensor:
        """(B, T) document positions of the tokens the cache keeps, -1 elsewhere."""
        return torch.where(self.keep, self.pos, -1)

    @cached_property
    def sink_hits(self) -> Tensor:
        """(B, T, S) bool: new token t is the document's sink number s."""
        pos = self.kept_pos[:, :, None]
        return (pos == torch.arange(self.sinks, device=pos.device)) & (pos >= 0)

    def layer_state(self, old: LayerState | None, k: Tensor, v: Tensor, mlstm: MLSTMState | None) -> LayerState:
        B, Hkv, T, D = k.shape
        S, W = self.sinks, self.window
        if old is None:
            old = LayerState(
                mlstm=None,
                sink_k=k.new_zeros(B, Hkv, S, D), sink_v=v.new_zeros(B, Hkv, S, D),
                sink_pos=self.pos.new_full((B, S), -1),
                win_k=k.new_zeros(B, Hkv, W, D), win_v=v.new_zeros(B, Hkv, W, D),
                win_pos=self.pos.new_full((B, W), -1),
            )
        pos, hit = self.kept_pos, self.sink_hits
        fresh = self.restart[:, None]
        # sinks: slot j takes the kept new token at document position j, else keeps its old content
        took = hit.any(1)  # (B, S)
        sel = hit.to(k.dtype)
        sink_k = torch.einsum("bts,bhtd->bhsd", sel, k)
        sink_v = torch.einsum("bts,bhtd->bhsd", sel, v)
        old_sink = (~took & ~fresh)[:, None, :, None]
        sink_k = torch.where(old_sink, old.sink_k, sink_k)
        sink_v = torch.where(old_sink, old.sink_v, sink_v)
        sink_pos = torch.where(took, torch.arange(S, device=pos.device).expand(B, S), torch.where(fresh, -1, old.sink_pos))
        # window: the last W tokens, sinks excluded (the sink slots already hold them)
        old_win_pos = torch.where(fresh, -1, old.win_pos)
        win_pos = torch.cat([old_win_pos, torch.where(pos >= S, pos, -1)], dim=1)[:, -W:]
        win_k = torch.cat([old.win_k, k], dim=2)[:, :, -W:]
        win_v = torch.cat([old.win_v, v], dim=2)[:, :, -W:]
        return LayerState(mlstm, sink_k, sink_v, sink_pos, win_k, win_v, win_pos)


def token_layout(
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    cache: XLSTMHybridCache | None,
    window: int,
    sinks: int,
) -> tuple[TokenLayout, Tensor, Tensor, CacheUpdate | None]:
    """Documents, in-document positions and validity of a batch's tokens (and of cached keys).

    Returns the layout, the document-start flags, the RoPE position ids, and the cache update.
    """
    B, T = shape
    valid = torch.ones(B, T, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid = attention_mask[:, -T:].to(device=device, dtype=torch.bool)
    seen = cache.seen if cache is not None and cache.seen is not None else torch.zeros(B, dtype=torch.long, device=device)
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
    update = None
    if cache is not None:
        state = next((s for s in cache.layers if s is not None), None)
        if state is not None:
            k_pos = torch.cat([state.sink_pos, state.win_pos, pos], dim=1)
            k_valid = k_pos >= 0
            k_doc = torch.cat([doc.new_zeros(B, sinks + window), doc], dim=1)
        last_doc = torch.where(valid, doc, -1).max(1).values.clamp_min(0)  # (B,)
        update = CacheUpdate(
            pos=pos, keep=valid & (doc == last_doc[:, None]), restart=last_doc > 0, window=window, sinks=sinks
        )
        last_pos = torch.where(valid, pos, -1).max(1).values
        cache.seen = torch.where(last_pos >= 0, last_pos + 1, seen)
    layout = TokenLayout(doc, pos, valid, k_doc, k_pos, k_valid, window=window, sinks=sinks)
    return layout, starts, position_ids, update


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

    def forward(self, hidden: Tensor, *mixer_args: Any) -> tuple[Tensor, LayerState | None]:
        attn, state = self.self_attn(self.mixer_input(hidden), *mixer_args)
        if self.post_norm:
            hidden = hidden + self.post_attention_layernorm(attn)
            return hidden + self.post_feedforward_layernorm(self.mlp(hidden)), state
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), state


class XLSTMHybridPreTrainedModel(PreTrainedModel):
    config_class = XLSTMHybridConfig
    config: XLSTMHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XLSTMHybridDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

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
        self.embed_tokens = nn.Embedding(teacher_config.vocab_size, teacher_config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            XLSTMHybridDecoderLayer(config, family, teacher_config, i) for i in range(teacher_config.num_hidden_layers)
        )
        self.norm = family.norm(teacher_config.hidden_size, eps=teacher_config.rms_norm_eps)
        self.rotary_emb = family.rotary(teacher_config)
        self.gradient_checkpointing = False
        self.post_init()

    def set_backends(self, mlstm: str | None = None, swa: str | None = None) -> None:
        """Pin kernel backends for every layer; None restores the per-device default."""
        for name, registry in ((mlstm, MLSTM_BACKENDS), (swa, SWA_BACKENDS)):
            if name is not None:
                registry.get(name)  # fail early on unknown names
        for layer in self.layers:
            layer.self_attn.mlstm_backend, layer.self_attn.swa_backend = mlstm, swa

    def mixer_outputs(self, mixer_inputs: list[Tensor], position_ids: Tensor) -> list[Tensor]:
        """Every layer's mixer applied to the given per-layer inputs (the teacher's, in stage I).

        Layer-local alignment: each mixer learns from the teacher's own hidden states, so layers train
        in parallel from one teacher pass and errors of earlier student layers do not compound.
        """
        x = mixer_inputs[0]
        layout, starts, rope_pos, _ = token_layout(
            None, position_ids, x.shape[:2], x.device, None, self.config.window_size, self.config.num_sink_tokens
        )
        rope = self.rotary_emb(x, rope_pos)
        return [
            layer.self_attn(inp, rope, layout, starts, None, None)[0] for layer, inp in zip(self.layers, mixer_inputs)
        ]

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: XLSTMHybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> tuple[Tensor, XLSTMHybridCache | None, tuple[Tensor, ...] | None]:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = XLSTMHybridCache(len(self.layers))
        cache = past_key_values if use_cache or past_key_values is not None else None
        layout, starts, rope_pos, update = token_layout(
            attention_mask, position_ids, (B, T), hidden.device, cache,
            self.config.window_size, self.config.num_sink_tokens,
        )
        rope = self.rotary_emb(hidden, rope_pos)
        all_hidden = (hidden,) if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            state = cache.layers[idx] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                hidden, state = self._gradient_checkpointing_func(layer.__call__, hidden, rope, layout, starts, state, update)
            else:
                hidden, state = layer(hidden, rope, layout, starts, state, update)
            if cache is not None:
                cache.layers[idx] = state
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        if cache is not None:
            cache.steps += T
        return hidden, cache, all_hidden


class XLSTMHybridForCausalLM(XLSTMHybridPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`XLSTMHybridModel`.

    The class name contains "xlstm", so transformers' generate() creates no DynamicCache for it
    (REFERENCE.md §6); the model creates its own :class:`XLSTMHybridCache` when ``use_cache`` is set,
    returns it as ``past_key_values``, and generate() hands it back with only the new token.
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
        past_key_values: XLSTMHybridCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        hidden, cache, all_hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache, hidden_states=all_hidden)


AutoConfig.register(XLSTMHybridConfig.model_type, XLSTMHybridConfig)
AutoModelForCausalLM.register(XLSTMHybridConfig, XLSTMHybridForCausalLM)
