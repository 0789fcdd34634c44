"""The hybrid student: conversion is exact, recurrent == parallel, padding and packing are invisible."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from merge_xlstm.linearize.report import format_gates, gate_medians
from merge_xlstm.student import from_teacher, new_parameters
from merge_xlstm.student.cache import output_cache
from merge_xlstm.student.modeling_xlstm_hybrid import GATE, token_layout
from merge_xlstm.testing import tiny_teacher

FAMILIES = ["llama", "qwen2", "olmo2"]
ATOL = 1e-5


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def teacher(request):
    return tiny_teacher(request.param)


@torch.no_grad()
def test_swa_student_with_long_window_is_the_teacher(teacher):
    student = from_teacher(teacher, mixer="swa", window_size=64, num_sink_tokens=4)
    x = ids(2, 24)
    torch.testing.assert_close(student(x).logits, teacher(x).logits, atol=ATOL, rtol=0)
    mask = torch.ones_like(x)
    mask[1, :7] = 0  # left padding
    got, want = student(x, attention_mask=mask).logits, teacher(x, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_swa_window_and_sinks_equal_the_teacher_under_the_same_mask(teacher):
    window, sinks, T = 5, 2, 16
    student = from_teacher(teacher, mixer="swa", window_size=window, num_sink_tokens=sinks)
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (k <= q) & ((q - k < window) | (k < sinks))
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, float("-inf"))
    x = ids(1, T)
    torch.testing.assert_close(student(x).logits, teacher(x, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_reused_weights_are_the_teachers_and_new_parameters_are_the_mixers(teacher):
    student = from_teacher(teacher, mixer="hybrid", window_size=8)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, tensor in t_state.items():
        assert torch.equal(s_state[name], tensor), name
    new = set(s_state) - set(t_state)
    assert new and all(n.split(".")[-2] in {"igate", "fgate", "ogate"} or n.split(".")[-1] in {"phi_q", "phi_k"} for n in new)
    assert sum(p.numel() for p in new_parameters(student)) == sum(s_state[n].numel() for n in new)
    assert s_state[next(iter(t_state))].data_ptr() != t_state[next(iter(t_state))].data_ptr()  # a copy


MEMORIES = [{"mixer": "hybrid"}, {"mixer": "mlstm"}, {"mixer": "hybrid", "memory_keys": "evicted"},
            {"mixer": "hybrid", "memory_keys": "evicted", "memory_layers": [1]}]
MEMORY_IDS = ["hybrid", "mlstm", "evicted", "memory_in_layer_1"]


@pytest.mark.parametrize("options", MEMORIES, ids=MEMORY_IDS)
@torch.no_grad()
def test_parallel_equals_recurrent_and_chunked(teacher, options):
    student = from_teacher(teacher, window_size=4, num_sink_tokens=2, **options)
    x = ids(2, 21)
    parallel = student(x).logits
    out = student(x[:, :1], use_cache=True)
    steps = [out.logits]
    for t in range(1, x.shape[1]):
        out = student(x[:, t : t + 1], cache=output_cache(out), use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), parallel, atol=ATOL, rtol=0)
    first = student(x[:, :9], use_cache=True)
    rest = student(x[:, 9:], cache=output_cache(first), use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), parallel, atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", [*MEMORIES, {"mixer": "swa"}], ids=[*MEMORY_IDS, "swa"])
@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(teacher, options):
    student = from_teacher(teacher, window_size=4, num_sink_tokens=2, **options)
    a, b = ids(1, 16, seed=1), ids(1, 11, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    logits = student(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[:1], student(a).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:, 5:], student(b).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", [*MEMORIES, {"mixer": "swa"}], ids=[*MEMORY_IDS, "swa"])
@torch.no_grad()
def test_packed_documents_do_not_see_each_other(teacher, options):
    student = from_teacher(teacher, window_size=4, num_sink_tokens=2, **options)
    a, b = ids(1, 9, seed=3), ids(1, 13, seed=4)
    position_ids = torch.cat([torch.arange(9), torch.arange(13)])[None]
    logits = student(torch.cat([a, b], 1), position_ids=position_ids).logits
    torch.testing.assert_close(logits[:, :9], student(a).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[:, 9:], student(b).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("memory_keys", ["all", "evicted"])
@torch.no_grad()
def test_cached_greedy_generate_equals_uncached_rollout(teacher, memory_keys):
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2, memory_keys=memory_keys)
    prompt = ids(2, 6)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    generated = student.generate(
        prompt, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    x, m = prompt, mask
    for _ in range(10):
        nxt = student(x, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        x, m = torch.cat([x, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, x)


@torch.no_grad()
def test_decoding_state_does_not_grow(teacher):
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2)
    out = student(ids(1, 8), use_cache=True)

    def size(cache):
        return sum(t.numel() for layer in cache.layers for t in layer.state.values())

    before = size(output_cache(out))
    for t in range(30):
        out = student(ids(1, 1, seed=t), cache=output_cache(out), use_cache=True)
    assert size(output_cache(out)) == before


@pytest.mark.parametrize("memory_layers", [None, [0]])
def test_save_and_auto_reload_is_bit_exact(teacher, tmp_path, memory_layers):
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2, feature_dim=8,
                           memory_layers=memory_layers)
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "XLSTMHybridForCausalLM"
    assert reloaded.config.feature_dim == 8 and reloaded.config.window_size == 4
    assert reloaded.config.memory_layers == memory_layers
    assert [layer.self_attn.mixer for layer in reloaded.model.layers] == (
        ["hybrid", "hybrid"] if memory_layers is None else ["hybrid", "swa"])
    for (name, a), b in zip(student.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = ids(1, 10)
    with torch.no_grad():
        assert torch.equal(student(x).logits, reloaded(x).logits)


@torch.no_grad()
def test_a_layer_without_memory_is_the_hybrid_layer_with_its_gate_shut(teacher):
    """memory_layers [1]: layer 0 is the SWA branch alone, with no new parameters, and the student computes what
    the every-layer student computes when layer 0's gate is shut and layer 1 has the same new parameters."""
    options = {"mixer": "hybrid", "window_size": 4, "num_sink_tokens": 2}
    sparse = from_teacher(teacher, memory_layers=[1], **options)
    full = from_teacher(teacher, **options)
    assert [layer.self_attn.mixer for layer in sparse.model.layers] == ["swa", "hybrid"]
    new = {id(p) for p in new_parameters(sparse)}
    assert {name.split(".")[2] for name, p in sparse.named_parameters() if id(p) in new} == {"1"}
    assert sum(p.numel() for p in new_parameters(sparse)) * 2 == sum(p.numel() for p in new_parameters(full))
    torch.manual_seed(1)
    for p in new_parameters(sparse):
        p.normal_(0, 0.3)  # a trained-looking layer 1, copied into the full student
    full.load_state_dict(sparse.state_dict(), strict=False)
    full.model.layers[0].self_attn.ogate.bias.fill_(-GATE)
    x = ids(2, 19)
    torch.testing.assert_close(sparse(x).logits, full(x).logits, atol=ATOL, rtol=0)
    with sparse.record_gates() as gates:
        sparse(x)
    assert gates[0] is None and len(gates[1]) == 1
    medians = gate_medians(gates)
    assert medians[0] is None and medians[1] == gates[1][0].median().item()
    assert format_gates(medians) == f"- {medians[1]:.2g}"
    assert not torch.allclose(sparse(x).logits, from_teacher(teacher, mixer="swa", window_size=4,
                                                              num_sink_tokens=2)(x).logits, atol=1e-3)


