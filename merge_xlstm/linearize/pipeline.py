"""`merge-xlstm linearize RECIPE`: teacher -> shared seed (stage I) -> targets -> expert (stage II).

Every step leaves a durable, atomically written result and is skipped when that result exists:

    <seed>/              stage-I student, shared by every expert of this teacher + student config
    <cache>/targets/K/   the teacher's top-k targets for this data (shards, resumable)
    <output>/            the expert: weights, tokenizer, merge_xlstm.json, README.md, metrics.jsonl, loss.png

Work in progress lives in `<seed>.partial/` and `<output>.partial/` (checkpoints, metrics) and is
removed once the result is written, so rerunning after a kill resumes and rerunning after success
does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from merge_xlstm.errors import UserError
from merge_xlstm.io import atomic_dir
from merge_xlstm.linearize.data import PackedData, build_packed_dataset
from merge_xlstm.linearize.report import model_card, output_gate_medians, plot_losses, validation_metrics
from merge_xlstm.linearize.sharding import gathered
from merge_xlstm.linearize.stage1 import run_stage1
from merge_xlstm.linearize.stage2 import run_stage2, steps_per_epoch, total_steps
from merge_xlstm.linearize.targets import TARGET_MODES, WithTargets, compute_targets
from merge_xlstm.linearize.training import MetricsLog, make_accelerator, num_steps
from merge_xlstm.provenance import read_metadata, weights_digest, write_metadata
from merge_xlstm.recipe import LinearizeRecipe, load_linearize_recipe
from merge_xlstm.student import from_teacher
from merge_xlstm.teacher import cache_dir, load_teacher

METRICS = "metrics.jsonl"


def main(args: argparse.Namespace) -> int:
    recipe = load_linearize_recipe(args.recipe, args.overrides)
    if args.tokens_scale is not None:
        if args.tokens_scale <= 0:
            raise UserError(f"--tokens-scale must be > 0, got {args.tokens_scale}")
        for spec in (recipe.stage1, recipe.stage2):
            if spec is not None:
                spec.tokens = max(1, math.ceil(spec.tokens * args.tokens_scale))
    (build_seed if args.seed_only else linearize)(recipe, device=args.device)
    return 0


def fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def linearize(recipe: LinearizeRecipe, *, device: str | None = None) -> Path:
    """Run (or resume, or skip) the whole recipe; return the expert directory."""
    output = Path(recipe.output)
    recipe_key = fingerprint(recipe.model_dump())
    existing = read_metadata(output)
    if existing.get("kind") == "expert" and existing.get("recipe_key") == recipe_key:
        print(f"{output}: already linearized with this recipe; nothing to do")
        return output
    if output.exists():
        raise UserError("exists and was not made by this recipe; delete it or choose another output", where=str(output))

    accelerator = make_accelerator(device, recipe.precision)
    teacher, tokenizer = recipe_teacher(recipe, accelerator)
    seq_len = recipe.data.seq_len
    data = recipe_data(recipe, tokenizer)
    seed_dir = ensure_seed(recipe, teacher, tokenizer, data.train, accelerator)
    seed_meta = read_metadata(seed_dir)

    targets = targets_dir(recipe, data)
    compute_targets(teacher, data.validation, rows=len(data.validation), top_k=recipe.stage2.top_k,
                    directory=targets, split="validation", accelerator=accelerator, dtype=recipe.stage2.targets_dtype)
    if recipe.student.kind == "hybrid":  # stored or online top-k targets; Distil-xLSTM's loss needs the teacher
        train_rows, live_teacher = TARGET_MODES.get(recipe.stage2.targets)(
            teacher, data.train, count=steps_per_epoch(recipe) * recipe.stage2.batch_size, spec=recipe.stage2,
            directory=targets, accelerator=accelerator)
    else:
        train_rows, live_teacher = data.train, teacher
    if live_teacher is None:
        del teacher  # stage II from stored targets needs no teacher
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    work = output.with_name(output.name + ".partial")
    student = AutoModelForCausalLM.from_pretrained(seed_dir, dtype=torch.float32).to(accelerator.device)
    student = run_stage2(recipe, student=student, teacher=live_teacher, dataset=train_rows,
                         accelerator=accelerator, work_dir=work)
    if accelerator.is_main_process:
        validation = WithTargets(data.validation, targets, "validation")
        metrics = validation_metrics(student, validation, accelerator.device, recipe.stage2.top_k)
        gates = output_gate_medians(student, validation[0], accelerator.device)
        provenance = {
            "kind": "expert",
            "seed_id": seed_meta["seed_id"],
            "seed_path": str(seed_dir),
            "recipe_key": recipe_key,
            "teacher": recipe.teacher,
            "tokens": {"stage1": seed_meta.get("tokens", {}).get("stage1"),
                       "stage2": total_steps(recipe) * recipe.stage2.batch_size * seq_len},
            "validation": metrics,
            "output_gate_medians": gates,
        }
        _write_model_dir(output, student, tokenizer, provenance, recipe, metrics, gates,
                         metrics_sources=[seed_dir / METRICS, work / METRICS])
        shutil.rmtree(work, ignore_errors=True)
        print(f"{output}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    accelerator.wait_for_everyone()
    return output


def build_seed(recipe: LinearizeRecipe, *, device: str | None = None) -> Path:
    """Only the shared seed (stage I, or reuse it): what `run` builds once before experts run in parallel."""
    if (seed_dir := _existing_seed(recipe)) is not None:
        return seed_dir
    accelerator = make_accelerator(device, recipe.precision)
    teacher, tokenizer = recipe_teacher(recipe, accelerator)
    return ensure_seed(recipe, teacher, tokenizer, recipe_data(recipe, tokenizer).train, accelerator)


def recipe_teacher(recipe: LinearizeRecipe, accelerator: Accelerator) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The recipe's teacher on the accelerator's device: bf16 where training autocasts to bf16, else fp32."""
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    return load_teacher(recipe.teacher, dtype=dtype, device=accelerator.device)


