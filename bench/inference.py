"""Inference and training speed of the hybrid student against its teacher, the way a user serves them.

Both models in bf16 on one GPU, random weights of a real shape (speed does not depend on values):
Llama-3.2-1B (`1b`) and SmolLM2-135M (`smollm2`). Every figure is a student/teacher ratio from the
same run. Parts (``--parts``):

- ``prefill``: B=1, tokens/s and peak memory at each context. Both through the inference path
  (``use_cache=True``, one logit row kept); the teacher with SDPA and its dynamic cache, the student
  with FlexAttention (SWA + sinks block mask) and chunked prefill. ``--compile-prefill`` also times
  ``torch.compile``d forwards (one compile per model, dynamic lengths).
- ``decode``: per-token time and memory at batch sizes ``--batch`` after a prompt of each context,
  one compiled step replayed through CUDA graphs (``torch.compile(mode="reduce-overhead")``) on a
  static cache for both: transformers' own ``StaticCache`` (sized to the context, as generate()
  sizes it) for the teacher, the student's constant-size one for the student. Where the compiled
  teacher does not run (memory), its eager dynamic-cache step is timed instead, and said so.
  Also the step's fraction of the HBM roofline: (weight bytes + state bytes read per step) over the
  step time, against the copy bandwidth measured in the same run.
- ``train``: optimizer steps per second of a stage-II step (student, sparse top-k KD loss on stored
  targets) against a plain fine-tune of the teacher (CE) on the same batch, and each one's MFU.
- ``profile``: where a B=1 prefill of ``--profile-context`` tokens spends its time, the 15 costliest
  operators of each model by self device time (torch.profiler), so a slow prefill names its kernel, and the
  host's side (launches, syncs, the costliest operators by CPU time, issue time against wall time).
- ``profile_decode``: one compiled decode step at the last ``--batch`` after ``--profile-context`` tokens,
  without CUDA graphs so the profiler sees each kernel: kernels per step and where the device time goes.
- ``equality``: greedy tokens of the served decode step (the fused kernel on CUDA), eager and compiled on
  the static cache, against eager dynamic-cache decoding through the layer-by-layer step, for
  ``--equality-steps`` steps (SmolLM2 shape, float32 and bfloat16). It runs after the shapes' parts: it
  is the longest and does not block the speed figures.

The student is the default hybrid kind (memory of evicted keys in every layer); ``--memory-from SHARE``
gives it memory in the layers from round(SHARE x layers) up only (``student.memory_layers``), the window
alone below, and the JSON records which (``student_memory_layers``). Its decode step is the device's
default (one fused Triton kernel per layer on CUDA) or ``--decode-backend layers`` (the layer-by-layer
step, for comparison); the JSON records which (``student_decode_backend``).

Writes one JSON (``--out``), updated after every measurement, so a killed run keeps what it measured
and ``--resume`` skips it. Never run by CI (needs CUDA).
Usage: python bench/inference.py --out bench/results/inference_h200.json [--shapes 1b smollm2] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

from merge_xlstm.linearize.losses import SparseKDLoss
from merge_xlstm.recipe import Stage2Spec
from merge_xlstm.student import from_teacher
from merge_xlstm.student.cache import CACHE_FIELD, output_cache
from merge_xlstm.student.kernels import MLSTM_BACKENDS, default_backends

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # a tiny shape, for a CPU smoke run of this script (--device cpu --shapes tiny)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
PEAK_BF16_FLOPS = 989e12  # H200 SXM dense bf16, the vendor's figure (MFU's denominator)
GiB = 2**30
DEVICE = "cuda"
COMPILE: dict[str, Any] = {"mode": "reduce-overhead"}  # CUDA graphs; --device cpu uses the eager backend
EQUALITY_SHAPE = "smollm2"
DTYPE = torch.bfloat16
MEMORY_KEYS = "evicted"  # the student's student.memory_keys (--memory-keys): the default kind's
MEMORY_FROM = 0.0  # --memory-from: the student's memory_layers are those from round(MEMORY_FROM x layers) up
DECODE_BACKEND: str | None = None  # --decode-backend: the student's decode step, None for the device's default
MLSTM_CHUNK: int | None = None  # --mlstm-chunk-size: the triton mLSTM backend's chunk size, None for the default
PREFILL_TIMED_TOKENS = 65536  # a short prefill is timed over as many prompts as make this many tokens


# ----------------------------------------------------------------------------------------- models
def build(shape: str, dtype: torch.dtype | None = None, max_len: int = 262144) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    dtype = dtype or DTYPE
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_len)
    config._attn_implementation = "sdpa"
    teacher = AutoModelForCausalLM.from_config(config).to(DEVICE, dtype).eval()
    layers = config.num_hidden_layers
    memory_layers = None if MEMORY_FROM == 0 else list(range(round(MEMORY_FROM * layers), layers))
    student = from_teacher(teacher, mixer="hybrid", window_size=512, num_sink_tokens=4, memory_outside_window=True,
                           memory_keys=MEMORY_KEYS, memory_layers=memory_layers).to(dtype).eval()
    student.model.set_backends(decode=DECODE_BACKEND)
    with torch.no_grad():  # open gates: the memory branch's cost is paid either way, its output matters here
        for layer in student.model.layers:
            if layer.self_attn.mixer == "swa":  # a layer memory_layers leaves out: the window alone
                continue
            layer.self_attn.ogate.bias.fill_(1.0)
            if MLSTM_CHUNK is not None:
                layer.self_attn.mlstm_backend = triton_at_chunk(MLSTM_CHUNK)
    return teacher, student


def triton_at_chunk(chunk: int) -> str:
    """The registry name of the triton mLSTM backend at chunk size `chunk` (registered on first use)."""
    name = f"triton_chunk{chunk}"
    if name not in MLSTM_BACKENDS:
        MLSTM_BACKENDS.register(name)(dataclasses.replace(MLSTM_BACKENDS.get("triton"), chunk_size=chunk))
    return name


def param_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def cache_bytes(cache: Any) -> int:
    """Bytes a decode step reads from the cache: the student's state, or the teacher's K/V."""
    total = 0
    for layer in cache.layers:
        tensors = getattr(layer, "state", None)
        tensors = tensors.values() if tensors is not None else (layer.keys, layer.values)
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def cuda_time(fn: Callable[[], Any], repeats: int) -> float:
    """Mean seconds per call over `repeats` calls, by CUDA events (after the caller's warm-up)."""
    if DEVICE == "cpu":
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - began) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def peak_GiB() -> float:
    return torch.cuda.max_memory_allocated() / GiB if DEVICE == "cuda" else None


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (the roofline's ceiling)."""
    src = torch.empty(4 * GiB if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = cuda_time(lambda: dst.copy_(src), 10)
    moved = 2 * dst.numel()
    del src, dst
    torch.cuda.empty_cache()
    return moved / seconds


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def fresh_peak() -> None:
    if DEVICE == "cpu":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------- prefill
@torch.no_grad()
def prefill(model: torch.nn.Module, context: int, forward: Callable[..., Any] | None = None) -> dict[str, float]:
    """B=1 prompt of `context` tokens through the inference path: tokens/s and peak memory."""
    forward = forward or model
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
    forward(input_ids=ids, use_cache=True, logits_to_keep=1)  # warm-up (kernels, compiles, block masks)
    fresh_peak()
    # at least 64K tokens timed: two 4K prompts measured 49,895 and 76,541 tok/s in two calls (2026-11-30)
    repeats = max(2, PREFILL_TIMED_TOKENS // context)
    seconds = cuda_time(lambda: forward(input_ids=ids, use_cache=True, logits_to_keep=1), repeats)
    return {"tok_s": context / seconds, "peak_GiB": peak_GiB()}


def traced(fn: Callable[[], Any]) -> Any:
    """torch.profiler's per-operator averages of one call of `fn`, the device's work included (synced)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync()
    return prof.key_averages()


def on_device(averages: Any) -> list[Any]:
    """The entries of `averages` that ran on the GPU (kernels, copies)."""
    return [e for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA")]


def profile_prefill(model: torch.nn.Module, context: int, top: int = 15) -> dict[str, float]:
    """The `top` operators of one prefill by self device time (CPU time on CPU), in milliseconds, and the host's
    side: CUDA runtime calls (launches, syncs, copies) and the `top` operators by self CPU time."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
    model(input_ids=ids, use_cache=True, logits_to_keep=1)  # warm-up: compiles and block masks stay out
    # unprofiled: how long the host takes to issue the pass (returns before the device is done unless it syncs)
    sync()
    began = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    issued = time.perf_counter()
    sync()
    unprofiled = {"host_issue_ms": 1000 * (issued - began), "wall_ms": 1000 * (time.perf_counter() - began)}
    spans: list[float] = []

    def timed_pass() -> None:  # timed inside the trace: the profiler's own start and stop stay out
        began = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync()
        spans.append(time.perf_counter() - began)

    averages = traced(timed_pass)
    wall = spans[0]
    field = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    events = sorted(averages, key=lambda e: getattr(e, field), reverse=True)[:top]
    # wall time against the device's busy time: where the device waits, the host (launches, syncs) is the limit
    busy = sum(e.self_device_time_total for e in on_device(averages)) / 1000
    totals = unprofiled | {"wall_ms (profiled)": 1000 * wall, "device_busy_ms": busy}
    # the host's side: kernel launches, and the calls that wait for the device (a sync stalls the launch queue)
    runtime = {e.key: e for e in averages if e.key.startswith(("cuda", "cu"))}
    host = {f"host {key}: calls, ms": [e.count, round(e.self_cpu_time_total / 1000, 2)] for key, e in runtime.items()}
    by_cpu = sorted((e for e in averages if e.key not in runtime), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    host |= {f"host op {e.key}: calls, ms": [e.count, round(e.self_cpu_time_total / 1000, 2)] for e in by_cpu}
    return totals | {event.key: getattr(event, field) / 1000 for event in events} | host


@torch.no_grad()
def profile_decode(model: torch.nn.Module, batch: int, context: int, top: int = 15) -> dict[str, Any]:
    """One compiled static-cache decode step without CUDA graphs (``mode="default"``), so the profiler sees each
    kernel the compiler emits: how many a step launches and where its device time goes (the graph-replayed
    step of ``decode`` runs the same kernels back to back)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=DEVICE)
    cache = static_cache(model, batch, context, 16)
    tokens = [fill(model, cache, ids, 4096)]
    step = torch.compile(model.forward, mode="default") if DEVICE == "cuda" else model.forward

    def one() -> None:
        tokens.append(step(input_ids=tokens[-1], **{CACHE_FIELD: cache}, use_cache=True).logits[:, -1:].argmax(-1))

    for _ in range(3):
        one()
    sync()
    kernels = on_device(traced(one))
    top_kernels = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"kernels_per_step": sum(e.count for e in kernels),
            "device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1000,
            "top": {e.key[:120]: [e.count, round(e.self_device_time_total / 1000, 3)] for e in top_kernels}}


# ----------------------------------------------------------------------------------------- decode
def static_cache(model: torch.nn.Module, batch: int, context: int, new_tokens: int) -> Any:
    return StaticCache(config=model.config, max_cache_len=context + new_tokens + 16)


@torch.no_grad()
def fill(model: torch.nn.Module, cache: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Prefill `ids` into `cache` in chunks (bounded activation memory); return the next greedy tokens."""
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start : start + chunk], **{CACHE_FIELD: cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model: torch.nn.Module, batch: int, context: int, steps: int, compiled: bool) -> dict[str, Any]:
    """Per-step time after a `context`-token prompt: compiled static-cache step, or eager dynamic cache."""
    fresh_peak()
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=DEVICE)
    cache = static_cache(model, batch, context, steps + 8) if compiled else DynamicCache(config=model.config)
    nxt = fill(model, cache, ids, 4096)
    step = torch.compile(model.forward, **COMPILE) if compiled else model.forward
    tokens = [nxt]

    def one() -> None:
        out = step(input_ids=tokens[-1], **{CACHE_FIELD: cache}, use_cache=True)
        tokens.append(out.logits[:, -1:].argmax(-1))

    for _ in range(4):  # compile, record and replay the CUDA graph
        one()
    seconds = cuda_time(one, steps)
    return {"ms_per_step": 1000 * seconds, "tok_s": batch / seconds, "peak_GiB": peak_GiB(),
            "state_bytes": cache_bytes(cache), "path": "compiled static cache" if compiled else "eager dynamic cache"}


# ------------------------------------------------------------------------------------------ train
def train_speed(model: torch.nn.Module, student: bool, batch: int, seq_len: int, steps: int) -> dict[str, float]:
    """Optimizer steps of a stage-II step (student: sparse KD on stored top-k) or a plain CE fine-tune (teacher)."""
    model = model.float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab, k = model.config.vocab_size, 256
    ids = torch.randint(0, vocab, (batch, seq_len), device=DEVICE)
    position_ids = torch.arange(seq_len, device=DEVICE).expand(batch, -1)
    batch_ = {"input_ids": ids, "position_ids": position_ids, "labels": ids.clone(),
              "topk_logprobs": torch.randn(batch, seq_len, k, device=DEVICE).log_softmax(-1),
              "topk_indices": torch.randint(0, vocab, (batch, seq_len, k), device=DEVICE)}
    loss_fn = SparseKDLoss(Stage2Spec(tokens=1), steps_per_epoch=1)

    def one() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if student:
                loss = loss_fn(model, batch_, step=0)[0]
            else:
                logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        one()
    fresh_peak()
    seconds = cuda_time(one, steps)
    params = sum(p.numel() for p in model.parameters())
    tok_s = batch * seq_len / seconds
    result = {"tok_s": tok_s, "mfu": 6 * params * tok_s / PEAK_BF16_FLOPS, "peak_GiB": peak_GiB()}
    del optimizer
    model.to(DTYPE).eval()
    return result


# -------------------------------------------------------------------------------------- equality
@torch.no_grad()
def greedy_equality(steps: int, dtype: torch.dtype) -> dict[str, Any]:
    """Compiled static-cache greedy decoding against eager dynamic-cache decoding, token by token."""
    _, student = build(EQUALITY_SHAPE, dtype)
    prompt = torch.randint(0, student.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    runs = {}
    # the reference: eager, the layer-by-layer decode step; then the served path's step, eager and compiled
    for name, compiled, backend in (("eager_layers", False, "layers"), ("eager", False, DECODE_BACKEND),
                                    ("compiled", True, DECODE_BACKEND)):
        torch._dynamo.reset()
        student.model.set_backends(decode=backend)
        cache = static_cache(student, 2, 300, steps + 8) if compiled else DynamicCache(config=student.config)
        step = torch.compile(student.forward, **COMPILE) if compiled else student.forward
        nxt = fill(student, cache, prompt, 4096)
        tokens = [nxt]
        for _ in range(steps - 1):
            tokens.append(step(input_ids=tokens[-1], **{CACHE_FIELD: cache}, use_cache=True).logits[:, -1:].argmax(-1))
        runs[name] = torch.cat(tokens, 1)
    result: dict[str, Any] = {"steps": steps, "decode_backend": DECODE_BACKEND or "device default"}
    for name in ("eager", "compiled"):
        same = (runs[name] == runs["eager_layers"]).all(0)
        result[f"{name}_equals_eager_layers"] = bool(same.all())
        result[f"{name}_first_difference_at"] = int((~same).nonzero()[0]) if not same.all() else None
    return result


# ------------------------------------------------------------------------------------------- main
class Results:
    """The JSON file, rewritten atomically after every measurement; `--resume` skips what it holds."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if resume and path.is_file() else {}

    def has(self, *keys: str) -> bool:
        node = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    def put(self, value: Any, *keys: str) -> None:
        node = self.data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False, default=str))
        tmp.replace(self.path)
        print(json.dumps({"/".join(keys): value}, default=str), flush=True)


def measured(results: Results, keys: tuple[str, ...], fn: Callable[[], Any]) -> Any:
    """Run `fn` unless `keys` were measured; record its result or the error (out of memory included)."""
    if results.has(*keys):
        node = results.data
        for key in keys:
            node = node[key]
        return node
    began = time.perf_counter()
    try:
        value = fn()
    except Exception as error:  # an OOM or a failed compile is a result too, recorded and not fatal
        value = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        if not isinstance(error, torch.OutOfMemoryError):
            traceback.print_exc()
    if isinstance(value, dict):
        value["seconds"] = round(time.perf_counter() - began, 1)
    results.put(value, *keys)
    if "CUDA error" in str(value.get("error", "")):
        # the context is unusable after e.g. an illegal memory access: stop; a --resume run continues after it
        raise SystemExit(f"{'/'.join(keys)}: {value['error']}")
    torch.cuda.empty_cache()
    return value


def faster_prefill(data: dict[str, Any], point: str, name: str) -> dict[str, Any] | None:
    """`name`'s faster measured prefill at `point`, eager or compiled, with its "path"; None if neither ran."""
    runs = [data[part][point][name] | {"path": part} for part in ("prefill", "prefill_compiled")
            if "tok_s" in data.get(part, {}).get(point, {}).get(name, {})]
    return max(runs, key=lambda m: m["tok_s"], default=None)


def ratios(results: Results) -> None:
    """student/teacher ratios of every measured pair, under each shape's "ratios"."""
    for shape, data in results.data.items():
        if shape not in SHAPES:
            continue
        out: dict[str, Any] = {}
        for part in ("prefill", "prefill_compiled", "decode", "train"):
            for point, pair in data.get(part, {}).items():
                s, t = pair.get("student", {}), pair.get("teacher", {})
                if "tok_s" in s and "tok_s" in t:
                    memory = s["peak_GiB"] / t["peak_GiB"] if s.get("peak_GiB") and t.get("peak_GiB") else None
                    out.setdefault(part, {})[point] = {"speed": s["tok_s"] / t["tok_s"], "memory": memory}
        # served: each model on its faster prefill path (eager or compiled) at each context, as a user would
        for point in data.get("prefill_compiled", {}):
            best = {name: faster_prefill(data, point, name) for name in ("student", "teacher")}
            if best["student"] and best["teacher"]:
                out.setdefault("prefill_served", {})[point] = {
                    "speed": best["student"]["tok_s"] / best["teacher"]["tok_s"],
                    "memory": (best["student"]["peak_GiB"] / best["teacher"]["peak_GiB"]
                               if best["student"].get("peak_GiB") and best["teacher"].get("peak_GiB") else None),
                    "paths": {name: m["path"] for name, m in best.items()}}
        results.put(out, shape, "ratios")


def combine(paths: list[Path], out: Path) -> None:
    """Several runs' results (the work split over GPUs) in one file, with the student/teacher ratios."""

    def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
        for key, value in other.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    results = Results(out, resume=False)
    for path in paths:
        merge(results.data, json.loads(path.read_text()))
    ratios(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep and skip what --out already holds")
    parser.add_argument("--shapes", nargs="+", default=["1b", "smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--parts", nargs="+", default=["prefill", "decode", "train", "equality"],
                        choices=["prefill", "decode", "train", "profile", "profile_decode", "equality"])
    parser.add_argument("--profile-context", type=int, default=16384, help="the prefill the profile parts trace (profile_decode: the prompt)")
    parser.add_argument("--profile-top", type=int, default=15, help="operators the profile part keeps")
    parser.add_argument("--prefill-contexts", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--decode-contexts", nargs="+", type=int, default=[4096, 16384, 32768, 65536])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["teacher", "student"], choices=["teacher", "student"],
                        help="which of the pair to measure (two processes can split the work over two GPUs)")
    parser.add_argument("--decode-models", nargs="+", default=["teacher", "student"], choices=["teacher", "student"],
                        help="which of --models the decode part measures")
    parser.add_argument("--compile-prefill", action="store_true")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq-len", type=int, default=2048)
    parser.add_argument("--equality-steps", type=int, default=200)
    parser.add_argument("--equality-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--mlstm-chunk-size", type=int, default=None,
                        help="the triton mLSTM kernels' chunk size (default: the backend's own)")
    parser.add_argument("--memory-keys", default="evicted", choices=["all", "evicted"], help="the student's memory_keys")
    parser.add_argument("--memory-from", type=float, default=0.0, metavar="SHARE",
                        help="the student's memory_layers: the layers from round(SHARE x layers) up, the others SWA "
                             "alone (0: every layer; SmolLM2's measured choice, layers 11-29 of 30, is 0.367)")
    parser.add_argument("--decode-backend", default=None, choices=["fused", "layers"],
                        help="the student's decode step (default: the device's, fused on CUDA)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (eager compile backend)")
    parser.add_argument("--dtype", default="bfloat16", help="the models' dtype (a CPU smoke run needs float32)")
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                        help="only merge these result files (e.g. one per GPU) into --out, with the ratios")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.out)
        return
    global DEVICE, EQUALITY_SHAPE, DTYPE, MEMORY_KEYS, MEMORY_FROM, MLSTM_CHUNK, DECODE_BACKEND
    DEVICE, DTYPE, MEMORY_KEYS, MEMORY_FROM = args.device, getattr(torch, args.dtype), args.memory_keys, args.memory_from
    DECODE_BACKEND = args.decode_backend
    MLSTM_CHUNK = args.mlstm_chunk_size
    if DEVICE == "cpu":
        COMPILE.clear()
        COMPILE["backend"] = "eager"
        EQUALITY_SHAPE = "tiny"
    results = Results(args.out, args.resume)
    env = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__}
    results.put(env, "environment")
    if not results.has("copy_bandwidth_GBs"):
        results.put(copy_bandwidth() / 1e9, "copy_bandwidth_GBs")
    bandwidth = results.data["copy_bandwidth_GBs"] * 1e9

    for shape in args.shapes:
        teacher, student = build(shape)
        results.put({"teacher": param_bytes(teacher), "student": param_bytes(student)}, shape, "param_bytes")
        results.put(student.config.memory_layers, shape, "student_memory_layers")
        results.put(DECODE_BACKEND or default_backends(torch.device(DEVICE))[2], shape, "student_decode_backend")
        models = {name: model for name, model in (("teacher", teacher), ("student", student)) if name in args.models}
        if "prefill" in args.parts:
            for context in args.prefill_contexts:
                for name, model in models.items():
                    measured(results, (shape, "prefill", str(context), name), lambda: prefill(model, context))
            if args.compile_prefill:
                for name, model in models.items():
                    forward = torch.compile(model.forward, dynamic=True)
                    for context in args.prefill_contexts:
                        measured(results, (shape, "prefill_compiled", str(context), name),
                                 lambda: prefill(model, context, forward))
        if "decode" in args.parts:
            for batch in args.batch:
                for context in args.decode_contexts:
                    point = f"B{batch}_{context}"
                    for name, model in models.items():
                        if name not in args.decode_models:
                            continue
                        keys = (shape, "decode", point, name)
                        value = measured(results, keys, lambda: decode(model, batch, context, args.decode_steps, True))
                        if name == "teacher" and "error" in value:  # the compiled static path did not run here
                            results.data[shape]["decode"][point].pop(name)
                            value = measured(results, keys, lambda: decode(model, batch, context, args.decode_steps, False))
                        if "ms_per_step" in value:
                            read = param_bytes(model) + value["state_bytes"]
                            value["roofline_fraction"] = read / (value["ms_per_step"] / 1000) / bandwidth
                            value["roofline_ms"] = 1000 * read / bandwidth
                            results.put(value, *keys)
        if "train" in args.parts:
            for name, model in models.items():
                measured(results, (shape, "train", f"B{args.train_batch}_{args.train_seq_len}", name),
                         lambda: train_speed(model, name == "student", args.train_batch, args.train_seq_len, 5))
        if "profile" in args.parts:
            for name, model in models.items():
                measured(results, (shape, "profile", str(args.profile_context), name),
                         lambda: profile_prefill(model, args.profile_context, args.profile_top))
        if "profile_decode" in args.parts:
            for name, model in models.items():
                measured(results, (shape, "profile_decode", f"B{args.batch[-1]}_{args.profile_context}", name),
                         lambda: profile_decode(model, args.batch[-1], args.profile_context, args.profile_top))
        ratios(results)
        del teacher, student, models
        torch.cuda.empty_cache()
    if "equality" in args.parts:
        for name in args.equality_dtypes:
            measured(results, ("equality", name), lambda: greedy_equality(args.equality_steps, getattr(torch, name)))


if __name__ == "__main__":
    main()