def test_memory_layers_outside_the_teacher_are_refused(teacher):
    with pytest.raises(ValueError, match=r"memory_layers: the teacher has 2 layers \(0..1\), got \[2\]"):
        from_teacher(teacher, mixer="hybrid", memory_layers=[0, 2])


def test_gradients_reach_the_new_parameters(teacher):
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2).train()
    student(ids(2, 32)).logits.square().mean().backward()
    for p in new_parameters(student):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_converts_and_its_swa_student_writes_the_teachers_text():
    from merge_xlstm.teacher import load_teacher

    teacher, tokenizer = load_teacher("HuggingFaceTB/SmolLM2-135M-Instruct")
    student = from_teacher(teacher, mixer="swa", window_size=4096, num_sink_tokens=4)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    want = teacher.generate(**inputs, max_new_tokens=12, do_sample=False)
    got = student.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    assert "Paris" in tokenizer.decode(got[0, inputs["input_ids"].shape[1] :])


@torch.no_grad()
def test_memory_mixes_in_only_beyond_window_and_sinks(teacher):
    """With memory_outside_window, positions the window and sinks still cover are the SWA student's exactly."""
    window, sinks = 5, 2
    hybrid = from_teacher(teacher, mixer="hybrid", window_size=window, num_sink_tokens=sinks, memory_outside_window=True)
    with torch.no_grad():
        for layer in hybrid.model.layers:
            layer.self_attn.ogate.bias.fill_(3.0)  # a wide-open gate, so the memory matters where it may
    swa = from_teacher(teacher, mixer="swa", window_size=window, num_sink_tokens=sinks)
    x = ids(2, 20)
    got, want = hybrid(x).logits, swa(x).logits
    assert torch.equal(got[:, : window + sinks], want[:, : window + sinks])
    assert (got[:, window + sinks :] - want[:, window + sinks :]).abs().amax(-1).min() > 1e-4
    with hybrid.record_gates() as gates:
        hybrid(x)
    assert len(gates) == len(hybrid.model.layers) and all(len(calls) == 1 for calls in gates)
    heads = teacher.config.num_attention_heads
    assert all(calls[0].shape == (2 * (20 - window - sinks), heads) and (calls[0] > 0.9).all() for calls in gates)


