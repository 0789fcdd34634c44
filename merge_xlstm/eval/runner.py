"""`merge-xlstm eval MODEL... --suite NAME`: one packaged suite, several models, identical settings.

Every model (a directory written by this package, any ``save_pretrained`` directory, or a teacher's hub
id, resolved offline like ``linearize`` does) is wrapped in lm-eval's ``HFLM`` from its directory (the
student types are registered: this module lives in the ``merge_xlstm`` package) and runs the suite's
lm-eval group with the same tasks, shots, prompts, generation budgets, seeds, batch size, dtype and
``--limit``. lm-eval's own
results file and per-sample logs land in ``<output>/<model>/<suite>/``, written atomically (a rerun
replaces them), which is the layout `merge-xlstm compare` reads: ``compare results/<teacher>
results/<student>`` then covers every suite run for both. A suite's measures (`merge_xlstm.eval.measures`,
e.g. the longctx suite's CE by position) run after its tasks and write into the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from merge_xlstm.errors import UserError
from merge_xlstm.eval import sandbox
from merge_xlstm.eval.measures import combine_measures, metadata_overrides, run_measures
from merge_xlstm.eval.suites import SUITES_DIR, Suite, get_suite
from merge_xlstm.io import atomic_dir, to_json
from merge_xlstm.model_files import check_model_dir, check_tokenizer_files
from merge_xlstm.preflight import check_writable_dir


def main(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"must be at least 1, got {args.limit}", where="--limit")
    if args.batch_size < 1:
        raise UserError(f"must be at least 1, got {args.batch_size}", where="--batch-size")
    check_writable_dir(args.output, "--output")
    if suite.executes_code:
        permit_code_execution(args.allow_unsafe_code)
    names = [output_name(spec) for spec in args.models]
    if len(set(names)) < len(names):
        raise UserError("the same model is listed twice", where=" ".join(args.models))
    overrides = metadata_overrides(suite, args.metadata)
    paths = [model_dir(spec, needs_chat_template=suite.apply_chat_template) for spec in args.models]
    import torch
    from lm_eval.tasks import TaskManager

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    targets = [Path(args.output) / name / suite.name for name in names]
    for spec, path, target in zip(args.models, paths, targets, strict=True):
        # Per model: tasks that size their documents in the model's tokens (pass-key) read its directory.
        task_manager = TaskManager(include_path=str(SUITES_DIR), include_defaults=False,
                                   metadata={**overrides, "pretrained": str(path)})  # fmt: skip
        start = time.monotonic()
        results = evaluate(spec, path, suite, task_manager, target, device=device, batch_size=args.batch_size,
                           limit=args.limit)  # fmt: skip
        print(summary(spec, suite, results, time.monotonic() - start))
        for line in run_measures(suite, path, target, device=device, limit=args.limit, overrides=overrides):
            print(line)
    for line in combine_measures(suite, Path(args.output), list(zip(names, targets))):
        print(line)
    print(f"results: {Path(args.output)}/<model>/{suite.name}/ (compare them with `merge-xlstm compare`)")
    return 0


def output_name(spec: str) -> str:
    """Folder name of a model's results: its path or hub id with '/' as '__', as lm-eval names them."""
    return "__".join(part for part in Path(spec).parts if part not in ("/", ".")) or "model"


def model_dir(spec: str, *, needs_chat_template: bool) -> Path:
    """The directory holding `spec` (offline: local, cached or packaged), checked before any model runs.

    Safetensors weights only and no code of the directory's own (model_files.check_model_dir).
    """
    from transformers import AutoTokenizer

    from merge_xlstm.teacher import resolve_teacher

    path = resolve_teacher(spec)
    check_model_dir(path, spec)
    check_tokenizer_files(path, spec)
    if needs_chat_template and not AutoTokenizer.from_pretrained(path, trust_remote_code=False).chat_template:
        raise UserError("this suite renders prompts with the chat template, and the tokenizer has none", where=spec)
    return path


def permit_code_execution(allow_unsafe: bool) -> None:
    """Refuse code suites without isolation unless allowed; lm-eval's scoring then reads the choice."""
    backend = sandbox.select_backend(allow_unsafe)
    if backend == "unsafe":
        os.environ[sandbox.UNSAFE_ENV] = "1"
        print("merge-xlstm: warning: model-written code runs WITHOUT isolation", file=sys.stderr)
    else:
        print(f"merge-xlstm: model-written code runs in the {backend} sandbox", file=sys.stderr)


def evaluate(
    spec: str,
    path: Path,
    suite: Suite,
    task_manager: Any,
    target: Path,
    *,
    device: str,
    batch_size: int,
    limit: int | None,
    gen_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `suite` on the model in `path`; write lm-eval's results and samples into `target`.

    `gen_kwargs` update every generation task's own (e.g. a smaller max_gen_toks for a CPU budget).
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    import merge_xlstm.student  # noqa: F401  (registers the student model types with Auto*)

    # fp32 on CPU, where bf16 matmuls are slow and add rounding; bf16 on GPUs. Same for every model.
    lm = HFLM(pretrained=str(path), backend="causal", device=device, batch_size=batch_size,
              dtype="float32" if device == "cpu" else "bfloat16", use_safetensors=True, trust_remote_code=False)  # fmt: skip
    with atomic_dir(target, overwrite=True) as tmp:
        # An output path ending in .json makes lm-eval write results_<date>.json and samples_<task>_<date>.jsonl
        # side by side in its folder, instead of adding a folder named after the model.
        tracker = EvaluationTracker(output_path=str(tmp / "results.json"))
        results = simple_evaluate(
            model=lm,
            model_args={"pretrained": spec},
            tasks=[suite.group],
            task_manager=task_manager,
            limit=limit,
            log_samples=True,
            evaluation_tracker=tracker,
            apply_chat_template=suite.apply_chat_template,
            gen_kwargs=gen_kwargs,
        )
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        if not any(tmp.glob("results_*.json")):  # lm-eval logs a failed write and carries on
            raise RuntimeError(f"lm-eval wrote no results file for {spec}")
        _rewrite_non_finite(tmp)
    return results


def _rewrite_non_finite(directory: Path) -> None:
    """lm-eval writes a NaN score or stderr as a bare NaN, which is not JSON: write those values as null."""
    for path in [*directory.glob("results_*.json"), *directory.glob("samples_*.jsonl")]:
        text = path.read_text(encoding="utf-8")
        if "NaN" not in text and "Infinity" not in text:
            continue
        if path.suffix == ".jsonl":
            lines = (json.loads(line) for line in text.splitlines() if line.strip())
            path.write_text("".join(to_json(item, ensure_ascii=False) + "\n" for item in lines), encoding="utf-8")
        else:
            path.write_text(to_json(json.loads(text), indent=2, ensure_ascii=False), encoding="utf-8")


def summary(spec: str, suite: Suite, results: dict[str, Any], seconds: float) -> str:
    """One line per task: the score `compare` uses and how many documents it covers."""
    lines = [f"{spec} on suite {suite.name} ({seconds:.0f} s):"]
    for task in suite.tasks:
        entry = results["results"].get(task.name, {})
        count = results.get("n-samples", {}).get(task.name, {}).get("effective", "?")
        value = entry.get(task.primary_metric)
        shown = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"  {task.name:<22} {task.primary_metric:<32} {shown}  ({count} docs, {task.split} split)")
    return "\n".join(lines)
