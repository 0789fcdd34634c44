"""Kernel backends of the hybrid mixer, chosen per device behind one small registry.

- mLSTM: mlstm_kernels' chunkwise kernels for sequences (triton on GPU, native PyTorch on CPU),
  its native step kernel for decoding, and its native recurrent kernel for the tail of lengths that
  are not a multiple of the chunk size. ``wrap_chunkwise__arbitrary_sequence_length`` stitches the
  three together and carries the (C, n, m) state, so prefill and decoding share one entry point.
- Decode step of a hybrid layer: the same branch code as any pass, or one fused Triton kernel
  (fused_decode.py), the CUDA default.
- Sliding-window attention: a dense boolean mask through SDPA (any device; the reference), or
  FlexAttention with a block mask on CUDA, which skips the blocks outside window and sinks and so
  costs O(T·W) instead of O(T²).

Both take the same :class:`TokenLayout` (document index, position in document, validity), so the
backends cannot disagree about which keys a query sees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_sequence_kernel, get_mlstm_step_kernel
from mlstm_kernels.torch.kernel_wrappers import wrap_chunkwise__arbitrary_sequence_length
from torch import Tensor

from merge_xlstm.registry import Registry

MLSTMState = tuple[Tensor, Tensor, Tensor]  # C (B, H, F, D), n (B, H, F), m (B, H, 1)


@dataclass(frozen=True)
class MLSTMBackend:
    """One mlstm_kernels configuration computing the normalised mLSTM  phi(q) C_t / (phi(q) n_t).

    The normaliser is computed as an extra value column of ones: the kernel's output for that column
    is phi(q) n_t over the kernel's own denominator max(|phi(q) n_t|, e^-m_t), so dividing the value
    columns by it yields exactly phi(q) C_t / (phi(q) n_t), the kernel's denominator cancelling. This
    matters for training: mlstm_kernels' custom and triton backward passes do not differentiate
    through their denominator (measured: gradients of q, k, i, f off by 25-120% against autograd and
    finite differences, bench/mlstm_kernel_check.py), while the numerator's backward is exact, so the
    ratio gets exact gradients from every backend (tests/test_kernels.py). That holds within one kernel
    call: the fused backward is not exact through states handed from one call to the next, so training
    runs the whole (end-padded) sequence through a single chunkwise call.
    """

    chunkwise: str
    sequence: str
    step: str
    chunk_size: int = 64
    value_multiple: int = 1  # triton kernels want head dims in multiples of 16
    # mlstm_kernels' native kernels keep float32 states and multiply them with the inputs, which fails
    # for bfloat16 inputs: they compute in float32 and return the input's dtype.
    float32_only: bool = False

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: MLSTMState | None, return_state: bool
    ) -> tuple[Tensor, MLSTMState | None]:
        """q, k (B, H, T, F); v (B, H, T, D); i, f gate pre-activations (B, H, T); one dtype for all."""
        if self.float32_only and q.dtype != torch.float32:
            h, last = self(*(x.float() for x in (q, k, v, i, f)), state, return_state)
            return h.to(q.dtype), last
        D = v.shape[-1]
        extra = 1 + (-(D + 1)) % self.value_multiple
        ones = torch.zeros(*v.shape[:-1], extra, dtype=v.dtype, device=v.device)
        ones[..., 0] = 1
        v = torch.cat([v, ones], dim=-1)
        if return_state:  # prefill / decoding: any length, carrying (C, n, m); no gradients needed
            c, n, m = state if state is not None else (None, None, None)
            h, last = wrap_chunkwise__arbitrary_sequence_length(
                mlstm_chunkwise_kernel=get_mlstm_kernel(self.chunkwise),
                mlstm_sequence_kernel=get_mlstm_sequence_kernel(self.sequence),
                mlstm_step_kernel=get_mlstm_step_kernel(self.step),
                q=q, k=k, v=v, i=i, f=f, c_initial=c, n_initial=n, m_initial=m,
                return_last_states=True, autocast_kernel_dtype=q.dtype, chunk_size=self.chunk_size,
            )
        else:  # training: one chunkwise call over the sequence zero-padded at the end (causal: harmless),
            # because the fused backward passes no exact gradient through states handed between calls
            T = q.shape[2]
            pad = (-T) % self.chunk_size
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            i, f = F.pad(i, (0, pad)), F.pad(f, (0, pad))
            h = get_mlstm_kernel(self.chunkwise)(
                q=q, k=k, v=v, i=i, f=f, chunk_size=self.chunk_size, autocast_kernel_dtype=q.dtype
            )[:, :, :T]
            last = None
        # Only padding (input gate shut since the document began) has a vanishing normaliser.
        normaliser = h[..., D : D + 1].clamp_min(1e-30)
        return h[..., :D] / normaliser, last


MLSTM_BACKENDS: Registry[MLSTMBackend] = Registry("mlstm backend")
MLSTM_BACKENDS.register("native")(
    MLSTMBackend("chunkwise--native_autograd", "native_sequence__native", "native", float32_only=True)
)
# bf16 needs triton_limit_chunk: triton_xl_chunk crashes the Triton 3.6 compiler in bf16 (REFERENCE.md §6).
# The tail of a cached pass (length not a multiple of the chunk) and an uncompiled decode step take the native
# step: mlstm_kernels' triton step kernel (and the sequence kernel built on it) disagrees with the native step
# on value blocks that are not a multiple of its 64-wide tile, which the normaliser's column makes ours (D + 16).
MLSTM_BACKENDS.register("triton")(
    MLSTMBackend("chunkwise--triton_limit_chunk", "native_sequence__native", "native", chunk_size=64, value_multiple=16)
)


@dataclass
class TokenLayout:
    """Which keys each query may see, for a batch of (possibly packed, left-padded) rows.

    doc: (B, T) document index within the row (keys from a cache belong to document 0, the one the
    cache continues); pos: (B, T) position inside the document; valid: (B, T) False for padding.
    Keys carry the same three fields (``k_*``), queries the first two (``q_*``). With a cache the keys
    are the cached slots followed by the step's own tokens, so there are more keys than queries.

    Masks are built at most once per forward pass (all layers share the layout); ``masks`` holds them.
    """

    q_doc: Tensor
    q_pos: Tensor
    q_valid: Tensor
    k_doc: Tensor
    k_pos: Tensor
    k_valid: Tensor
    window: int
    sinks: int
    masks: dict[str, Any] = field(default_factory=dict)

    def allowed(self, q_doc: Tensor, q_pos: Tensor, k_doc: Tensor, k_pos: Tensor, k_valid: Tensor) -> Tensor:
        """The rule, broadcasting: same document, not in the future, inside the window or a sink, not padding."""
        return k_valid & (q_doc == k_doc) & (k_pos <= q_pos) & ((q_pos - k_pos < self.window) | (k_pos < self.sinks))

    def dense_mask(self) -> Tensor:
        """(B, 1, Tq, Tk) bool. Quadratic in memory: for CPU, short steps (decoding) and tests only."""
        if "dense" not in self.masks:
            allowed = self.allowed(
                self.q_doc[:, :, None], self.q_pos[:, :, None],
                self.k_doc[:, None, :], self.k_pos[:, None, :], self.k_valid[:, None, :],
            )
            # A padding query sees no key; let it see the last key so softmax stays finite (its output is unused).
            no_key = ~allowed.any(-1, keepdim=True)
            last = torch.zeros_like(allowed)
            last[..., -1] = True
            self.masks["dense"] = (allowed | (no_key & last))[:, None]
        return self.masks["dense"]

    def block_mask(self) -> Any:
        """FlexAttention block mask of the same rule, for any number of queries and keys.

        Built by a compiled ``create_block_mask``, which evaluates the rule block by block, so no
        (Tq, Tk) tensor is ever materialised: memory stays linear in the length. The kernel evaluates
        the rule again for every score of a block the window or a sink cuts, so the rule is written
        from the indices alone where the layout allows (:meth:`is_one_document`) and reads the
        layout's per-token tensors only where it must (packed rows, padding, cached slots).
        """
        if "block" not in self.masks:
            (B, Tq), Tk = self.q_doc.shape, self.k_doc.shape[1]
            mask_mod = self._index_rule(Tk - Tq) if self.is_one_document() else self._token_rule()
            self.masks["block"] = _compiled_block_mask()(mask_mod, B, None, Tq, Tk, device=self.q_doc.device)
        return self.masks["block"]

    def is_one_document(self) -> bool:
        """Every row one document without padding whose keys are its first `sinks` positions (or fewer)
        followed by one run of consecutive positions that ends with the queries: an uncached pass over
        unpacked rows, a prefill into a fresh cache (keys 0..T-1), or a long pass continuing a cache whose
        slots come in position order (sinks, then the last W positions: CachePlan.order). Distances inside
        the run are distances in positions, so the rule can be written from indices (one host sync)."""
        (_, Tq), Tk = self.q_doc.shape, self.k_doc.shape[1]
        if Tq > Tk:
            return False
        head = min(self.sinks, Tk)
        index = torch.arange(Tk, device=self.k_pos.device)
        run = self.k_pos[:, head:]
        return bool(
            self.k_valid.all() & self.q_valid.all() & (self.k_doc == self.k_doc[:, :1]).all()
            & (self.q_doc == self.k_doc[:, :1]).all()
            & (self.k_pos[:, :head] == index[:head]).all()
            & (run == run[:, :1] + index[: Tk - head]).all() & (run[:, :1] >= head).all()
            & (self.q_pos == self.k_pos[:, Tk - Tq :]).all()
        )

    def _index_rule(self, offset: int) -> Callable[..., Tensor]:
        """The rule of a one-document layout: query qi is key qi + offset; keys below `sinks` are the sinks,
        the others one run of positions, in which index distances are position distances."""
        window, sinks = self.window, self.sinks

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            q = qi + offset
            return (ki <= q) & ((q - ki < window) | (ki < sinks))

        return mask_mod

    def _token_rule(self) -> Callable[..., Tensor]:
        """The rule read from each token's document, position and validity (any layout)."""
        q_doc, q_pos = self.q_doc, self.q_pos
        k_doc, k_pos, k_valid = self.k_doc, self.k_pos, self.k_valid

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return self.allowed(q_doc[b, qi], q_pos[b, qi], k_doc[b, ki], k_pos[b, ki], k_valid[b, ki])

        return mask_mod