@pytest.mark.parametrize("memory_keys", ["all", "evicted"])
@torch.no_grad()
def test_chunked_prefill_equals_one_pass(teacher, memory_keys):
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2, memory_keys=memory_keys)
    x = ids(2, 23)
    whole = student(x, use_cache=True).logits
    student.config.prefill_chunk_length = 5
    chunked = student(x, use_cache=True)
    torch.testing.assert_close(chunked.logits, whole, atol=ATOL, rtol=0)
    assert output_cache(chunked).get_seq_length() == 23


@pytest.mark.parametrize("memory_keys", ["all", "evicted"])
@torch.no_grad()
def test_long_chunks_read_the_cached_slots_in_position_order(teacher, memory_keys):
    """Chunks of FlexAttention's size continue the cache with its slots in position order (CachePlan.order):
    the same logits as one pass, the window's ring wrapped around several times."""
    student = from_teacher(teacher, mixer="hybrid", window_size=16, num_sink_tokens=2, memory_keys=memory_keys)
    x = ids(2, 300)
    whole = student(x, use_cache=True).logits
    student.config.prefill_chunk_length = 135  # not a multiple of the window: the ring starts mid-way
    torch.testing.assert_close(student(x, use_cache=True).logits, whole, atol=ATOL, rtol=0)


@torch.no_grad()
def test_bfloat16_on_cpu_runs_the_native_backends_close_to_float32(teacher):
    """`precision: bf16` on a CPU: float32 weights under bf16 autocast (training) and bf16 weights (serving)
    both run the native backends, prefilling into a cache and decoding on, near the float32 logits."""
    student = from_teacher(teacher, mixer="hybrid", window_size=4, num_sink_tokens=2)
    x = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want = student(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = student(x).logits.float()
    half = copy.deepcopy(student).to(torch.bfloat16)
    first = half(x[:, :20], use_cache=True)
    rest = half(x[:, 20:], use_cache=True, past_key_values=output_cache(first))
    cached = torch.cat([first.logits, rest.logits], dim=1).float()
    for got in (autocast, cached):
        assert (got - want).norm() / want.norm() < 5e-2


@torch.no_grad()
def test_evicted_memory_holds_exactly_the_keys_the_window_let_go(teacher):
    """memory_keys evicted: the mLSTM branch at t is the normalised mLSTM over keys sinks..t-W of the document,
    each entering the state at its position + W (closed form in float64). Before W + sinks it holds no key,
    and the gate is shut there (memory_outside_window, tested above)."""
    window, sinks, T = 5, 2, 19
    student = from_teacher(teacher, mixer="hybrid", window_size=window, num_sink_tokens=sinks, memory_keys="evicted")
    student = student.double()
    mixer = student.model.layers[1].self_attn
    g = torch.Generator().manual_seed(0)
    for p in (mixer.phi_q, mixer.phi_k, mixer.igate.weight, mixer.fgate.weight):
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    x = torch.randn(2, T, teacher.config.hidden_size, generator=g, dtype=torch.float64)
    layout, starts, rope_pos, _ = token_layout(None, None, (2, T), x.device, None, window, sinks)
    rope = student.model.rotary_emb(x, rope_pos)
    got = mixer.parts(x, rope, layout, starts).mlstm

    H, Hkv, D = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q, k = mixer.q_proj(x), mixer.k_proj(x)
    if hasattr(mixer, "q_norm"):  # OLMo2
        q, k = mixer.q_norm(q), mixer.k_norm(k)
    q = q.view(2, T, H, D).transpose(1, 2)
    k = k.view(2, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    v = mixer.v_proj(x).view(2, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
    phi_q = torch.einsum("bhtd,hdf->bhtf", q, mixer.phi_q).softmax(-1)
    phi_k = torch.einsum("bhtd,hdf->bhtf", k, mixer.phi_k).softmax(-1)
    i, logf = mixer.igate(x).transpose(1, 2), F.logsigmoid(mixer.fgate(x)).transpose(1, 2)  # (B, H, T)
    decay = logf.cumsum(-1)
    t, s_ = torch.arange(T)[:, None], torch.arange(T)[None, :]
    held = (s_ >= sinks) & (s_ <= t - window)
    entered = (torch.arange(T) + window).clamp(max=T - 1)  # key s enters the state at s + W, then decays
    logw = decay[..., :, None] - decay[..., entered][..., None, :] + i[..., None, :]
    start = window + sinks  # the first query with a key to remember
    logw = logw[..., start:, :].masked_fill(~held[start:], float("-inf"))
    w = torch.exp(logw - logw.amax(-1, keepdim=True)) * (phi_q[..., start:, :] @ phi_k.transpose(-1, -2))
    want = (w @ v) / w.sum(-1, keepdim=True)
    # the native kernels compute in float32
    torch.testing.assert_close(got[:, :, start:], want, atol=1e-5, rtol=1e-4)
