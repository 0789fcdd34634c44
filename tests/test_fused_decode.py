"""The fused decode step (one Triton kernel per layer) computes what the layer-by-layer path computes.

Run on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET), in float32: every step's
logits and, after the last step, every cache buffer (the ring's keys, values, memory keys and input
gates, the slot positions, the mLSTM's C, n, m) must equal the layer-by-layer path's. The steps cross
the point where the window first lets keys go (the memory's input gate opens), a document start in the
middle of decoding, and a left-padded row; a window longer than one block of the kernel's softmax runs
the loop over blocks. The interpreter is lenient where Triton's compiler is not (loop-carried types,
constexpr arguments), so the kernels are also compiled, on CPU, for the GPUs that run them. generate()
through the fused step (greedy against uncached, static cache, beam search) is tested with the other
students in tests/test_generation.py (``hybrid_fused``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

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
    "memory inside the window too": ("llama", {"memory_keys": "all", "memory_outside_window": False}, 3, 6, None),
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


# Compiles both kernels for Hopper (sm_90) and Ampere (sm_80) with the Triton the project pins, down to the
# cubin (its ptxas is in the wheel), at the 1B shape (4 query heads a KV head) and SmolLM2's (3, a hidden size
# and q/k/v widths that are not multiples of the gate block), with and without evicted keys and the memory
# held outside the window. Run in a subprocess: under TRITON_INTERPRET the kernels are interpreted functions.
COMPILE = """
import os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from merge_xlstm.student import fused_decode as fd

POINTERS = {"pos_ptr": "*i64", "qpos_ptr": "*i64", "valid_ptr": "*i1", "start_ptr": "*i1", "slot_ptr": "*i64",
            "evict_ptr": "*i64", "c_ptr": "*fp32", "n_ptr": "*fp32", "m_ptr": "*fp32"}  # else bfloat16 tensors
def signature(fn, constexprs):
    kinds = {}
    for name in fn.arg_names:
        if name in constexprs:
            kinds[name] = "constexpr"
        elif name.endswith("_ptr"):
            kinds[name] = POINTERS.get(name, "*bf16")
        else:
            kinds[name] = "fp32" if name in ("scale", "gate") else "i64" if name.startswith("s") else "i32"
    return kinds

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for arch in (90, 80):
    for hidden, heads, kv_heads in ((2048, 32, 8), (576, 9, 3)):
        for evicted, outside in ((True, True), (False, False)):
            constexprs = dict(HIDDEN=hidden, Q_WIDTH=heads * 64, KV_WIDTH=kv_heads * 64, CACHED=516, D=64, FEAT=64,
                              GROUPS=heads // kv_heads, BLOCK=fd.BLOCK_SLOTS, BLOCK_GATE=fd.BLOCK_GATE,
                              EVICTED=evicted, OUTSIDE=outside)
            for fn, kept in ((fd.hybrid_decode_step, constexprs), (fd.ring_write, {"D": 64, "EVICTED": evicted})):
                kernel = triton.compile(ASTSource(fn=fn, signature=signature(fn, kept), constexprs=kept),
                                        target=GPUTarget("cuda", arch, 32))
                with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                    cubin.write(kernel.asm["cubin"])
                    cubin.flush()
                    usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                                           check=True).stdout
                print(f"sm_{arch} {fn.__name__} {hidden} {evicted}: REG:" + usage.split("REG:")[1].split("TEXTURE")[0])
"""


def test_kernels_compile_for_the_gpus_that_run_them() -> None:
    """Every kernel variant compiles to a cubin for sm_90 and sm_80. On sm_90, the GPU the benches measure, it
    keeps its state in registers: a stack frame (spilled registers) would send part of every decode step's
    state through global memory."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * 2 * 2 * 2, done.stdout
    for line in lines:
        if line.startswith("sm_90"):
            assert " STACK:0 " in line and " LOCAL:0 " in line, line
