"""The hybrid mixer's decode step as one Triton kernel per layer: window, memory and gate mix together.

A decode step of the layer-by-layer path (:meth:`HybridMixer.parts`) is some forty small kernels per
layer even after ``torch.compile`` fuses what it can: ring reads and writes, the window's mask and
softmax, two feature maps, the gates, the mLSTM update, the normaliser and the mix. Each reads or writes
a few kilobytes, so the step is bound by their count (bench/results/profile_decode_h200.json: 880
kernels for 16 layers), not by bandwidth. Here one program per (batch row, KV head) does all of it
for the query heads that share the KV head:

1. reads the slots the step attends to and, with ``memory_keys: evicted``, the key, value and input
   gate the window lets go of (the ring slot W positions back), before anything is written;
2. attends over the cached slots plus the step's own key under the window's rule (online softmax,
   float32), which is :meth:`TokenLayout.allowed` for one query;
3. per query head: both feature maps, the gates (padding and document starts as
   ``gate_preactivations``), the mLSTM update of mlstm_kernels' native step (the same m-stabilised
   recurrence, the value block extended by the normaliser's column of ones, :class:`MLSTMBackend`)
   and the exact normaliser, then ``lerp(swa, mlstm, o)``;
4. writes the step's key, value, memory key and input gate into their slots and the new (C, n, m).

The projections, RoPE, the output gate's projection, ``o_proj`` and the cache's position bookkeeping
stay in PyTorch, where the compiler fuses them. Everything is computed in float32 from the model's
dtype, so in float32 the step equals the layer-by-layer path to rounding (tests/test_fused_decode.py,
through Triton's interpreter on CPU).

CPU installs without Triton import this module too: :func:`fusable` then says no, and the layer-by-layer
path runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install of torch comes without Triton
    triton = None

# Keys per block of the window's online softmax, and the least row count tl.dot takes.
BLOCK_SLOTS = 64
MIN_DOT_ROWS = 16


def fusable(head_dim: int, feature_dim: int) -> bool:
    """Whether the kernel exists (Triton is installed) and takes these sizes: it holds a head's vectors in
    power-of-two blocks of at least 16."""
    return triton is not None and all(n >= 16 and n & (n - 1) == 0 for n in (head_dim, feature_dim))


def fused_step(
    *,
    q: Tensor, k: Tensor, v: Tensor, q_mem: Tensor, k_mem: Tensor,
    i: Tensor, f: Tensor, o: Tensor,
    state: dict[str, Tensor], phi_q: Tensor, phi_k: Tensor,
    q_pos: Tensor, valid: Tensor, start: Tensor, slot: Tensor, evict: Tensor | None,
    scale: float, window: int, sinks: int, gate: float,
) -> Tensor:
    """One token per row through one layer's mixer; returns h (B, H, D) and updates ``state`` in place.

    q (B, H, D) and k, v (B, Hkv, D): RoPE-rotated query and key, and the value, as the window reads them;
    q_mem, k_mem: what the memory reads (rotated or not, ``mlstm_rope``). i, f (B, H): the input and forget
    gates' pre-activations from the step's own token; o (B, H): the mixing gate. ``state``: the layer
    cache's buffers (keys, values, positions, C, n, m, and memory_keys, igates with evicted keys), read
    before this step's writes. q_pos, valid, start, slot (B,): the token's position, whether it is real,
    whether it starts a document, the slot it goes to; evict (B,): the ring slot of the token the window
    lets go of, or None when the memory takes every key.
    """
    B, H, D = q.shape
    Hkv = k.shape[1]
    C, n, m = state["C"], state["n"], state["m"]
    feat = C.shape[2]
    groups = H // Hkv
    evicted = evict is not None
    q, k, v, q_mem, k_mem, i, f, o, phi_q, phi_k = (
        t.contiguous() for t in (q, k, v, q_mem, k_mem, i, f, o, phi_q, phi_k))
    # without eviction the kernel neither reads nor writes these: inputs stand in (never cache buffers, which
    # a compiler would then see passed twice)
    mem_keys = state["memory_keys"] if evicted else k_mem[:, :, None]
    igates = state["igates"] if evicted else i[:, None]
    keys, values, positions = state["keys"], state["values"], state["positions"]
    if any(t.stride(-1) != 1 for t in (keys, values, mem_keys, igates, positions, C, n)):
        raise ValueError("the fused decode step needs cache buffers whose last dimension is contiguous")
    cached = keys.shape[2] - 1  # the last slot takes unkept tokens and is never read
    out = torch.empty_like(q)
    hybrid_decode_step[(B, Hkv)](
        q, k, v, q_mem, k_mem, i, f, o,
        keys, values, mem_keys, igates, positions, C, n, m, phi_q, phi_k,
        q_pos, valid, start, slot, evict if evicted else slot, out,
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        mem_keys.stride(0), mem_keys.stride(1), mem_keys.stride(2),
        igates.stride(0), igates.stride(1), positions.stride(0),
        C.stride(0), C.stride(1), C.stride(2), n.stride(0), n.stride(1), m.stride(0), m.stride(1),
        scale, window, sinks, gate, H, Hkv,
        CACHED=cached, D=D, FEAT=feat, GROUPS=groups, ROWS=max(MIN_DOT_ROWS, 1 << (groups - 1).bit_length()),
        BLOCK=BLOCK_SLOTS, EVICTED=evicted,
    )
    return out


if triton is not None:

    @triton.jit
    def hybrid_decode_step(
        q_ptr, k_ptr, v_ptr, qm_ptr, km_ptr, i_ptr, f_ptr, o_ptr,
        keys_ptr, values_ptr, mkeys_ptr, igates_ptr, pos_ptr, c_ptr, n_ptr, m_ptr, phiq_ptr, phik_ptr,
        qpos_ptr, valid_ptr, start_ptr, slot_ptr, evict_ptr, out_ptr,
        sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, smk_b, smk_h, smk_s, sig_b, sig_s, spos_b,
        sc_b, sc_h, sc_f, sn_b, sn_h, sm_b, sm_h,
        scale, window, sinks, gate, H, Hkv,
        CACHED: tl.constexpr, D: tl.constexpr, FEAT: tl.constexpr, GROUPS: tl.constexpr, ROWS: tl.constexpr,
        BLOCK: tl.constexpr, EVICTED: tl.constexpr,
    ):
        b = tl.program_id(0)
        g = tl.program_id(1)
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as float64
        gate = tl.cast(gate, tl.float32)
        d = tl.arange(0, D)
        fe = tl.arange(0, FEAT)
        rows = tl.arange(0, ROWS)
        heads = g * GROUPS + rows
        in_group = rows < GROUPS
        q_pos = tl.load(qpos_ptr + b)
        valid = tl.load(valid_ptr + b).to(tl.int32) != 0
        start = tl.load(start_ptr + b).to(tl.int32) != 0

        # -- reads: everything this step needs from the cache, before any write ----------------------
        q = tl.load(q_ptr + (b * H + heads[:, None]) * D + d[None, :], mask=in_group[:, None], other=0.0)
        k_self = tl.load(k_ptr + (b * Hkv + g) * D + d).to(tl.float32)
        v_self = tl.load(v_ptr + (b * Hkv + g) * D + d).to(tl.float32)
        # the step's own key first: always allowed (a padding query sees it alone, as the dense mask's rule)
        s_self = tl.sum(q.to(tl.float32) * k_self[None, :], 1) * scale
        run_max = s_self
        run_sum = tl.full((ROWS,), 1.0, tl.float32)
        acc = tl.zeros((ROWS, D), tl.float32) + v_self[None, :]
        for s0 in range(0, CACHED, BLOCK):
            slots = s0 + tl.arange(0, BLOCK)
            in_range = slots < CACHED
            k_pos = tl.load(pos_ptr + b * spos_b + slots, mask=in_range, other=-1)
            # TokenLayout.allowed: cached slots are the continued document (none after a start)
            allowed = in_range & (k_pos >= 0) & (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < sinks))
            allowed = allowed & ~start
            kb = tl.load(keys_ptr + b * sk_b + g * sk_h + slots[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(kb.to(q.dtype)), out_dtype=tl.float32, input_precision="ieee") * scale
            scores = tl.where(allowed[None, :], scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, 1))
            p = tl.exp(scores - new_max[:, None])
            alpha = tl.exp(run_max - new_max)
            vb = tl.load(values_ptr + b * sv_b + g * sv_h + slots[:, None] * sv_s + d[None, :], mask=in_range[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, out_dtype=tl.float32, input_precision="ieee")
            run_sum = run_sum * alpha + tl.sum(p, 1)
            run_max = new_max
        swa = acc / run_sum[:, None]

        if EVICTED:  # the token W back leaves the window and enters the memory (its input gate shut below)
            ev = tl.load(evict_ptr + b)
            k_in = tl.load(mkeys_ptr + b * smk_b + g * smk_h + ev * smk_s + d).to(tl.float32)
            v_in = tl.load(values_ptr + b * sv_b + g * sv_h + ev * sv_s + d).to(tl.float32)
            i_in = tl.load(igates_ptr + b * sig_b + ev * sig_s + heads, mask=in_group, other=0.0).to(tl.float32)
            i_in = tl.where(q_pos >= window + sinks, i_in, -gate)
        else:
            k_in = tl.load(km_ptr + (b * Hkv + g) * D + d).to(tl.float32)
            v_in = v_self
            i_in = tl.load(i_ptr + b * H + heads, mask=in_group, other=0.0).to(tl.float32)
        tl.debug_barrier()  # every thread's reads of the ring are done before any slot is overwritten

        # -- writes of the step's own token -----------------------------------------------------------
        slot = tl.load(slot_ptr + b)
        tl.store(keys_ptr + b * sk_b + g * sk_h + slot * sk_s + d, k_self.to(keys_ptr.dtype.element_ty))
        tl.store(values_ptr + b * sv_b + g * sv_h + slot * sv_s + d, v_self.to(values_ptr.dtype.element_ty))
        if EVICTED:
            k_mem = tl.load(km_ptr + (b * Hkv + g) * D + d)
            tl.store(mkeys_ptr + b * smk_b + g * smk_h + slot * smk_s + d, k_mem.to(mkeys_ptr.dtype.element_ty))
            i_raw = tl.load(i_ptr + b * H + heads, mask=in_group, other=0.0)
            tl.store(igates_ptr + b * sig_b + slot * sig_s + heads, i_raw.to(igates_ptr.dtype.element_ty), mask=in_group)

        # -- the memory, per query head of the group ----------------------------------------------------
        i_all = tl.where(valid, i_in, -gate)  # gate_preactivations: padding leaves the state untouched
        f_all = tl.load(f_ptr + b * H + heads, mask=in_group, other=0.0).to(tl.float32)
        f_all = tl.where(valid, tl.where(start, -gate, f_all), gate)  # a document start resets it
        for j in tl.static_range(GROUPS):
            h = g * GROUPS + j
            pick = rows == j
            qm = tl.load(qm_ptr + (b * H + h) * D + d).to(tl.float32)
            wq = tl.load(phiq_ptr + (h * D + d[:, None]) * FEAT + fe[None, :]).to(tl.float32)
            wk = tl.load(phik_ptr + (h * D + d[:, None]) * FEAT + fe[None, :]).to(tl.float32)
            zq = tl.sum(qm[:, None] * wq, 0)
            zk = tl.sum(k_in[:, None] * wk, 0)
            eq = tl.exp(zq - tl.max(zq, 0))
            ek = tl.exp(zk - tl.max(zk, 0))
            fq = eq / tl.sum(eq, 0)
            fk = ek / tl.sum(ek, 0)
            i_h = tl.sum(tl.where(pick, i_all, 0.0), 0)
            f_h = tl.sum(tl.where(pick, f_all, 0.0), 0)
            # mlstm_kernels' native step: m-stabilised exponential gates, q scaled by FEAT^-1/2
            log_f = tl.minimum(f_h, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_h)))
            c_rows = c_ptr + b * sc_b + h * sc_h + fe * sc_f  # C[b, h, :, 0]
            m_old = tl.load(m_ptr + b * sm_b + h * sm_h).to(tl.float32)
            m_new = tl.maximum(log_f + m_old, i_h)
            f_act = tl.exp(log_f + m_old - m_new)
            i_act = tl.exp(i_h - m_new)
            c_new = f_act * tl.load(c_rows[:, None] + d[None, :]).to(tl.float32) + i_act * fk[:, None] * v_in[None, :]
            ones = f_act * tl.load(c_rows + D).to(tl.float32) + i_act * fk  # the normaliser's column of ones
            n_new = f_act * tl.load(n_ptr + b * sn_b + h * sn_h + fe).to(tl.float32) + i_act * fk
            q_scaled = fq * (FEAT ** -0.5)
            denom = tl.maximum(tl.abs(tl.sum(q_scaled * n_new, 0)), tl.exp(-m_new)) + 1e-6
            num = tl.sum(q_scaled[:, None] * c_new, 0) / denom
            normaliser = tl.maximum(tl.sum(q_scaled * ones, 0) / denom, 1e-30)
            mlstm = num / normaliser
            tl.store(c_rows[:, None] + d[None, :], c_new.to(c_ptr.dtype.element_ty))
            tl.store(c_rows + D, ones.to(c_ptr.dtype.element_ty))
            tl.store(n_ptr + b * sn_b + h * sn_h + fe, n_new.to(n_ptr.dtype.element_ty))
            tl.store(m_ptr + b * sm_b + h * sm_h, m_new.to(m_ptr.dtype.element_ty))
            o_h = tl.load(o_ptr + b * H + h).to(tl.float32)
            swa_h = tl.sum(tl.where(pick[:, None], swa, 0.0), 0)
            tl.store(out_ptr + (b * H + h) * D + d, (swa_h + o_h * (mlstm - swa_h)).to(out_ptr.dtype.element_ty))
