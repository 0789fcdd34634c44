"""Stage I's split of the teacher's attention into the window part and the rest (issue 12).

The terms rest on an identity: softmax attention over all keys = a·(attention over the window and
sinks) + (1 - a)·(attention over the keys beyond them), a the softmax mass on the window. These tests
check that the student's quantities (its SWA branch, its log-sum-exp, the full reference) satisfy it
exactly, against a hand-written dense softmax, and that training on the terms moves the gate and the
memory toward the teacher's split.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from merge_xlstm.linearize.stage1 import LayerAlignment, STAGE1_TERMS, binary_kl
from merge_xlstm.student import from_teacher, new_parameters
from merge_xlstm.student.modeling_xlstm_hybrid import token_layout
from merge_xlstm.testing import tiny_teacher

W, S, T = 6, 2, 40


def aligned_layers(student: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> list[dict]:
    inputs = [x] * len(student.model.layers)
    return list(student.model.align_layers(inputs, position_ids, reference=True))


@pytest.fixture(params=["all", "evicted"])  # what the memory holds: every key, or those the window let go
def setup(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = tiny_teacher("qwen2")  # GQA: 4 query heads on 2 KV heads
    student = from_teacher(teacher, mixer="hybrid", window_size=W, num_sink_tokens=S, memory_keys=request.param)
    x = torch.randn(2, T, teacher.config.hidden_size) * 3
    position_ids = torch.stack([torch.arange(T), torch.cat([torch.arange(15), torch.arange(T - 15)])])  # row 1: 2 docs
    return student, x, position_ids


@torch.no_grad()
def test_teacher_attention_is_window_part_plus_beyond_window_part(setup) -> None:
    student, x, position_ids = setup
    layer = aligned_layers(student, x, position_ids)[0]
    parts, beyond, reference = layer["parts"], layer["beyond"], layer["reference"]
    # by hand: dense scores, the window rule and its complement within the causal document
    q, k, v = parts.q, parts.k.repeat_interleave(2, 1), parts.v.repeat_interleave(2, 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    pos = position_ids[:, None, :, None], position_ids[:, None, None, :]
    doc = position_ids.eq(0).cumsum(1)
    same = (doc[:, None, :, None] == doc[:, None, None, :]) & (pos[1] <= pos[0])
    window = same & ((pos[0] - pos[1] < W) | (pos[1] < S))
    full = torch.softmax(scores.masked_fill(~same, float("-inf")), -1) @ v
    mass = torch.softmax(scores.masked_fill(~same, float("-inf")), -1).masked_fill(~window, 0).sum(-1)
    outside = torch.softmax(scores.masked_fill(~(same & ~window), float("-inf")), -1).nan_to_num(0.0) @ v
    torch.testing.assert_close(reference, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(beyond, 1 - mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.lerp(parts.swa, outside, beyond[..., None]), reference, rtol=1e-5, atol=1e-5)
    covered = position_ids < W + S  # window and sinks still cover the whole document: nothing lies beyond
    assert torch.equal(beyond.transpose(1, 2)[covered], torch.zeros_like(beyond.transpose(1, 2)[covered]))
    assert (beyond.transpose(1, 2)[~covered] > 0).all()


@torch.no_grad()
def test_terms_vanish_at_the_teachers_split(setup) -> None:
    student, x, position_ids = setup
    layer = aligned_layers(student, x, position_ids)[0]
    parts = layer["parts"]
    exact_gate = layer["beyond"][..., None]
    # the memory term with the mLSTM branch replaced by the reference itself where it matters:
    # lerp(swa, m, b) = ref  <=>  m = swa + (ref - swa) / b  (b > 0)
    b = layer["beyond"][..., None].clamp_min(1e-6)
    ideal_memory = parts.swa + (layer["reference"] - parts.swa) / b
    ideal = LayerAlignment(target=layer["output"], **{**layer, "parts": type(parts)(
        parts.q, parts.k, parts.v, parts.swa, parts.swa_lse, ideal_memory, exact_gate)})
    assert STAGE1_TERMS.get("gate").fn(ideal).item() == pytest.approx(0.0, abs=1e-5)
    assert STAGE1_TERMS.get("memory").fn(ideal).item() == pytest.approx(0.0, abs=1e-8)
    assert STAGE1_TERMS.get("memory_share").fn(ideal).item() == pytest.approx(0.0, abs=1e-6)
    actual = LayerAlignment(target=layer["output"], **layer)
    assert STAGE1_TERMS.get("gate").fn(actual).item() > 1e-3  # the initial gate (0.5 or 0) is not the split


def test_binary_kl_is_zero_only_at_the_target() -> None:
    target = torch.tensor([0.0, 0.3, 1.0])
    assert binary_kl(target, target).abs().max() < 1e-5
    assert (binary_kl(target, torch.tensor([0.5, 0.5, 0.5])) > 0.01).all()


def test_training_on_the_split_moves_gate_and_memory_toward_the_teacher(setup) -> None:
    student, x, position_ids = setup
    params = new_parameters(student)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    history = []
    for _ in range(40):
        layers = [LayerAlignment(target=l["output"].detach(), **l) for l in aligned_layers(student, x, position_ids)]
        gate = sum(STAGE1_TERMS.get("gate").fn(l) for l in layers)
        memory = sum(STAGE1_TERMS.get("memory").fn(l) for l in layers)
        optimizer.zero_grad()
        (gate + memory).backward()
        optimizer.step()
        history.append((gate.item(), memory.item()))
    assert history[-1][0] < 0.5 * history[0][0] and history[-1][1] < history[0][1]


def test_memory_share_weighs_the_mlstm_error_by_the_share_not_its_square(setup) -> None:
    """With the same share b everywhere, memory_share = memory / b²: the mLSTM error ||mLSTM - O||² itself."""
    student, x, position_ids = setup
    layer = aligned_layers(student, x, position_ids)[0]
    valid = torch.ones_like(layer["valid"])
    for b in (0.05, 0.5):
        flat = LayerAlignment(target=layer["output"], **{**layer, "valid": valid,
                                                         "beyond": torch.full_like(layer["beyond"], b)})
        memory, share = STAGE1_TERMS.get("memory").fn(flat), STAGE1_TERMS.get("memory_share").fn(flat)
        torch.testing.assert_close(share, memory / b**2, rtol=1e-5, atol=0)


@torch.no_grad()
def test_memory_log_weights_reproduce_the_memory_branch(setup) -> None:
    """The memory's weights over keys (what attention_transfer compares) average the values into exactly
    the mLSTM branch, wherever the window no longer covers the document."""
    student, x, position_ids = setup
    g = torch.Generator().manual_seed(1)
    for p in new_parameters(student):  # generic feature maps and gates, not the initial ones
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
    layout, starts, rope_pos, _ = token_layout(None, position_ids, x.shape[:2], x.device, None, W, S)
    mixer = student.model.layers[0].self_attn
    parts = mixer.parts(x, student.model.rotary_emb(x, rope_pos), layout, starts)
    rows = torch.arange(W + S, T)
    weights = mixer.memory_log_weights(parts, layout, starts, rows).softmax(-1)
    values = parts.v.repeat_interleave(mixer.num_heads // mixer.num_kv_heads, 1)
    past = (layout.q_pos[:, rows] >= W + S)[:, None, :, None]  # (B, 1, n, 1): the memory holds keys there
    torch.testing.assert_close(torch.where(past, weights @ values, 0), torch.where(past, parts.mlstm[:, :, rows], 0),
                               atol=1e-5, rtol=1e-4)


def test_attention_transfer_vanishes_at_the_teachers_weights_and_training_lowers_it(setup) -> None:
    student, x, position_ids = setup
    term = STAGE1_TERMS.get("attention_transfer").fn

    def layers() -> list[LayerAlignment]:
        out = student.model.align_layers([x] * len(student.model.layers), position_ids, reference=True, weight_queries=16)
        return [LayerAlignment(target=l["output"].detach(), **l) for l in out]

    short = student.model.align_layers([x[:, : W + S]] * 2, position_ids[:, : W + S], reference=True, weight_queries=16)
    assert "attention" not in next(short)  # rows the window covers whole: no query to compare
    first = layers()[0]
    teacher, _, rows = first.attention
    assert len(rows) == 16 and teacher.isfinite().any()
    assert term(dataclasses.replace(first, attention=(teacher, teacher, rows))).item() == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.Adam(new_parameters(student), lr=1e-2)
    history = []
    for _ in range(20):
        value = sum(term(layer) for layer in layers())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        history.append(value.item())
    assert all(math.isfinite(h) for h in history) and history[-1] < 0.8 * history[0], history
