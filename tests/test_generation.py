"""generate() through transformers' own caches, for both student kinds, on this transformers release.

The reference everywhere is generation without a cache (``use_cache=False``): transformers then
recomputes every step from the whole sequence, so a cache that loses, misplaces or misorders state
shows up as different tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from merge_xlstm.student import from_teacher
from merge_xlstm.student.cache import CACHE_FIELD, RecurrentLayer, output_cache
from merge_xlstm.testing import tiny_teacher

PAD = 0
NEW = 8


def make_student(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = tiny_teacher("llama")
    if kind.startswith("hybrid"):  # hybrid_evicted: the memory holds only the keys the window let go
        memory = {"hybrid": {}, "hybrid_evicted": {"memory_keys": "evicted"}, "hybrid_fused": {"memory_keys": "evicted"},
                  "hybrid_layer1": {"memory_keys": "evicted", "memory_layers": [1]}}[kind]  # layer 0: SWA alone
        student = from_teacher(teacher, kind="hybrid", window_size=4, num_sink_tokens=2, **memory).eval()
        if kind == "hybrid_fused":  # decode steps through the fused Triton kernel (its interpreter on CPU)
            student.model.set_backends(decode="fused")
        return student
    return from_teacher(teacher, kind="distil_xlstm", num_blocks=3, slstm_at=[0, 2], num_heads=4).eval()


KINDS = ["hybrid", "hybrid_evicted", "hybrid_layer1", "distil_xlstm"]


@pytest.fixture(scope="module", params=[*KINDS, "hybrid_fused"])
def student(request: pytest.FixtureRequest) -> torch.nn.Module:
    """Every kind, and a hybrid student whose decode steps go through the fused kernel: for what the decode
    step computes or where it leaves the state."""
    return make_student(request.param)


@pytest.fixture(scope="module", params=KINDS)
def any_student(request: pytest.FixtureRequest) -> torch.nn.Module:
    """Every kind, the fused decode step left out: for what does not depend on it (the cache's type,
    sampling's seed, warnings), where its interpreted kernel would only cost CI minutes."""
    return make_student(request.param)


def left_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 and 4 tokens, the second left-padded."""
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    return ids, mask


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs: object) -> torch.Tensor:
    options = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None} | kwargs
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **options)


def test_cached_greedy_equals_uncached_on_a_left_padded_batch(student: torch.nn.Module) -> None:
    ids, mask = left_padded()
    want = generate(student, ids, mask, use_cache=False)
    x, m = ids, mask  # and a hand-written rollout, independent of generate()
    with torch.no_grad():
        for _ in range(NEW):
            nxt = student(x, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
            x, m = torch.cat([x, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(want, x)
    assert torch.equal(generate(student, ids, mask), want)


def test_generate_uses_a_transformers_cache_of_the_students_layers(any_student: torch.nn.Module) -> None:
    student = any_student
    ids, mask = left_padded(1)
    out = generate(student, ids, mask, return_dict_in_generate=True, output_scores=True)
    cache = out[CACHE_FIELD]
    assert type(cache) is DynamicCache and len(cache.layers) == len(student.config.layer_types)
    assert all(isinstance(layer, RecurrentLayer) and not layer.static for layer in cache.layers)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1  # the last token is returned, never fed
    assert torch.equal(out.sequences, generate(student, ids, mask)) and len(out.scores) == NEW


def test_static_cache_gives_the_dynamic_tokens(student: torch.nn.Module) -> None:
    ids, mask = left_padded(2)
    out = generate(student, ids, mask, cache_implementation="static", return_dict_in_generate=True)
    cache = out[CACHE_FIELD]
    assert type(cache) is StaticCache and all(layer.static for layer in cache.layers)
    assert torch.equal(out.sequences, generate(student, ids, mask, use_cache=False))


def test_static_cache_writes_in_place(student: torch.nn.Module) -> None:
    """The static form keeps every buffer's address from the prefill on: what CUDA graphs replay."""
    ids, mask = left_padded(3)
    cache = StaticCache(config=student.config, max_cache_len=32)
    with torch.no_grad():
        out = student(ids, attention_mask=mask, cache=cache, use_cache=True)
        addresses = [{n: t.data_ptr() for n, t in layer.state.items()} for layer in cache.layers]
        nxt = out.logits[:, -1:].argmax(-1)
        student(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache, use_cache=True)
    assert addresses == [{n: t.data_ptr() for n, t in layer.state.items()} for layer in cache.layers]


def test_beam_search_reorders_the_state(student: torch.nn.Module) -> None:
    ids, mask = left_padded(4)
    cached = generate(student, ids, mask, num_beams=2, num_return_sequences=2)
    assert cached.shape == (4, ids.shape[1] + NEW)
    assert torch.equal(cached, generate(student, ids, mask, num_beams=2, num_return_sequences=2, use_cache=False))
    assert torch.equal(cached, generate(student, ids, mask, num_beams=2, num_return_sequences=2,
                                        cache_implementation="static"))


def test_swa_student_beam_search_is_the_teachers() -> None:
    torch.manual_seed(0)
    teacher = tiny_teacher("llama").eval()
    student = from_teacher(teacher, mixer="swa", window_size=64, num_sink_tokens=4).eval()
    ids, mask = left_padded(5)
    assert torch.equal(generate(student, ids, mask, num_beams=2), generate(teacher, ids, mask, num_beams=2))


def test_sampling_with_a_seed_is_reproducible(any_student: torch.nn.Module) -> None:
    student = any_student
    ids, mask = left_padded(6)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate(student, ids, mask, do_sample=True, top_k=0, temperature=1.5))
    torch.manual_seed(124)
    other = generate(student, ids, mask, do_sample=True, top_k=0, temperature=1.5)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], other)


