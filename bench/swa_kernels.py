"""The sliding-window kernel alone, against the teacher's full causal attention, on one GPU (issue 11).

The 16K prefill profile put 142 of ~250 ms in FlexAttention for a 512-token window, 3.6x the teacher's
full causal cuDNN attention. This times the window's candidates on the 1B shape (32 query heads, 8 KV
heads, head dim 64, bf16), forward at B=1 (prefill) and forward + backward on packed rows (training):

- ``flex_token``: FlexAttention with the rule read from each token's document, position and validity
  (``TokenLayout._token_rule``: any layout);
- ``flex_index``: FlexAttention with the rule from indices alone (``TokenLayout._index_rule``: one
  document per row, what an uncached pass and a fresh prefill use);
- ``sdpa_causal``: the teacher's full causal attention (SDPA, flash/cuDNN), the cost to beat.

Writes one JSON: milliseconds per call and TFLOP/s of the window's useful work (W + sinks keys per query).
    python bench/swa_kernels.py --out bench/results/swa_kernels_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from inference import cuda_time  # bench/inference.py, beside this script
from merge_xlstm.student.kernels import TokenLayout, swa_flex


def layout(batch: int, length: int, documents: int, window: int, sinks: int, device: str) -> TokenLayout:
    """`documents` equal documents packed into each of `batch` rows of `length` tokens."""
    pos = torch.arange(length, device=device) % (length // documents)
    doc = torch.arange(length, device=device) // (length // documents)
    pos, doc = pos.expand(batch, -1).contiguous(), doc.expand(batch, -1).contiguous()
    valid = torch.ones_like(pos, dtype=torch.bool)
    return TokenLayout(doc, pos, valid, doc, pos, valid, window=window, sinks=sinks)


def timed(fn, repeats: int = 20) -> float:
    """Milliseconds per call, after three warm-up calls (compiles, block masks)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return 1000 * cuda_time(fn, repeats)


def case(batch: int, length: int, documents: int, backward: bool, args: argparse.Namespace) -> dict[str, float]:
    H, Hkv, D = 32, 8, 64
    make = lambda heads: torch.randn(batch, heads, length, D, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                     requires_grad=backward)
    q, k, v = make(H), make(Hkv), make(Hkv)
    scale = D**-0.5
    rows = layout(batch, length, documents, args.window, args.sinks, "cuda")
    one_doc = rows.is_one_document()

    def run(fn):
        def call():
            out = fn()
            if backward:
                out.float().sum().backward()
        return call

    def flex(rule: str):
        def fn():
            lay = dataclasses.replace(rows, masks={})  # a new block mask per call, as each forward builds one
            if rule == "token":
                lay.is_one_document = lambda: False
            return swa_flex(q, k, v, lay, scale)
        return fn

    out: dict[str, float] = {"flex_token": timed(run(flex("token")))}
    if one_doc:
        out["flex_index"] = timed(run(flex("index")))
    if documents == 1:
        out["sdpa_causal"] = timed(run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                               enable_gqa=True)))
    useful = 4 * batch * H * length * (args.window + args.sinks) * D * (3.5 if backward else 1.0)
    return {**{f"{name}_ms": round(ms, 3) for name, ms in out.items()},
            **{f"{name}_TFLOPs": round(useful / ms / 1e9, 1) for name, ms in out.items() if name.startswith("flex")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": "1b: 32 query heads, 8 KV heads, head dim 64, bf16", "window": args.window, "sinks": args.sinks}
    for length in (4096, 16384, 65536):
        results[f"prefill B=1 T={length}"] = case(1, length, 1, False, args)
        print(json.dumps({length: results[f"prefill B=1 T={length}"]}), flush=True)
    for documents in (1, 4):
        results[f"train B=8 T=2048 fwd+bwd, {documents} documents a row"] = case(8, 2048, documents, True, args)
        print(json.dumps({documents: results[f"train B=8 T=2048 fwd+bwd, {documents} documents a row"]}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
