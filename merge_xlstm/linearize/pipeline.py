"""`merge-xlstm linearize RECIPE`: teacher -> shared seed (stage I) -> targets -> expert (stage II).

Every step leaves a durable, atomically written result and is skipped when that result exists:

    <seed>/              stage-I student, shared by every expert of this teacher + student config
    <cache>/targets/K/   the teacher's top-k targets for this data (shards, resumable)
    <output>/            the expert: weights, tokenizer, merge_xlstm.json, README.md, metrics.jsonl, loss.png

Results computed from the teacher are keyed by its content (config, weights and tokenizer files,
:mod:`merge_xlstm.digests`), not by its name: replacing a teacher's weights in place makes new
targets, and a seed of the old weights is refused. Everything that can be checked before loading the
teacher is (:mod:`merge_xlstm.linearize.preflight`).

Work in progress lives in `<seed>.partial/` and `<output>.partial/` (checkpoints, metrics) and is
removed once the result is written, so rerunning after a kill resumes and rerunning after success
does nothing.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from merge_xlstm.digests import content_digest, fingerprint
from merge_xlstm.errors import UserError
from merge_xlstm.io import atomic_dir, to_json
from merge_xlstm.linearize.data import PackedData, build_packed_dataset
from merge_xlstm.linearize.preflight import check_before_work, targets_dir, training_rows
from merge_xlstm.linearize.report import (
    long_context_report,
    model_card,
    output_gate_medians,
    plot_losses,
    validation_metrics,
)
from merge_xlstm.linearize.sharding import gathered
from merge_xlstm.linearize.stage1 import Stage1Job, run_stage1
from merge_xlstm.linearize.stage2 import Stage2Job, run_stage2
from merge_xlstm.linearize.targets import TARGET_MODES, WithTargets, compute_targets
from merge_xlstm.linearize.training import MetricsLog, make_accelerator, training_precision
from merge_xlstm.provenance import read_metadata, weights_digest, write_metadata
from merge_xlstm.recipe import LinearizeRecipe, load_linearize_recipe
from merge_xlstm.teacher import cache_dir, load_teacher, resolve_teacher

METRICS = "metrics.jsonl"


def main(args: argparse.Namespace) -> int:
    recipe = load_linearize_recipe(args.recipe, args.overrides)
    if args.tokens_scale is not None:
        if args.tokens_scale <= 0:
            raise UserError(f"--tokens-scale must be > 0, got {args.tokens_scale}")
        for spec in (recipe.stage1, recipe.stage2):
            if spec is not None:
                spec.tokens = max(1, math.ceil(spec.tokens * args.tokens_scale))
    (build_seed if args.seed_only else linearize)(recipe, device=args.device, source=args.recipe)
    return 0


def linearize(recipe: LinearizeRecipe, *, device: str | None = None, source: str | None = None) -> Path:
    """Run (or resume, or skip) the whole recipe; return the expert directory.

    `source` is the recipe's file, named in errors about its fields.
    """
    output = Path(recipe.output)
    teacher_dir, teacher_digest = teacher_content(recipe)
    key = recipe_key(recipe, teacher_digest)
    existing = read_metadata(output)
    if existing.get("kind") == "expert" and existing.get("recipe_key") == key:
        print(f"{output}: already linearized with this recipe; nothing to do")
        return output
    if output.exists():
        raise UserError("exists and was not made by this recipe (or this teacher's content); delete it or choose "
                        "another output", where=str(output))  # fmt: skip
    check_before_work(recipe, teacher_dir, teacher_digest, seed_key(recipe, teacher_digest), cache_dir(), source)

    accelerator = make_accelerator(device, recipe.precision)
    teacher, tokenizer = recipe_teacher(recipe, accelerator)
    data = recipe_data(recipe, tokenizer, source)
    seed_reused = read_metadata(recipe.seed).get("kind") == "seed"
    seed_dir = ensure_seed(recipe, teacher, tokenizer, data.train, accelerator, teacher_digest)
    seed_meta = read_metadata(seed_dir)

    spec = recipe.stage2
    targets = recipe_targets(recipe, data, teacher_digest)
    compute_targets(teacher, data.validation, rows=len(data.validation), top_k=spec.top_k, directory=targets,
                    split="validation", accelerator=accelerator, dtype=spec.targets_dtype)  # fmt: skip
    if recipe.student.trains_from_targets():  # stored or online top-k; else the kind's loss needs the teacher
        train_rows, live_teacher = TARGET_MODES.get(spec.targets)(
            teacher, data.train, count=training_rows(recipe)[1], spec=spec, directory=targets, accelerator=accelerator
        )
    else:
        train_rows, live_teacher = data.train, teacher
    if live_teacher is None:
        del teacher  # stage II from stored targets needs no teacher
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    work = output.with_name(output.name + ".partial")
    # Safetensors only, never the directory's own code: the seed is a file anyone may have replaced.
    student = AutoModelForCausalLM.from_pretrained(
        seed_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    ).to(accelerator.device)
    student, stage2_tokens = run_stage2(Stage2Job.of(recipe), student=student, teacher=live_teacher,
                                        dataset=train_rows, accelerator=accelerator, work_dir=work)  # fmt: skip
    if accelerator.is_main_process:
        validation = WithTargets(data.validation, targets, "validation")
        with training_precision(accelerator):  # the same whether one process, DDP or FSDP trained it
            metrics = validation_metrics(student, validation, accelerator.device, recipe.stage2.top_k)
            gates = output_gate_medians(student, validation[0], accelerator.device)
            longctx = long_context_report(student, tokenizer, recipe.longctx, teacher=str(teacher_dir),
                                          device=accelerator.device)  # fmt: skip
        provenance = {
            "kind": "expert",
            "seed_id": seed_meta["seed_id"],
            "seed_path": str(seed_dir),
            "seed_reused": seed_reused,
            "recipe_key": key,
            "teacher": recipe.teacher,
            "teacher_digest": teacher_digest,
            "tokens": {"stage1": seed_meta.get("tokens", {}).get("stage1"),
                       "stage2": stage2_tokens},
            "validation": metrics,
            "output_gate_medians": gates,
            "long_context": longctx,
        }
        # The card shows the stage I that made the seed: a reused seed's own settings, not the recipe's block.
        _write_model_dir(output, student, tokenizer, provenance, recipe, metrics, gates,
                         metrics_sources=[seed_dir / METRICS, work / METRICS], stage1=seed_meta.get("stage1"))
        shutil.rmtree(work, ignore_errors=True)
        print(f"{output}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    accelerator.wait_for_everyone()
    return output


def build_seed(recipe: LinearizeRecipe, *, device: str | None = None, source: str | None = None) -> Path:
    """Only the shared seed (stage I, or reuse it): what `run` builds once before experts run in parallel."""
    teacher_dir, teacher_digest = teacher_content(recipe)
    check_before_work(recipe, teacher_dir, teacher_digest, seed_key(recipe, teacher_digest), cache_dir(), source,
                      seed_only=True)
    if (seed_dir := _reused_seed(recipe)) is not None:
        return seed_dir
    accelerator = make_accelerator(device, recipe.precision)
    teacher, tokenizer = recipe_teacher(recipe, accelerator)
    data = recipe_data(recipe, tokenizer, source)
    return ensure_seed(recipe, teacher, tokenizer, data.train, accelerator, teacher_digest)


def teacher_content(recipe: LinearizeRecipe) -> tuple[Path, str]:
    """The recipe's teacher directory and the digest of its content (config, weights, tokenizer files)."""
    teacher_dir = resolve_teacher(recipe.teacher)
    return teacher_dir, content_digest(teacher_dir, cache_dir())