def test_cache_is_taken_under_either_name_and_not_both(student: torch.nn.Module) -> None:
    ids, _ = left_padded(7)
    with torch.no_grad():
        whole = student(ids).logits
        first = student(ids[:, :4], use_cache=True)
        by_new = student(ids[:, 4:], cache=output_cache(first), use_cache=True).logits
        first = student(ids[:, :4], use_cache=True)
        by_old = student(ids[:, 4:], past_key_values=output_cache(first), use_cache=True).logits
        with pytest.raises(ValueError, match="not both"):
            student(ids, cache=DynamicCache(config=student.config), past_key_values=DynamicCache(config=student.config))
    torch.testing.assert_close(torch.cat([first.logits, by_new], 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_new, by_old, rtol=0, atol=0)


def test_reset_forgets_and_crop_refuses(student: torch.nn.Module) -> None:
    ids, _ = left_padded(8)
    with torch.no_grad():
        fresh = student(ids[:, 4:], use_cache=True).logits
        cache = output_cache(student(ids[:, :4], use_cache=True))
        cache.reset()
        assert cache.get_seq_length() == 0
        torch.testing.assert_close(student(ids[:, 4:], cache=cache, use_cache=True).logits, fresh, rtol=1e-5, atol=1e-5)
    cache.crop(0)  # nothing to undo: allowed
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-1)


def test_plain_generate_prints_no_deprecation_warning(any_student: torch.nn.Module, deprecations) -> None:
    ids, mask = left_padded(9)
    generate(any_student, ids, mask)
    generate(any_student, ids, mask, num_beams=2)
    assert deprecations() == []


@pytest.mark.parametrize("kind", ["hybrid", "hybrid_evicted", "hybrid_layer1"])
def test_compiled_decode_step_is_one_graph_with_the_eager_tokens(kind: str) -> None:
    """A decode step on the static cache compiles whole (no graph break) and once (no recompile per step)."""
    from torch._dynamo.testing import CompileCounter

    student = make_student(kind)
    ids, mask = left_padded(10)
    want = generate(student, ids, mask)[:, ids.shape[1] :]
    cache = StaticCache(config=student.config, max_cache_len=64)
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(student.forward, backend=counter, fullgraph=True)
    got = []
    with torch.no_grad():
        out = student(ids, attention_mask=mask, cache=cache, use_cache=True)
        for _ in range(NEW):
            got.append(out.logits[:, -1:].argmax(-1))
            out = step(input_ids=got[-1], attention_mask=torch.ones_like(got[-1]), cache=cache, use_cache=True)
    assert torch.equal(torch.cat(got, 1), want)
    assert counter.frame_count == 1