def swa_sdpa(
    q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, scale: float, return_lse: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference SWA: SDPA with the dense mask. q (B, H, Tq, D); k, v (B, Hkv, Tk, D).

    With `return_lse` also the log-sum-exp of each query's allowed scores (B, H, Tq), -inf for a
    query with none, computed explicitly (SDPA does not return it).
    """
    # Under autocast RoPE's float32 tables promote q and k but not v; CUDA's autocast casts SDPA's inputs
    # to one dtype, the CPU's does not, so this does.
    q, k = q.to(v.dtype), k.to(v.dtype)
    mask = layout.dense_mask()
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    allowed = layout.allowed(
        layout.q_doc[:, None, :, None], layout.q_pos[:, None, :, None],
        layout.k_doc[:, None, None, :], layout.k_pos[:, None, None, :], layout.k_valid[:, None, None, :],
    )
    scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return (weights @ v.float()).to(q.dtype), lse


# Below one block of queries (decoding, short steps), the dense mask is small and SDPA is the right tool.
FLEX_MIN_QUERIES = 128


def swa_flex(
    q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, scale: float, return_lse: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """FlexAttention with a sliding-window + sinks block mask (CUDA): O(T·W) time, O(T) memory.

    A padding query whose row has no key gets 0 from flex (instead of SDPA's NaN); its output is unused.
    """
    if q.shape[2] < FLEX_MIN_QUERIES:
        return swa_sdpa(q, k, v, layout, scale, return_lse)
    out = _compiled_flex()(
        q, k, v, block_mask=layout.block_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1], **_lse_request(return_lse)
    )
    if not return_lse:
        return out
    return out[0], getattr(out[1], "lse", out[1])  # AuxOutput (torch >= 2.9) or the bare lse (older)


def _lse_request(return_lse: bool) -> dict[str, Any]:
    """flex_attention's way to ask for the log-sum-exp: ``return_aux`` where it exists, else ``return_lse``."""
    if not return_lse:
        return {}
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


@functools.cache
def _compiled_block_mask() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


# flex_attention is compiled once per input shape (batch, queries, keys): a server sees a few shapes,
# an evaluation (several prompt lengths and batch sizes, chunked prefills) dozens. Past dynamo's default
# of 8, a compiled function falls back to eager, which for flex means materialising every score.
FLEX_SHAPES = 64


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_SHAPES)
    return torch.compile(flex_attention, dynamic=False)


SWA_BACKENDS: Registry[Callable[..., Tensor]] = Registry("swa backend")
SWA_BACKENDS.register("sdpa")(swa_sdpa)
SWA_BACKENDS.register("flex")(swa_flex)


# A decode step of a hybrid layer (one token per row after a cached pass): through the same branch code as
# every pass, or one Triton kernel for gates, window, memory and mix (fused_decode.py). Entries take the mixer and
# its forward's arguments and return its output.
DECODE_BACKENDS: Registry[Callable[..., Tensor]] = Registry("decode backend")
DECODE_BACKENDS.register("layers")(lambda mixer, *args: mixer.output(mixer.parts(*args)))
DECODE_BACKENDS.register("fused")(lambda mixer, *args: mixer.fused_step(*args))


def default_backends(device: torch.device) -> tuple[str, str, str]:
    """(mlstm, swa, decode) backend names for a device: triton + flex + fused on CUDA, native + sdpa +
    layers elsewhere."""
    return ("triton", "flex", "fused") if device.type == "cuda" else ("native", "sdpa", "layers")
