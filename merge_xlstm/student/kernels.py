"""Kernel backends of the hybrid mixer, chosen per device behind one small registry.

- mLSTM: mlstm_kernels' chunkwise kernels for sequences (triton on GPU, native PyTorch on CPU),
  its step kernel for decoding, and its recurrent kernel for the tail of lengths that are not a
  multiple of the chunk size. ``wrap_chunkwise__arbitrary_sequence_length`` stitches the three
  together and carries the (C, n, m) state, so prefill and decoding share one entry point.
- Sliding-window attention: a dense boolean mask through SDPA (any device; the reference), or
  FlexAttention with a block mask on CUDA, which skips the blocks outside window and sinks and so
  costs O(T·W) instead of O(T²).

Both take the same :class:`TokenLayout` (document index, position in document, validity), so the
backends cannot disagree about which keys a query sees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_sequence_kernel, get_mlstm_step_kernel
from mlstm_kernels.torch.kernel_wrappers import wrap_chunkwise__arbitrary_sequence_length
from torch import Tensor

from merge_xlstm.registry import Registry

MLSTMState = tuple[Tensor, Tensor, Tensor]  # C (B, H, F, D), n (B, H, F), m (B, H, 1)


@dataclass(frozen=True)
class MLSTMBackend:
    chunkwise: str
    sequence: str
    step: str
    chunk_size: int = 64

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: MLSTMState | None, return_state: bool
    ) -> tuple[Tensor, MLSTMState | None]:
        """q, k (B, H, T, F); v (B, H, T, D); i, f gate pre-activations (B, H, T)."""
        c, n, m = state if state is not None else (None, None, None)
        out = wrap_chunkwise__arbitrary_sequence_length(
            mlstm_chunkwise_kernel=functools.partial(get_mlstm_kernel(self.chunkwise)),
            mlstm_sequence_kernel=get_mlstm_sequence_kernel(self.sequence),
            mlstm_step_kernel=get_mlstm_step_kernel(self.step),
            q=q, k=k, v=v, i=i, f=f,
            c_initial=c, n_initial=n, m_initial=m,
            return_last_states=return_state,
            autocast_kernel_dtype=q.dtype,
            chunk_size=self.chunk_size,
        )
        return out if return_state else (out, None)


MLSTM_BACKENDS: Registry[MLSTMBackend] = Registry("mlstm backend")
MLSTM_BACKENDS.register("native")(MLSTMBackend("chunkwise--native_autograd", "native_sequence__native", "native"))
# bf16 needs triton_limit_chunk: triton_xl_chunk crashes the Triton 3.6 compiler in bf16 (REFERENCE.md §6).
MLSTM_BACKENDS.register("triton")(
    MLSTMBackend("chunkwise--triton_limit_chunk", "native_sequence__triton", "triton", chunk_size=64)
)


@dataclass
class TokenLayout:
    """Which keys each query may see, for a batch of (possibly packed, left-padded) rows.

    doc: (B, T) document index within the row (keys from a cache belong to document 0, the one the
    cache continues); pos: (B, T) position inside the document; valid: (B, T) False for padding.
    Keys carry the same three fields (``k_*``), queries the first two (``q_*``).
    """

    q_doc: Tensor
    q_pos: Tensor
    q_valid: Tensor
    k_doc: Tensor
    k_pos: Tensor
    k_valid: Tensor
    window: int
    sinks: int

    def dense_mask(self) -> Tensor:
        """(B, 1, Tq, Tk) bool: same document, causal, inside the window or a sink, not padding."""
        q_doc, q_pos = self.q_doc[:, :, None], self.q_pos[:, :, None]
        k_doc, k_pos = self.k_doc[:, None, :], self.k_pos[:, None, :]
        allowed = (
            self.k_valid[:, None, :]
            & (q_doc == k_doc)
            & (k_pos <= q_pos)
            & ((q_pos - k_pos < self.window) | (k_pos < self.sinks))
        )
        # A padding query sees no key; let it see the last key so softmax stays finite (its output is unused).
        no_key = ~allowed.any(-1, keepdim=True)
        last = torch.zeros_like(allowed)
        last[..., -1] = True
        return (allowed | (no_key & last))[:, None]


def swa_sdpa(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, scale: float) -> Tensor:
    """Reference SWA: SDPA with the dense mask. q (B, H, Tq, D); k, v (B, Hkv, Tk, D)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.dense_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def swa_flex(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, scale: float) -> Tensor:
    """FlexAttention with a sliding-window + sinks block mask (CUDA, no cache: Tq == Tk)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.where(layout.k_valid, layout.k_doc, -1)
    pos, window, sinks = layout.k_pos, layout.window, layout.sinks

    def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        same = (doc[b, qi] == doc[b, ki]) | (qi == ki)  # padding queries see themselves only
        near = (pos[b, qi] - pos[b, ki] < window) | (pos[b, ki] < sinks)
        return same & (ki <= qi) & near

    B, _, T, _ = q.shape
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


SWA_BACKENDS: Registry[Callable[..., Tensor]] = Registry("swa backend")
SWA_BACKENDS.register("sdpa")(swa_sdpa)
SWA_BACKENDS.register("flex")(swa_flex)


def default_backends(device: torch.device) -> tuple[str, str]:
    """(mlstm, swa) backend names for a device: triton + flex on CUDA, native + sdpa elsewhere."""
    return ("triton", "flex") if device.type == "cuda" else ("native", "sdpa")
