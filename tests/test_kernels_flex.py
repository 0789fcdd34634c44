"""FlexAttention's SWA + sinks block mask agrees with the dense reference, with and without cached keys,
and so does the student on it, prefilling into a cache and continuing; a one-document layout's rule,
written from indices alone, allows exactly what the per-token rule allows.

Runs on CPU through torch.compile's CPU backend (tens of seconds, once); on CUDA it is the default SWA
backend, where the block mask keeps prefill memory linear in the length.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from merge_xlstm.student import from_teacher
from merge_xlstm.student.cache import CACHE_FIELD, output_cache
from merge_xlstm.student.kernels import TokenLayout, swa_sdpa
from merge_xlstm.testing import tiny_teacher


def test_flex_block_mask_equals_the_dense_mask_with_a_cached_prefix() -> None:
    B, H, Hkv, D, W, S, cached, T = 2, 4, 2, 16, 40, 3, 43, 260
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, Hkv, cached + T, D, generator=g) for _ in range(2))
    # Row 0 continues a cached document (positions 100..), row 1 starts a new document after 90 new tokens
    # and has 5 padding tokens in front; its cached slots are invalid (-1) but for the sinks.
    q_pos = torch.stack([torch.arange(100, 100 + T), torch.cat([torch.full((5,), -1), torch.arange(50, 135),
                                                                torch.arange(T - 90)])])
    q_doc = torch.stack([torch.zeros(T, dtype=torch.long), (torch.arange(T) >= 90).long()])
    q_valid = q_pos >= 0
    slots = torch.cat([torch.arange(S), torch.arange(60, 60 + W)])  # sinks, then a window ending before pos 100
    k_pos = torch.cat([torch.stack([slots, torch.where(slots < S, slots, -1)]), q_pos], dim=1)
    k_doc = torch.cat([torch.zeros(B, cached, dtype=torch.long), q_doc], dim=1)
    layout = TokenLayout(q_doc, q_pos, q_valid, k_doc, k_pos, k_pos >= 0, window=W, sinks=S)
    assert layout.dense_mask()[:, 0, :, :cached].any() and not layout.dense_mask()[1, 0, 95:, S:cached].any()
    want = swa_sdpa(q, k, v, layout, 0.25)
    got = torch.compile(flex_attention)(q, k, v, block_mask=layout.block_mask(), scale=0.25, enable_gqa=True)
    valid = q_valid[:, None, :].expand(B, H, T)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_student_on_flex_prefills_into_a_cache_and_continues_like_one_pass() -> None:
    """Model level, on the flex backend: a prefill into a fresh cache (its own keys only) and a cached
    continuation (the cached slots' keys first) give the logits of one uncached pass on the dense
    reference, a left-padded row included. Both calls have enough queries to take the flex path."""
    student = from_teacher(tiny_teacher("llama"), mixer="hybrid", window_size=40, num_sink_tokens=3)
    x = torch.randint(0, student.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    want = student(x, attention_mask=mask).logits
    student.model.set_backends(swa="flex")
    first = student(x[:, :160], attention_mask=mask[:, :160], use_cache=True)
    rules = []
    original = TokenLayout._index_rule
    TokenLayout._index_rule = lambda self, offset: rules.append(offset) or original(self, offset)
    try:
        rest = student(x[:, 160:], attention_mask=mask, use_cache=True, **{CACHE_FIELD: output_cache(first)})
    finally:
        TokenLayout._index_rule = original
    got = torch.cat([first.logits, rest.logits], dim=1)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
    assert rules == [3 + 40]  # the continuation's slots came in position order: the index rule, once a pass


def _grid(rule, B: int, Tq: int, Tk: int) -> torch.Tensor:
    """A mask_mod evaluated at every (row, query, key)."""
    b, qi, ki = torch.meshgrid(torch.arange(B), torch.arange(Tq), torch.arange(Tk), indexing="ij")
    return rule(b, torch.zeros_like(b), qi, ki)


def test_a_one_document_layout_takes_the_index_rule_which_equals_the_token_rule() -> None:
    """The flex kernel re-evaluates the rule inside every block a window edge or a sink cuts; for one
    document per row (an uncached pass, a prefill into a fresh cache) it is written from the indices
    alone, and must allow exactly what the per-token rule allows, with queries at the end of the keys."""
    W, S = 40, 3
    for B, Tq, Tk, start in ((2, 300, 300, 0), (1, 200, 260, 0), (2, 150, S + W + 150, 1000)):
        # start > 0: a long pass continuing a cache, its slots in position order: the sinks, then the last
        # W positions before the queries (CachePlan.order)
        pos = torch.cat([torch.arange(S), torch.arange(start + S, start + Tk)]).expand(B, Tk)
        ones = torch.ones(B, Tk, dtype=torch.long)
        layout = TokenLayout(ones[:, -Tq:], pos[:, -Tq:], ones[:, -Tq:].bool(), ones, pos, ones.bool(), W, S)
        assert layout.is_one_document()
        shuffled = torch.cat([pos[:, :S], pos[:, S:].roll(7, 1)], 1)  # slot order: not one run
        assert not TokenLayout(ones[:, -Tq:], shuffled[:, -Tq:], ones[:, -Tq:].bool(), ones, shuffled, ones.bool(),
                               W, S).is_one_document()
        fast, general = layout._index_rule(Tk - Tq), layout._token_rule()
        assert torch.equal(_grid(fast, B, Tq, Tk), _grid(general, B, Tq, Tk))
        assert torch.equal(_grid(fast, B, Tq, Tk), layout.dense_mask()[:, 0])
        assert torch.equal(layout.block_mask().to_dense(), create_block_mask(general, B, None, Tq, Tk, device="cpu").to_dense())


def test_packed_padded_or_short_cached_layouts_read_every_token() -> None:
    student = from_teacher(tiny_teacher("llama"), mixer="hybrid", window_size=40, num_sink_tokens=3)
    x = torch.randint(0, student.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    seen: list[bool] = []
    real = student.model.layers[0].self_attn.attention

    def spy(q, k, v, layout, return_lse=False):
        seen.append(layout.is_one_document())
        return real(q, k, v, layout, return_lse)

    student.model.layers[0].self_attn.attention = spy
    with torch.no_grad():
        student(x)  # one document per row
        packed = torch.arange(300).remainder(120).expand(2, 300)  # documents restart at 120 and 240
        student(x, position_ids=packed)
        padded = torch.ones_like(x)
        padded[1, :7] = 0
        student(x, attention_mask=padded)
        first = student(x[:, :160], use_cache=True)  # a fresh cache: its own keys only
        rest = student(x[:, 160:], use_cache=True, **{CACHE_FIELD: output_cache(first)})  # slots in position order
        student(x[:, :5], use_cache=True, **{CACHE_FIELD: output_cache(rest)})  # a short step: slot order
    assert seen == [True, False, False, True, True, False]