def recipe_data(recipe: LinearizeRecipe, tokenizer: PreTrainedTokenizerBase) -> PackedData:
    """The recipe's packed rows: enough for the longer stage; validation rows held out (cached)."""
    seq_len = recipe.data.seq_len
    rows1 = num_steps(recipe.stage1, seq_len) * recipe.stage1.batch_size if recipe.stage1 else 0
    rows2 = steps_per_epoch(recipe) * recipe.stage2.batch_size
    return build_packed_dataset(
        recipe.data, tokenizer, num_tokens=max(rows1, rows2) * seq_len, seed=recipe.random_seed,
        cache_dir=cache_dir() / "data",
    )


def targets_dir(recipe: LinearizeRecipe, data: PackedData) -> Path:
    """Where the teacher's top-k targets of `data` live (keyed by teacher, data, k and storage dtype)."""
    key = {"teacher": recipe.teacher, "data": data.fingerprint, "k": recipe.stage2.top_k,
           "dtype": recipe.stage2.targets_dtype}
    return cache_dir() / "targets" / fingerprint(key)


def seed_key(recipe: LinearizeRecipe) -> str:
    """What makes two recipes' seeds interchangeable: the teacher and the student options."""
    return fingerprint({"teacher": recipe.teacher, "student": recipe.student.model_dump()})


def ensure_seed(
    recipe: LinearizeRecipe,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    accelerator: Accelerator,
) -> Path:
    """Return the shared seed directory, running stage I (or the fresh init) only if it is missing."""
    if (existing := _existing_seed(recipe, say=accelerator.print)) is not None:
        return existing
    seed_dir, key = Path(recipe.seed), seed_key(recipe)
    torch.manual_seed(recipe.random_seed)
    options = recipe.student.model_dump()
    student = from_teacher(teacher, **options).to(torch.float32)
    work = seed_dir.with_name(seed_dir.name + ".partial")
    stage1_tokens = 0
    if recipe.stage1 is not None:
        run_stage1(recipe, teacher=teacher, student=student, dataset=dataset, accelerator=accelerator, work_dir=work)
        student = gathered(student)  # FSDP: full weights, one plain model per rank
        stage1_tokens = num_steps(recipe.stage1, recipe.data.seq_len) * recipe.stage1.batch_size * recipe.data.seq_len
    if accelerator.is_main_process:
        record = {
            "kind": "seed",
            "seed_key": key,
            "teacher": recipe.teacher,
            "student": options,
            "stage1": recipe.stage1.model_dump() if recipe.stage1 else None,
            "tokens": {"stage1": stage1_tokens},
        }
        _write_model_dir(seed_dir, student, tokenizer, record, recipe, {}, None, metrics_sources=[work / METRICS])
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return seed_dir


def _existing_seed(recipe: LinearizeRecipe, say: Callable[[str], None] = print) -> Path | None:
    """The recipe's seed directory if it holds this teacher's and student's seed; None if not built yet."""
    seed_dir = Path(recipe.seed)
    meta = read_metadata(seed_dir)
    if meta.get("kind") == "seed":
        if meta.get("seed_key") != seed_key(recipe):
            raise UserError("holds a seed for another teacher or student config; delete it or choose another seed",
                            where=str(seed_dir))
        say(f"{seed_dir}: reusing the shared seed (stage I: {meta['tokens']['stage1']} tokens)")
        return seed_dir
    if seed_dir.exists():
        raise UserError("exists but is not a merge-xlstm seed", where=str(seed_dir))
    return None


def _write_model_dir(
    target: Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    record: dict[str, Any],
    recipe: LinearizeRecipe,
    metrics: dict[str, Any],
    gates: list[float] | None,
    *,
    metrics_sources: list[Path],
) -> None:
    """Write a loadable model directory atomically, with provenance, card, metrics and loss curves.

    A seed's `seed_id` is the digest of its own weights; an expert carries its seed's id.
    """
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if record["kind"] == "seed":
            record["seed_id"] = weights_digest(tmp)
        write_metadata(tmp, record)
        rows = [row for source in metrics_sources for row in MetricsLog.read(source)]
        (tmp / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_losses(tmp / METRICS, tmp / "loss.png")
        card = model_card(name=target.name, recipe=recipe.model_dump(), provenance=record, metrics=metrics, gates=gates)
        (tmp / "README.md").write_text(card)