def recipe_key(recipe: LinearizeRecipe, teacher_digest: str) -> str:
    """What an expert was made from: the recipe and its teacher's content. The report's long-context
    budget does not change the weights, so it is not part of the key."""
    return fingerprint({"recipe": recipe.model_dump(exclude={"longctx"}), "teacher": teacher_digest})


def seed_key(recipe: LinearizeRecipe, teacher_digest: str) -> str:
    """What makes two recipes' seeds interchangeable: the teacher's content and the student options."""
    return fingerprint({"teacher": teacher_digest, "student": recipe.student.model_dump()})


def recipe_teacher(recipe: LinearizeRecipe, accelerator: Accelerator) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The recipe's teacher on the accelerator's device: bf16 where training autocasts to bf16, else fp32."""
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    return load_teacher(resolve_teacher(recipe.teacher), dtype=dtype, device=accelerator.device)


def recipe_data(recipe: LinearizeRecipe, tokenizer: PreTrainedTokenizerBase, source: str | None = None) -> PackedData:
    """The recipe's packed rows: enough for the longer stage, validation rows held out (cached)."""
    try:
        return build_packed_dataset(
            recipe.data, tokenizer, num_tokens=max(training_rows(recipe)) * recipe.data.seq_len,
            seed=recipe.random_seed, cache_dir=cache_dir() / "data",
        )
    except UserError as exc:  # names a field of the recipe (data.sources[0]): add the recipe file
        raise exc.located_in(source) if source else exc from None


