"""Why the triton mLSTM backend decodes with the native step, and the fused decode step on the GPU (not run by CI).

1. mlstm_kernels' triton step kernel and the sequence kernel built on it against their native versions, on
   one random state, for value widths 64, 65 and 80 (ours is D + 16: the normaliser's column of ones
   padded to the triton kernels' multiple of 16): h error, and each new state's.
2. A 2-layer model of 1B width (32 query heads, 8 KV heads, float32, W=512): after a 700-token prompt, five
   decode steps through the fused kernel (eager and compiled) and through the layer-by-layer step.

Prints one JSON line per row. Run on the H200 on 2026-11-30 (docs/results/README.md, the sixth session):
    python bench/mlstm_step_check.py
"""

import json, torch
from mlstm_kernels.torch import get_mlstm_step_kernel, get_mlstm_sequence_kernel
from transformers import LlamaConfig, AutoModelForCausalLM
from merge_xlstm.student import from_teacher
from merge_xlstm.student.cache import output_cache, CACHE_FIELD

torch.manual_seed(0)
for DV in (64, 80, 65):
    B, NH, DK = 2, 4, 64
    C = torch.randn(B, NH, DK, DV, device="cuda"); n = torch.rand(B, NH, DK, device="cuda") + 0.5; m = torch.randn(B, NH, 1, device="cuda")
    q, k = torch.randn(B, NH, DK, device="cuda"), torch.randn(B, NH, DK, device="cuda"); v = torch.randn(B, NH, DV, device="cuda")
    i, f = torch.randn(B, NH, 1, device="cuda"), torch.randn(B, NH, 1, device="cuda") + 3
    out = {}
    for name in ("native", "triton"):
        h, (c2, n2, m2) = get_mlstm_step_kernel(name)(q=q, k=k, v=v, i=i, f=f, c=C.clone(), n=n.clone(), m=m.clone())
        out[name] = (h, c2, n2, m2)
    print(json.dumps({"step DV": DV, **{w: (a - b).abs().max().item() for w, a, b in zip("hCnm", out["native"], out["triton"])}}), flush=True)
    T = 37
    Q, K = torch.randn(B, NH, T, DK, device="cuda"), torch.randn(B, NH, T, DK, device="cuda"); V = torch.randn(B, NH, T, DV, device="cuda")
    I, Fg = torch.randn(B, NH, T, device="cuda"), torch.randn(B, NH, T, device="cuda") + 3
    seq = {}
    for name in ("native_sequence__native", "native_sequence__triton"):
        h, last = get_mlstm_sequence_kernel(name)(q=Q, k=K, v=V, i=I, f=Fg, c_initial=C.clone(), n_initial=n.clone(), m_initial=m.clone(), return_last_states=True)
        seq[name] = (h, *last)
    print(json.dumps({"sequence DV": DV, **{w: (a - b).abs().max().item() for w, a, b in zip("hCnm", seq["native_sequence__native"], seq["native_sequence__triton"])}}), flush=True)

def make(W, heads, kv, hidden):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2*hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    t = AutoModelForCausalLM.from_config(cfg).cuda().float().eval()
    s = from_teacher(t, kind="hybrid", window_size=W, num_sink_tokens=4, memory_keys="evicted").cuda().float().eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, p in s.named_parameters():
            if any(k in n for k in ("phi_q", "phi_k", "gate")):
                p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.3)
    return s

@torch.no_grad()
def run(s, backend, ids, toks, compiled=False):
    s.model.set_backends(decode=backend)
    cache = output_cache(s(input_ids=ids, use_cache=True))
    fwd = torch.compile(s.forward, mode="default") if compiled else s.forward
    return torch.cat([fwd(input_ids=toks[:, t:t+1], use_cache=True, **{CACHE_FIELD: cache}).logits.float() for t in range(toks.shape[1])], 1)

s = make(512, 32, 8, 2048)
ids = torch.randint(0, 512, (2, 700), device="cuda"); toks = torch.randint(0, 512, (2, 5), device="cuda")
a = run(s, "fused", ids, toks); c = run(s, "layers", ids, toks); b = run(s, "fused", ids, toks, compiled=True)
print(json.dumps({"compiled_vs_eager_fused": (a - b).abs().max().item(), "eager_fused_vs_layers": (a - c).abs().max().item(), "scale": c.abs().max().item()}), flush=True)
