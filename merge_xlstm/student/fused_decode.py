"""The hybrid mixer's decode step as one Triton kernel per layer: gates, window, memory and mix together.

A decode step of the layer-by-layer path (:meth:`HybridMixer.parts`) is some forty small kernels per
layer even after ``torch.compile`` fuses what it can: three gate projections, ring reads and writes, the
window's mask and softmax, two feature maps, the gates, the mLSTM update, the normaliser and the mix.
Each reads or writes a few kilobytes, so the step is bound by their count (bench/results/
profile_decode_h200.json: 880 kernels for 16 layers), not by bandwidth. Here one program per (batch row,
query head):

1. computes the head's input, forget and mixing gates from the layer input and the flat q, k, v (each
   is a dot product of a few thousand entries a head: a GEMM launch each costs more than the work);
2. attends over the ring's cached slots plus the step's own key under the window's rule (online
   softmax, float32), which is :meth:`TokenLayout.allowed` for one query;
3. with ``memory_keys: evicted``, reads the key, value and input gate the window lets go of (the ring
   slot W positions back);
4. computes both feature maps, the gates as ``gate_preactivations`` does (padding, document starts),
   the mLSTM update of mlstm_kernels' native step (the same m-stabilised recurrence, the value block
   extended by the normaliser's column of ones, :class:`MLSTMBackend`) and the exact normaliser, then
   ``lerp(swa, mlstm, o)``; writes the head's new (C, n, m) and its input gate's slot.

The ring slot the step's key goes to is the one the memory reads (the token W back), and the query
heads of a KV group read it from different programs, so a second small kernel writes the step's key,
value and memory key into the ring after every program has read it (launch order is the barrier).
The projections, RoPE, ``o_proj`` and the cache's position bookkeeping stay in PyTorch, where the
compiler fuses them. Everything is computed in float32 from the model's dtype, so in float32 the step
equals the layer-by-layer path to rounding (tests/test_fused_decode.py, through Triton's interpreter on
CPU).

CPU installs without Triton import this module too: :func:`fusable` then says no, and the layer-by-layer
path runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install of torch comes without Triton
    triton = None

# Keys per block of the window's online softmax, and entries per block of the gates' dot products.
BLOCK_SLOTS = 64
BLOCK_GATE = 1024


def fusable(head_dim: int, feature_dim: int) -> bool:
    """Whether the kernel exists (Triton is installed) and takes these sizes: it holds a head's vectors in
    power-of-two blocks of at least 16."""
    return triton is not None and all(n >= 16 and n & (n - 1) == 0 for n in (head_dim, feature_dim))


def fused_step(
    *,
    x: Tensor, qkv: tuple[Tensor, Tensor, Tensor],
    q: Tensor, k: Tensor, v: Tensor, q_mem: Tensor, k_mem: Tensor,
    gates: tuple[nn.Linear, nn.Linear, nn.Linear],
    state: dict[str, Tensor], phi_q: Tensor, phi_k: Tensor,
    q_pos: Tensor, valid: Tensor, start: Tensor, slot: Tensor, evict: Tensor | None,
    scale: float, window: int, sinks: int, gate: float, memory_outside_window: bool,
) -> Tensor:
    """One token per row through one layer's mixer; returns h (B, H, D) and updates ``state`` in place.

    x (B, hidden): the layer's (normed) input, which the input and forget gates read; qkv: the flat
    q (B, H·D), k, v (B, Hkv·D) the mixing gate reads. q (B, H, D) and k, v (B, Hkv, D): RoPE-rotated
    query and key, and the value, as the window reads them; q_mem, k_mem: what the memory reads (rotated
    or not, ``mlstm_rope``). gates: the mixer's ``igate``, ``fgate`` and ``ogate`` projections, whose
    weights and biases the kernel reads. ``state``: the layer cache's buffers (keys, values, positions, C,
    n, m, and memory_keys, igates with evicted keys), read before this step's writes. q_pos, valid,
    start, slot (B,): the token's position, whether it is real, whether it starts a document, the slot it
    goes to; evict (B,): the ring slot of the token the window lets go of, or None when the memory takes
    every key.
    """
    B, H, D = q.shape
    Hkv = k.shape[1]
    C, n, m = state["C"], state["n"], state["m"]
    feat = C.shape[2]
    evicted = evict is not None
    x, q, k, v, q_mem, k_mem, phi_q, phi_k = (t.contiguous() for t in (x, q, k, v, q_mem, k_mem, phi_q, phi_k))
    q_flat, k_flat, v_flat = (t.contiguous() for t in qkv)
    weights = [t.contiguous() for linear in gates for t in (linear.weight, linear.bias)]
    # without eviction the kernels neither read nor write these: inputs stand in (never cache buffers, which
    # a compiler would then see passed twice)
    mem_keys = state["memory_keys"] if evicted else k_mem[:, :, None]
    igates = state["igates"] if evicted else x[:, None, :1]
    keys, values, positions = state["keys"], state["values"], state["positions"]
    if any(t.stride(-1) != 1 for t in (keys, values, mem_keys, igates, positions, C, n)):
        raise ValueError("the fused decode step needs cache buffers whose last dimension is contiguous")
    cached = keys.shape[2] - 1  # the last slot takes unkept tokens and is never read
    out = torch.empty_like(q)
    hybrid_decode_step[(B, H)](
        x, q_flat, k_flat, v_flat, *weights,
        q, k, v, q_mem, k_mem,
        keys, values, mem_keys, igates, positions, C, n, m, phi_q, phi_k,
        q_pos, valid, start, slot, evict if evicted else slot, out,
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        mem_keys.stride(0), mem_keys.stride(1), mem_keys.stride(2),
        igates.stride(0), igates.stride(1), positions.stride(0),
        C.stride(0), C.stride(1), C.stride(2), n.stride(0), n.stride(1), m.stride(0), m.stride(1),
        scale, window, sinks, gate, H, Hkv,
        HIDDEN=x.shape[1], Q_WIDTH=H * D, KV_WIDTH=Hkv * D, CACHED=cached, D=D, FEAT=feat, GROUPS=H // Hkv,
        BLOCK=BLOCK_SLOTS, BLOCK_GATE=BLOCK_GATE, EVICTED=evicted, OUTSIDE=memory_outside_window,
    )
    ring_write[(B, Hkv)](
        k, v, k_mem, keys, values, mem_keys, slot,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        mem_keys.stride(0), mem_keys.stride(1), mem_keys.stride(2), Hkv,
        D=D, EVICTED=evicted,
    )
    return out


if triton is not None:

    @triton.jit
    def gate_dot(x_ptr, w_ptr, LENGTH: tl.constexpr, BLOCK_GATE: tl.constexpr):
        """sum(x[:LENGTH] * w[:LENGTH]) in float32, over blocks of BLOCK_GATE entries."""
        acc = tl.zeros((BLOCK_GATE,), tl.float32)
        for c0 in range(0, LENGTH, BLOCK_GATE):
            c = c0 + tl.arange(0, BLOCK_GATE)
            inside = c < LENGTH
            acc += (tl.load(x_ptr + c, mask=inside, other=0.0).to(tl.float32)
                    * tl.load(w_ptr + c, mask=inside, other=0.0).to(tl.float32))
        return tl.sum(acc, 0)

    @triton.jit
    def hybrid_decode_step(
        x_ptr, qf_ptr, kf_ptr, vf_ptr, iw_ptr, ib_ptr, fw_ptr, fb_ptr, ow_ptr, ob_ptr,
        q_ptr, k_ptr, v_ptr, qm_ptr, km_ptr,
        keys_ptr, values_ptr, mkeys_ptr, igates_ptr, pos_ptr, c_ptr, n_ptr, m_ptr, phiq_ptr, phik_ptr,
        qpos_ptr, valid_ptr, start_ptr, slot_ptr, evict_ptr, out_ptr,
        sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, smk_b, smk_h, smk_s, sig_b, sig_s, spos_b,
        sc_b, sc_h, sc_f, sn_b, sn_h, sm_b, sm_h,
        scale, window, sinks, gate, H, Hkv,
        HIDDEN: tl.constexpr, Q_WIDTH: tl.constexpr, KV_WIDTH: tl.constexpr, CACHED: tl.constexpr,
        D: tl.constexpr, FEAT: tl.constexpr, GROUPS: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_GATE: tl.constexpr, EVICTED: tl.constexpr, OUTSIDE: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = h // GROUPS
        scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as float64
        gate = tl.cast(gate, tl.float32)
        d = tl.arange(0, D)
        fe = tl.arange(0, FEAT)
        q_pos = tl.load(qpos_ptr + b)
        valid = tl.load(valid_ptr + b).to(tl.int32) != 0
        start = tl.load(start_ptr + b).to(tl.int32) != 0

        # -- the head's gates: igate(x), fgate(x), sigmoid(ogate(cat(q, k, v))) -------------------------
        x_row = x_ptr + b * HIDDEN
        i_raw = gate_dot(x_row, iw_ptr + h * HIDDEN, HIDDEN, BLOCK_GATE) + tl.load(ib_ptr + h).to(tl.float32)
        f_raw = gate_dot(x_row, fw_ptr + h * HIDDEN, HIDDEN, BLOCK_GATE) + tl.load(fb_ptr + h).to(tl.float32)
        o_row = ow_ptr + h * (Q_WIDTH + 2 * KV_WIDTH)
        o_pre = (gate_dot(qf_ptr + b * Q_WIDTH, o_row, Q_WIDTH, BLOCK_GATE)
                 + gate_dot(kf_ptr + b * KV_WIDTH, o_row + Q_WIDTH, KV_WIDTH, BLOCK_GATE)
                 + gate_dot(vf_ptr + b * KV_WIDTH, o_row + Q_WIDTH + KV_WIDTH, KV_WIDTH, BLOCK_GATE)
                 + tl.load(ob_ptr + h).to(tl.float32))
        o_h = 1.0 / (1.0 + tl.exp(-o_pre))
        if OUTSIDE:  # where the window still covers the document, SWA is exact
            o_h = tl.where(q_pos >= window + sinks, o_h, 0.0)

        # -- the window: the cached slots under TokenLayout.allowed, then the step's own key -------------
        q = tl.load(q_ptr + (b * H + h) * D + d).to(tl.float32)
        k_self = tl.load(k_ptr + (b * Hkv + g) * D + d).to(tl.float32)
        v_self = tl.load(v_ptr + (b * Hkv + g) * D + d).to(tl.float32)
        # the step's own key first: always allowed (a padding query sees it alone, as the dense mask's rule)
        run_max = tl.sum(q * k_self, 0) * scale
        run_sum = 1.0
        acc = v_self
        for s0 in range(0, CACHED, BLOCK):
            slots = s0 + tl.arange(0, BLOCK)
            in_range = slots < CACHED
            k_pos = tl.load(pos_ptr + b * spos_b + slots, mask=in_range, other=-1)
            # cached slots are the continued document (none after a start)
            allowed = in_range & (k_pos >= 0) & (k_pos <= q_pos) & ((q_pos - k_pos < window) | (k_pos < sinks))
            allowed = allowed & ~start
            kb = tl.load(keys_ptr + b * sk_b + g * sk_h + slots[:, None] * sk_s + d[None, :],
                         mask=in_range[:, None], other=0.0).to(tl.float32)
            scores = tl.where(allowed, tl.sum(kb * q[None, :], 1) * scale, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, 0))
            p = tl.exp(scores - new_max)
            alpha = tl.exp(run_max - new_max)
            vb = tl.load(values_ptr + b * sv_b + g * sv_h + slots[:, None] * sv_s + d[None, :],
                         mask=in_range[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vb, 0)
            run_sum = run_sum * alpha + tl.sum(p, 0)
            run_max = new_max
        swa = acc / run_sum

        # -- what enters the memory ---------------------------------------------------------------------
        if EVICTED:  # the token W back leaves the window and enters the memory (its input gate shut below)
            ev = tl.load(evict_ptr + b)
            k_in = tl.load(mkeys_ptr + b * smk_b + g * smk_h + ev * smk_s + d).to(tl.float32)
            v_in = tl.load(values_ptr + b * sv_b + g * sv_h + ev * sv_s + d).to(tl.float32)
            i_in = tl.load(igates_ptr + b * sig_b + ev * sig_s + h).to(tl.float32)
            i_in = tl.where(q_pos >= window + sinks, i_in, -gate)
            tl.debug_barrier()  # the slot read above is the one the step's input gate goes to
            slot = tl.load(slot_ptr + b)
            tl.store(igates_ptr + b * sig_b + slot * sig_s + h, i_raw.to(igates_ptr.dtype.element_ty))
        else:
            k_in = tl.load(km_ptr + (b * Hkv + g) * D + d).to(tl.float32)
            v_in = v_self
            i_in = i_raw

        # -- the memory: feature maps, gates, mlstm_kernels' native step, exact normaliser ----------------
        i_h = tl.where(valid, i_in, -gate)  # gate_preactivations: padding leaves the state untouched
        f_h = tl.where(valid, tl.where(start, -gate, f_raw), gate)  # a document start resets it
        qm = tl.load(qm_ptr + (b * H + h) * D + d).to(tl.float32)
        wq = tl.load(phiq_ptr + (h * D + d[:, None]) * FEAT + fe[None, :]).to(tl.float32)
        wk = tl.load(phik_ptr + (h * D + d[:, None]) * FEAT + fe[None, :]).to(tl.float32)
        zq = tl.sum(qm[:, None] * wq, 0)
        zk = tl.sum(k_in[:, None] * wk, 0)
        eq = tl.exp(zq - tl.max(zq, 0))
        ek = tl.exp(zk - tl.max(zk, 0))
        fq = eq / tl.sum(eq, 0)
        fk = ek / tl.sum(ek, 0)
        # m-stabilised exponential gates, q scaled by FEAT^-1/2
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
        tl.store(out_ptr + (b * H + h) * D + d, (swa + o_h * (mlstm - swa)).to(out_ptr.dtype.element_ty))

    @triton.jit
    def ring_write(
        k_ptr, v_ptr, km_ptr, keys_ptr, values_ptr, mkeys_ptr, slot_ptr,
        sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, smk_b, smk_h, smk_s, Hkv,
        D: tl.constexpr, EVICTED: tl.constexpr,
    ):
        """The step's key, value and (evicted keys) memory key into the row's slot, per (row, KV head)."""
        b = tl.program_id(0)
        g = tl.program_id(1)
        d = tl.arange(0, D)
        slot = tl.load(slot_ptr + b)
        tl.store(keys_ptr + b * sk_b + g * sk_h + slot * sk_s + d,
                 tl.load(k_ptr + (b * Hkv + g) * D + d).to(keys_ptr.dtype.element_ty))
        tl.store(values_ptr + b * sv_b + g * sv_h + slot * sv_s + d,
                 tl.load(v_ptr + (b * Hkv + g) * D + d).to(values_ptr.dtype.element_ty))
        if EVICTED:
            tl.store(mkeys_ptr + b * smk_b + g * smk_h + slot * smk_s + d,
                     tl.load(km_ptr + (b * Hkv + g) * D + d).to(mkeys_ptr.dtype.element_ty))
