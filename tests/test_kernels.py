"""The mLSTM backends compute the normalised mLSTM exactly, forward and backward.

mlstm_kernels' fused backward (``native_custbw`` here, the same algorithm as its triton kernels)
ignores its denominator's gradient; the extra ones-column normaliser must make every backend match
the closed form phi(q) C_t / (phi(q) n_t) and its autograd gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from merge_xlstm.student.kernels import MLSTM_BACKENDS, MLSTMBackend, TokenLayout, swa_sdpa

B, H, T, FEAT, D = 2, 2, 80, 8, 8


def closed_form(q, k, v, i, f):
    """O(T²) float64 reference: sum_s w_ts v_s / sum_s w_ts, w_ts = prod f * e^{i_s} * q_t.k_s / sqrt(F)."""
    logf = F.logsigmoid(f).cumsum(-1)
    logw = logf[..., :, None] - logf[..., None, :] + i[..., None, :]
    logw = logw.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    w = torch.exp(logw - logw.amax(-1, keepdim=True)) * (q @ k.transpose(-1, -2))
    return (w @ v) / w.sum(-1, keepdim=True)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, FEAT, generator=g).softmax(-1)
    k = torch.randn(B, H, T, FEAT, generator=g).softmax(-1)
    v = torch.randn(B, H, T, D, generator=g)
    i = torch.randn(B, H, T, generator=g)
    f = 3 + torch.randn(B, H, T, generator=g)
    f[:, :, 50] = -80.0  # a document start: the state resets
    return [q, k, v, i, f]


@pytest.mark.parametrize(
    "backend",
    [MLSTM_BACKENDS.get("native"), MLSTMBackend("chunkwise--native_custbw", "native_sequence__native", "native")],
    ids=["native_autograd", "native_custbw"],
)
def test_normalised_mlstm_and_its_gradients_are_exact(backend):
    weights = torch.linspace(-1, 1, D)
    leaves = [x.clone().requires_grad_(True) for x in inputs()]
    out, _ = backend(*leaves, None, False)
    (out * weights).sum().backward()
    ref_leaves = [x.clone().double().requires_grad_(True) for x in inputs()]
    ref = closed_form(*ref_leaves)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-4)
    for name, a, b in zip("qkvif", leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-5, rtol=1e-3, msg=f"gradient of {name}")


def test_state_carries_across_calls():
    backend = MLSTM_BACKENDS.get("native")
    q, k, v, i, f = inputs(1)
    whole, _ = backend(q, k, v, i, f, None, False)
    first, state = backend(q[:, :, :33], k[:, :, :33], v[:, :, :33], i[:, :, :33], f[:, :, :33], None, True)
    rest, _ = backend(q[:, :, 33:], k[:, :, 33:], v[:, :, 33:], i[:, :, 33:], f[:, :, 33:], state, True)
    torch.testing.assert_close(torch.cat([first, rest], 2), whole, atol=1e-5, rtol=1e-4)


def test_swa_mask_is_window_sinks_documents_and_padding():
    doc = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1], [-1, -1, 0, 1, 2, 3, 4, 5]])
    valid = pos >= 0
    layout = TokenLayout(doc, pos, valid, doc, pos, valid, window=2, sinks=1)
    mask = layout.dense_mask()[:, 0]
    # row 0, query 5 (doc 1, pos 5): itself, pos 4 (window 2) and the sink pos 0
    assert mask[0, 5].tolist() == [True, False, False, False, True, True, False, False]
    # row 0, query 7 (doc 2, pos 1): only its own document
    assert mask[0, 7].tolist() == [False] * 6 + [True, True]
    # row 1: padding keys are never seen
    assert not mask[1, 2:, :2].any()
    q = torch.randn(2, 2, 8, 4)
    assert torch.isfinite(swa_sdpa(q, q[:, :1], q[:, :1], layout, 0.5)).all()  # padding queries stay finite