def recipe_targets(recipe: LinearizeRecipe, data: PackedData, teacher_digest: str | None = None) -> Path:
    """Where the teacher's top-k targets of the recipe's `data` live (keyed by teacher content, rows, k, dtype)."""
    digest = teacher_digest or teacher_content(recipe)[1]
    spec = recipe.stage2
    return targets_dir(cache_dir(), digest, data.fingerprint, spec.top_k, spec.targets_dtype)


def _reused_seed(recipe: LinearizeRecipe, say: Callable[[str], None] = print) -> Path | None:
    """The recipe's seed directory if the seed exists (checked against this teacher and student before any
    work, by preflight), else None."""
    seed_dir = Path(recipe.seed)
    meta = read_metadata(seed_dir)
    if meta.get("kind") != "seed":
        return None
    note = ""
    if meta.get("stage1") != (recipe.stage1.model_dump() if recipe.stage1 else None):
        note = "; this recipe's stage1 block differs and is not used"
    say(f"{seed_dir}: reusing the shared seed (stage I: {meta['tokens']['stage1']} tokens){note}")
    return seed_dir


def ensure_seed(
    recipe: LinearizeRecipe,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    accelerator: Accelerator,
    teacher_digest: str,
) -> Path:
    """Return the shared seed directory, running stage I (or the fresh init) only if it is missing.

    An existing seed was checked against this teacher and these student options before any work.
    """
    if (existing := _reused_seed(recipe, say=accelerator.print)) is not None:
        return existing
    seed_dir = Path(recipe.seed)
    torch.manual_seed(recipe.random_seed)
    student = recipe.student.build(teacher).to(torch.float32)
    work = seed_dir.with_name(seed_dir.name + ".partial")
    stage1_tokens = 0
    if recipe.stage1 is not None:
        stage1_tokens = run_stage1(Stage1Job.of(recipe), teacher=teacher, student=student, dataset=dataset,
                                   accelerator=accelerator, work_dir=work)  # fmt: skip
        student = gathered(student)  # FSDP: full weights, one plain model per rank
    if accelerator.is_main_process:
        record = {
            "kind": "seed",
            "seed_key": seed_key(recipe, teacher_digest),
            "teacher": recipe.teacher,
            "teacher_digest": teacher_digest,
            "student": recipe.student.model_dump(),
            "stage1": recipe.stage1.model_dump() if recipe.stage1 else None,
            "tokens": {"stage1": stage1_tokens},
        }
        _write_model_dir(seed_dir, student, tokenizer, record, recipe, {}, None, metrics_sources=[work / METRICS],
                         stage1=record["stage1"])
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return seed_dir


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
    stage1: dict[str, Any] | None,
) -> None:
    """Write a loadable model directory atomically, with provenance, card, metrics and loss curves.

    A seed's `seed_id` is the digest of its own weights; an expert carries its seed's id. The card's
    recipe shows `stage1`, the settings of the stage I that made the seed.
    """
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if record["kind"] == "seed":
            record["seed_id"] = weights_digest(tmp)
        write_metadata(tmp, record)
        rows = [row for source in metrics_sources for row in MetricsLog.read(source)]
        (tmp / METRICS).write_text("".join(to_json(r) + "\n" for r in rows))
        plot_losses(tmp / METRICS, tmp / "loss.png")
        ran = {**recipe.model_dump(), "stage1": stage1}
        card = model_card(name=target.name, recipe=ran, provenance=record, metrics=metrics, gates=gates)
        (tmp / "README.md").write_text(card)
