"""Triton vs native mlstm_kernels on one kernel call, forward and backward (not run by CI).

Isolates the mLSTM kernels from the model: random softmax features, our gate conventions (document
resets with forget pre-activation -80, padding with input -80 / forget +80) on or off, fp32 and bf16.
Prints relative errors of h and of the gradients of q, k, v, i, f.
"""

from __future__ import annotations

import json

import torch

from merge_xlstm.student.kernels import MLSTM_BACKENDS


def run(backend: str, inputs: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    h, _ = MLSTM_BACKENDS.get(backend)(*leaves, None, False)
    (h.float() * torch.linspace(-1, 1, h.shape[-1], device=h.device)).sum().backward()
    return h.detach().float(), [x.grad.float() for x in leaves]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> None:
    torch.manual_seed(0)
    B, H, T, F, D = 2, 4, 256, 64, 64
    report = {}
    for resets in (False, True):
        q = torch.randn(B, H, T, F, device="cuda").softmax(-1)
        k = torch.randn(B, H, T, F, device="cuda").softmax(-1)
        v = torch.randn(B, H, T, D, device="cuda")
        i = torch.full((B, H, T), 6.2, device="cuda") + 0.5 * torch.randn(B, H, T, device="cuda")
        f = torch.linspace(3, 6, H, device="cuda")[None, :, None].expand(B, H, T).clone()
        if resets:
            f[:, :, 100] = -80.0  # a document start
            i[1, :, :7], f[1, :, :7] = -80.0, 80.0  # left padding of row 1
        ref_h, ref_g = run("native", [q, k, v, i, f], torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            h, g = run("triton", [q, k, v, i, f], dtype)
            report[f"resets={resets},{dtype}"] = {
                "h": rel(h, ref_h), **{name: rel(a, b) for name, a, b in zip("qkvif", g, ref_g)}
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
