"""GPU checks and speed of the hybrid student against its teacher (not run by CI).

1. Kernel agreement: the GPU path (mlstm_kernels triton chunkwise + FlexAttention block mask) against
   the reference path (native mlstm_kernels + dense-mask SDPA) on the same weights, forward logits and
   backward gradients of the new parameters, in float32 and bfloat16.
2. Decoding memory: peak GPU memory while decoding N tokens after a short and after a long prompt
   (constant state: the two must match).
3. The FlexAttention paths CPU tests cannot reach: a prefill continuing a cache (more keys than
   queries) and the log-sum-exp stage I's split terms use, against the dense reference.
4. The fused decode step (one compiled Triton kernel per layer) against the layer-by-layer step on the
   same weights and tokens, after a prompt past the window, in float32 and bfloat16 (CPU tests run the
   kernel in Triton's interpreter only).
Speed and memory against the teacher: bench/inference.py.

Usage: python bench/student_gpu.py --out bench.json [--model-size smollm2]
Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from merge_xlstm.student import from_teacher
from merge_xlstm.student.cache import CACHE_FIELD, output_cache

SIZES = {
    # SmolLM2-135M's architecture (random weights: speed and memory do not depend on the values)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=65536,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True),
    # a Llama-3.2-1B-shaped model
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True),
}


def teacher_of(size: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size])
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).to("cuda", dtype).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def kernel_agreement(size: str, seq_len: int) -> dict[str, dict[str, float]]:
    """The GPU path (triton mLSTM + FlexAttention) in fp32 and bf16 against the fp32 reference path
    (native mLSTM + dense-mask SDPA), same weights, two packed documents per row."""
    teacher = teacher_of(size, torch.float32)
    student = from_teacher(teacher, mixer="hybrid", window_size=512, num_sink_tokens=4)
    del teacher
    # make the new parameters non-trivial so the check is not about the identity init
    with torch.no_grad():
        for name, p in student.named_parameters():
            if any(k in name for k in ("phi_q", "phi_k", "gate")):
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, SIZES[size]["vocab_size"], (2, seq_len), device="cuda")
    pos = torch.cat([torch.arange(seq_len // 3), torch.arange(seq_len - seq_len // 3)]).expand(2, -1).to("cuda")

    def run(dtype: torch.dtype, backends: tuple[str, str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student.to(dtype).model.set_backends(*backends)
        student.zero_grad()
        logits = student(input_ids=ids, position_ids=pos).logits
        logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.detach().float().clone() for n, p in student.named_parameters()
                 if p.grad is not None and ("phi" in n or "gate" in n)}
        return logits.detach().float(), grads

    ref_logits, ref_grads = run(torch.float32, ("native", "sdpa"))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits, grads = run(dtype, ("triton", "flex"))
        errs = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
        big = [n for n in ref_grads if ref_grads[n].norm() > 1e-3 * max(g.norm() for g in ref_grads.values())]
        out[str(dtype).removeprefix("torch.")] = {
            "logits_rel_err": rel_err(logits, ref_logits),
            "logits_max_abs_err": (logits - ref_logits).abs().max().item(),
            "new_param_grad_rel_err_median": sorted(errs.values())[len(errs) // 2],
            "new_param_grad_rel_err_max_over_non_negligible": max(errs[n] for n in big),
        }
    return out


@torch.no_grad()
def decode_memory(size: str, prompts: list[int], new_tokens: int) -> dict[str, float]:
    teacher = teacher_of(size, torch.bfloat16)
    student = from_teacher(teacher, mixer="hybrid", window_size=512, num_sink_tokens=4)
    del teacher
    result = {}
    for length in prompts:
        ids = torch.randint(0, SIZES[size]["vocab_size"], (1, length), device="cuda")
        out = student(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        began = time.perf_counter()
        for _ in range(new_tokens):
            out = student(input_ids=nxt, **{CACHE_FIELD: cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        result[f"prompt_{length}"] = {
            "decode_peak_minus_start_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "allocated_after_decode_MiB": torch.cuda.memory_allocated() / 2**20,
            "ms_per_token": 1000 * (time.perf_counter() - began) / new_tokens,
        }
        del cache, out
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def cached_and_split_agreement(size: str, seq_len: int) -> dict[str, float]:
    """Paths the CPU tests cannot reach: FlexAttention with more keys than queries (a prefill that
    continues a cache) and with the log-sum-exp (stage I's split of the teacher's attention), each
    against the dense reference on the same weights, fp32."""
    teacher = teacher_of(size, torch.float32)
    student = from_teacher(teacher, mixer="hybrid", window_size=512, num_sink_tokens=4, memory_outside_window=True)
    ids = torch.randint(0, SIZES[size]["vocab_size"], (2, seq_len), device="cuda")
    half = seq_len // 2
    out: dict[str, float] = {}
    student.model.set_backends("native", "sdpa")
    reference = student(input_ids=ids).logits
    student.model.set_backends("triton", "flex")
    first = student(input_ids=ids[:, :half], use_cache=True)
    rest = student(input_ids=ids[:, half:], use_cache=True, **{CACHE_FIELD: output_cache(first)})
    out["cached_prefill_logits_rel_err"] = rel_err(torch.cat([first.logits, rest.logits], 1), reference)
    pos = torch.arange(seq_len, device="cuda").expand(2, -1)
    inputs = [torch.randn(2, seq_len, SIZES[size]["hidden_size"], device="cuda")] * len(student.model.layers)
    split = {}
    for backends in (("native", "sdpa"), ("triton", "flex")):
        student.model.set_backends(*backends)
        split[backends[1]] = list(student.model.align_layers(inputs, pos, reference=True))
    for key in ("reference", "beyond"):
        out[f"split_{key}_max_abs_err"] = max(
            (a[key] - b[key]).abs().max().item() for a, b in zip(split["sdpa"], split["flex"])
        )
    out["split_swa_lse_max_abs_err"] = max(
        (a["parts"].swa_lse - b["parts"].swa_lse).abs().max().item() for a, b in zip(split["sdpa"], split["flex"])
    )
    return out


@torch.no_grad()
def fused_decode_agreement(size: str, prompt: int, steps: int) -> dict[str, dict[str, float]]:
    """Logits of `steps` decode steps and the final mLSTM state, fused step against the layer-by-layer step,
    fed the same random tokens after a `prompt`-token prompt (row 1 left-padded by 5), per dtype."""
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        teacher = teacher_of(size, dtype)
        student = from_teacher(teacher, mixer="hybrid", window_size=512, num_sink_tokens=4).to(dtype).eval()
        del teacher
        generator = torch.Generator(device="cuda").manual_seed(0)
        for name, p in student.named_parameters():
            if any(k in name for k in ("phi_q", "phi_k", "gate")):
                p.copy_(torch.randn(p.shape, device="cuda", generator=generator) * 0.3)
        vocab = SIZES[size]["vocab_size"]
        ids = torch.randint(0, vocab, (2, prompt), device="cuda", generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        tokens = torch.randint(0, vocab, (2, steps), device="cuda", generator=generator)
        runs = {}
        for backend in ("layers", "fused"):
            student.model.set_backends(decode=backend)
            cache = output_cache(student(input_ids=ids, attention_mask=mask, use_cache=True))
            logits, step_mask = [], mask
            for t in range(steps):
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
                out = student(input_ids=tokens[:, t : t + 1], attention_mask=step_mask, use_cache=True,
                              **{CACHE_FIELD: cache})
                logits.append(out.logits.float())
            runs[backend] = (torch.cat(logits, 1), [layer.state["C"].float() for layer in cache.layers])
        (want, want_c), (got, got_c) = runs["layers"], runs["fused"]
        result[str(dtype).removeprefix("torch.")] = {
            "logits_rel_err": rel_err(got, want),
            "logits_max_abs_err": (got - want).abs().max().item(),
            "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "state_C_rel_err_max": max(rel_err(a, b) for a, b in zip(got_c, want_c)),
        }
        del student
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-student-gpu.json")
    parser.add_argument("--model-size", default="smollm2", choices=sorted(SIZES))
    parser.add_argument("--decode-tokens", type=int, default=1000)
    parser.add_argument("--sections", nargs="+", default=None, help="run only these sections (default: all)")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model_size": args.model_size}
    sections = {
        "agreement_vs_fp32_reference": lambda: kernel_agreement(args.model_size, 1024),
        "cached_and_split_vs_dense": lambda: cached_and_split_agreement(args.model_size, 2048),
        "decode_memory": lambda: decode_memory(args.model_size, [1024, 16384], args.decode_tokens),
        "fused_decode_vs_layers": lambda: fused_decode_agreement(args.model_size, 1024, 64),
    }
    for name, run in sections.items():  # written after each section, so a time-out keeps what finished
        if args.sections and name not in args.sections:
            continue
        report[name] = run()
        print(name, json.dumps(report[name]), flush=True)
        with open(args.out, "w") as handle:
            handle.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
