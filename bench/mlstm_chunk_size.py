"""The triton mLSTM backend at each chunk size, at the student's 1B shape (not run by CI: needs CUDA).

The chunkwise kernels walk the chunks of a sequence one after another to carry the state (C, n, m),
with only B x H x (F/64) x (D/64) programs in flight: at B=1 and 32 heads, 32 programs on a 132-SM GPU.
A 4K prefill at chunk 64 is 64 such sequential steps a layer; a larger chunk halves them and moves work
into the parallel intra-chunk part. This sweep times the two ways the student calls the backend
(`kernels.MLSTMBackend`, the exact normaliser included): the inference path (``return_state``: any
length, the last state kept) and the training path (one call, forward and backward), each chunk size a
registry entry of its own. Writes one JSON (``--out``).

Usage: python bench/mlstm_chunk_size.py --out bench/results/mlstm_chunk_size_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from inference import triton_at_chunk  # bench/inference.py and swa_kernels.py, beside this script
from swa_kernels import timed
from merge_xlstm.io import write_json
from merge_xlstm.student.kernels import MLSTM_BACKENDS


def inputs(batch: int, length: int, heads: int, dim: int, grad: bool) -> list[torch.Tensor]:
    """Softmax feature maps, values and gate pre-activations as the student hands them to the backend."""
    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    q = torch.softmax(make(batch, heads, length, dim), -1)
    k = torch.softmax(make(batch, heads, length, dim), -1)
    v, i, f = make(batch, heads, length, dim), make(batch, heads, length), make(batch, heads, length) + 4
    return [x.requires_grad_(grad) for x in (q, k, v, i, f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--prefill", type=int, nargs="+", default=[4096, 16384, 65536], help="B=1 lengths")
    parser.add_argument("--train", default="8x2048", help="BATCHxLENGTH of the training case")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    results: dict[str, dict[str, float | str]] = {}
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads, "dim": args.dim}
    for chunk in args.chunks:
        backend = MLSTM_BACKENDS.get(triton_at_chunk(chunk))
        row: dict[str, float | str] = {}
        for length in args.prefill:
            x = inputs(1, length, args.heads, args.dim, grad=False)
            try:
                with torch.no_grad():
                    row[f"prefill_{length}_ms"] = round(timed(lambda: backend(*x, None, True), 10), 3)
            except Exception as error:  # a chunk size the kernel cannot take (shared memory) is a result too
                row[f"prefill_{length}_ms"] = f"{type(error).__name__}: {str(error)[:200]}"
        batch, length = map(int, args.train.split("x"))
        x = inputs(batch, length, args.heads, args.dim, grad=True)

        def train_step() -> None:
            h, _ = backend(*x, None, False)
            h.float().sum().backward()
        try:
            row[f"train_{args.train}_fwd_bwd_ms"] = round(timed(train_step, 10), 3)
        except Exception as error:
            row[f"train_{args.train}_fwd_bwd_ms"] = f"{type(error).__name__}: {str(error)[:200]}"
        results[str(chunk)] = row
        print(json.dumps({chunk: row}), flush=True)
        # after every chunk size, so a run killed at a later one keeps what it measured
        write_json(args.out, {"environment": env, "chunk_size": results})


if __name__ == "__main__":
    main()
