"""The fused decode step (one Triton kernel per layer) computes what the layer-by-layer path computes.

Run on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET), in float32: every step's
logits and, after the last step, every cache buffer (the ring's keys, values, memory keys and input
gates, the slot positions, the mLSTM's C, n, m) must equal the layer-by-layer path's. The steps cross
the point where the window first lets keys go (the memory's input gate opens), a document start in the
middle of decoding, and a left-padded row; a window longer than one block of the kernel's softmax runs
the loop over blocks. generate() through the fused step (greedy, static cache, beam search, sampling)
is tested with the other students in tests/test_generation.py (``hybrid_fused``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from merge_xlstm.student import from_teacher
from merge_xlstm.student.cache import output_cache
from merge_xlstm.student.fused_decode import BLOCK_SLOTS, fusable
from merge_xlstm.student.kernels import default_backends
from merge_xlstm.testing import tiny_teacher


def randomised(student: torch.nn.Module) -> torch.nn.Module:
    """The student with its new parameters drawn at random: zero gates would hide a wrong gate path."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in student.model.layers:
            mixer = layer.self_attn
            for param in (mixer.phi_q, mixer.phi_k, *mixer.igate.parameters(), *mixer.fgate.parameters(),
                          *mixer.ogate.parameters()):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return student


def student_of(family: str, **options: object) -> torch.nn.Module:
    teacher = tiny_teacher(family)
    options = {"window_size": 4, "num_sink_tokens": 2} | options
    return randomised(from_teacher(teacher, kind="hybrid", **options)).eval()


def decode(student: torch.nn.Module, backend: str, prompt_len: int, steps: int, restart_at: int | None = None):
    """Prefill a left-padded batch of two rows, then decode `steps` tokens one at a time (a new document in
    row 0 at step `restart_at`); returns the step logits and the cache."""
    student.model.set_backends(decode=backend)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = []
    with torch.no_grad():
        out = student(ids, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        for step in range(steps):
            token = torch.randint(3, 128, (2, 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            positions = None
            if step == restart_at:  # row 0 starts a new document, row 1 goes on
                token[0] = 3 + (ids[0, 0] - 2) % 125  # not the old document's first token, whose key it would copy
                seen = cache.layers[0].state["seen"]
                positions = torch.stack([torch.zeros_like(seen[0]), seen[1]])[:, None]
            out = student(token, attention_mask=mask, position_ids=positions, cache=cache)
            logits.append(out.logits)
            cache = output_cache(out)
    return torch.cat(logits, 1), cache


CASES = {
    "evicted keys": ("llama", {"memory_keys": "evicted"}, 6, 8, None),
    "evicted keys, document start": ("llama", {"memory_keys": "evicted"}, 6, 9, 3),
    "every key, mLSTM with RoPE": ("llama", {"memory_keys": "all", "mlstm_rope": True}, 5, 7, 4),
    "qwen2 (q/k/v biases)": ("qwen2", {"memory_keys": "evicted"}, 7, 6, None),
    "olmo2 (q/k norms)": ("olmo2", {"memory_keys": "evicted"}, 7, 6, None),
    "window over two blocks": ("llama", {"memory_keys": "evicted", "window_size": BLOCK_SLOTS + 3}, 70, 4, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_equals_the_layer_by_layer_step(case: str) -> None:
    family, options, prompt_len, steps, restart_at = CASES[case]
    student = student_of(family, **options)
    assert fusable(student.model.layers[0].self_attn.head_dim, student.model.layers[0].self_attn.feature_dim)
    want, want_cache = decode(copy.deepcopy(student), "layers", prompt_len, steps, restart_at)
    got, got_cache = decode(student, "fused", prompt_len, steps, restart_at)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got_layer, want_layer in zip(got_cache.layers, want_cache.layers, strict=True):
        assert got_layer.state.keys() == want_layer.state.keys()
        for name, tensor in want_layer.state.items():
            torch.testing.assert_close(got_layer.state[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
        assert int(got_layer.get_seq_length()) == int(want_layer.get_seq_length())


def test_sizes_the_kernel_does_not_take_go_the_layer_by_layer_way() -> None:
    """Head dim 12 (not a power of two): the fused backend falls back and still equals the layers path."""
    student = student_of("llama", memory_keys="evicted", feature_dim=12)
    mixer = student.model.layers[0].self_attn
    assert not fusable(mixer.head_dim, mixer.feature_dim)
    want, _ = decode(copy.deepcopy(student), "layers", 6, 4)
    got, _ = decode(student, "fused", 6, 4)
    assert torch.equal(got, want)


def test_decode_backends_are_chosen_by_name() -> None:
    """CUDA's default is the fused step, the CPU's the layer-by-layer one; an unknown name fails at once."""
    assert default_backends(torch.device("cuda"))[2] == "fused"
    assert default_backends(torch.device("cpu"))[2] == "layers"
    student = student_of("llama")
    with pytest.raises(KeyError, match="unknown decode backend 'fast'"):
        student.model.set_backends(decode="fast")
