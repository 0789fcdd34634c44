"""Merge time and peak memory: four SmolLM2-sized experts, `merge-xlstm merge` vs `mergekit-yaml`.

    python bench/merge_memory.py --workdir /tmp/merge-bench [--model student|llama] [--methods linear ties]

Builds a random-init seed of SmolLM2-135M's shape (REFERENCE.md §7: Llama, 30 layers, hidden 576,
9/3 heads, vocab 49152, tied embeddings) -- as the hybrid student when `merge_xlstm.student` can
build one, else as the plain Llama teacher -- plus four experts (the seed plus noise), then times each
command in a fresh process. Peak memory is the child's ru_maxrss (which includes the mmap'd input
pages the kernel may reclaim) and the sampled peak of its anonymous memory (RssAnon: what the merge
itself holds). mergekit's own CLI is run on the same directories; where it fails, its last error
line is recorded. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
EXPERTS = {"math": 0.35, "code": 0.35, "stem": 0.20, "chat": 0.10}


def build_inputs(root: Path, model_kind: str, dtype: torch.dtype) -> str:
    """Seed + four experts under `root`; returns the model kind actually built."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge_xlstm.provenance import weights_digest, write_metadata

    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    if model_kind == "student":
        try:
            from merge_xlstm.student import from_teacher
        except ImportError:
            model_kind = "llama"
        else:
            model = from_teacher(model, kind="hybrid")
    seed = root / "seed"
    model.to(dtype).save_pretrained(seed)
    write_metadata(seed, {"kind": "seed", "seed_id": weights_digest(seed)})
    weights = load_file(seed / "model.safetensors")
    for i, name in enumerate(EXPERTS):
        shutil.copytree(seed, root / name)
        gen = torch.Generator().manual_seed(i)
        noisy = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in weights.items()}
        save_file(noisy, root / name / "model.safetensors", metadata={"format": "pt"})
        write_metadata(root / name, {"kind": "expert", "seed_id": weights_digest(seed), "name": name})
    return model_kind


def measure(cmd: list[str], cwd: Path) -> dict:
    """Wall and CPU time, ru_maxrss and sampled peak RssAnon of `cmd` run in a fresh process.

    CPU time is the steadier number on a shared machine: wall time also counts waiting for cores.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = 0

    def sample() -> None:
        nonlocal peak_anon
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    result = {"seconds": round(time.perf_counter() - start, 2), "returncode": proc.returncode,
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
              "max_rss_mib": round(usage.ru_maxrss / 1024), "peak_rss_anon_mib": round(peak_anon / 1024)}
    if proc.returncode != 0:
        errors = [line for line in output.splitlines() if "Error" in line or "error" in line]
        result["error"] = (errors or output.splitlines() or ["?"])[-1][-300:]
    return result


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest elementwise difference between two merged directories (same tensor names)."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict:
        return {k: f for f in path.glob("*.safetensors") for k in safe_open(f, "pt").keys()}

    left, right = tensors(a), tensors(b)
    diff = 0.0
    for name, file in left.items():
        with safe_open(file, "pt") as fa, safe_open(right[name], "pt") as fb:
            diff = max(diff, (fa.get_tensor(name).float() - fb.get_tensor(name).float()).abs().max().item())
    return diff


def recipes(root: Path, method: str, out: Path, dtype: str) -> tuple[dict, dict]:
    """The same merge as our recipe and as mergekit's YAML config."""
    params = {"density": 0.5} if method != "linear" and method != "task_arithmetic" else {}
    ours = {"method": method, "base": str(root / "seed"), "output": str(out / "ours"), "dtype": dtype,
            "experts": [{"path": str(root / n), "weight": w} for n, w in EXPERTS.items()], "parameters": params}
    theirs = {"merge_method": method, "dtype": "float32", "out_dtype": dtype,
              "models": [{"model": str(root / n), "parameters": {"weight": w, **params}} for n, w in EXPERTS.items()]}
    if method == "linear":
        theirs["parameters"] = {"normalize": True}
    else:
        theirs["base_model"] = str(root / "seed")
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model", choices=["student", "llama"], default="student")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=["linear", "task_arithmetic", "ties"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; the fastest is reported")
    args = parser.parse_args()

    root = args.workdir / "inputs"
    if not (root / "chat").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        args.model = build_inputs(root, args.model, getattr(torch, args.dtype))
    bin_dir = Path(sys.executable).parent
    report = {"model": json.loads((root / "seed" / "config.json").read_text())["model_type"], "dtype": args.dtype,
              "input_mib_each": round(sum(f.stat().st_size for f in (root / "seed").glob("*.safetensors")) / 2**20),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "import_only": measure([sys.executable, "-c", "import merge_xlstm.merge.run"], args.workdir)}
    for method in args.methods:
        out = args.workdir / method
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        ours, theirs = recipes(root, method, out, args.dtype)
        (out / "ours.yaml").write_text(yaml.safe_dump(ours))
        (out / "mergekit.yaml").write_text(yaml.safe_dump(theirs))
        commands = {
            "merge-xlstm": [sys.executable, "-m", "merge_xlstm", "merge", str(out / "ours.yaml"),
                            "--set", "overwrite=true"],
            "mergekit-yaml": [str(bin_dir / "mergekit-yaml"), str(out / "mergekit.yaml"), str(out / "theirs"),
                              "--out-shard-size", "1B"],
        }
        runs = {tool: [] for tool in commands}
        for _ in range(args.repeat):  # interleaved, so load from other processes hits both tools alike
            for tool, cmd in commands.items():
                runs[tool].append(measure(cmd, out))
        report[method] = {tool: min(r, key=lambda m: m["seconds"]) | {"all_seconds": [m["seconds"] for m in r]}
                          for tool, r in runs.items()}
        if (out / "ours").is_dir() and (out / "theirs").is_dir():
            report[method]["max_abs_diff"] = max_abs_diff(out / "ours", out / "theirs")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
