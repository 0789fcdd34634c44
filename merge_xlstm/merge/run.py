"""`merge-xlstm merge [RECIPE]`: check the experts, merge them with mergekit, write a student dir.

Everything that can be wrong with a recipe is found before the merge starts (one line, exit 2, no
output): the recipe, the inputs' files and headers, a writable output, weights that would make the
merge meaningless, and finally finite values in every input tensor. The merge then streams into a
temporary sibling of `output` that is renamed only when weights, config, tokenizer, provenance and
model card are all written, so an interrupted merge leaves nothing behind (and the next merge into
the same output removes what a killed one left, see :mod:`merge_xlstm.io`).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

import merge_xlstm.student  # noqa: F401  (experts are students: registers their types with AutoConfig)
from merge_xlstm.errors import UserError
from merge_xlstm.io import atomic_dir
from merge_xlstm.merge.card import merged_record, model_card
from merge_xlstm.merge.checks import (
    ModelDir,
    check_finite,
    check_same_student,
    check_task_vector_base,
    common_seed,
    read_model_dir,
)
from merge_xlstm.merge.engine import merge_to_dir
from merge_xlstm.merge.methods import MergeMethodInfo, Scalar, get_method, mergekit_parameters
from merge_xlstm.preflight import check_writable_dir
from merge_xlstm.provenance import write_metadata
from merge_xlstm.recipe import MergeRecipe, load_merge_recipe


@dataclass(frozen=True)
class MergePlan:
    """A recipe that passed every check, with what the merge needs of it."""

    recipe: MergeRecipe
    method: MergeMethodInfo
    parameters: dict[str, Scalar]
    expert_parameters: list[dict[str, Scalar]]
    base: ModelDir | None
    experts: list[ModelDir]
    seed_id: str | None

    @property
    def reference(self) -> ModelDir:
        """The directory config, tokenizer and generation settings are taken from (all are equal)."""
        return self.base or self.experts[0]


def plan(recipe: MergeRecipe, where: str) -> MergePlan:
    """Validate `recipe` completely, reading only configs, headers and provenance records."""
    method = get_method(recipe.method, where)
    parameters, expert_parameters = mergekit_parameters(method, recipe, where)
    if method.needs_base and recipe.base is None:
        raise UserError(f"method {recipe.method} needs the shared stage-I seed the experts were trained from",
                        where=f"{where}: base")
    inputs = [Path(e.path).resolve() for e in recipe.experts]
    for i, path in enumerate(inputs):
        if path in inputs[:i]:
            raise UserError(f"{recipe.experts[i].path} is listed twice", where=f"{where}: experts.{i}.path")
        if method.needs_base and path == Path(recipe.base).resolve():
            raise UserError(f"{recipe.experts[i].path} is the base; its task vector would be zero",
                            where=f"{where}: experts.{i}.path")
    output = Path(recipe.output).resolve()
    if output in inputs or (recipe.base and output == Path(recipe.base).resolve()):
        raise UserError("the output would replace one of the merge's inputs", where=f"{where}: output")
    if output.exists() and not recipe.overwrite:
        raise UserError(f"{recipe.output} already exists; remove it or set overwrite: true", where=f"{where}: output")
    check_writable_dir(output, f"{where}: output")

    base = read_model_dir(recipe.base) if recipe.base else None
    experts = [read_model_dir(e.path) for e in recipe.experts]
    reference = base or experts[0]
    check_same_student(reference, [m for m in experts if m is not reference], where)
    if method.needs_base:
        check_task_vector_base(base, experts, where)
    seed_id = common_seed(([base] if base else []) + experts, where)
    check_finite(([base] if method.needs_base else []) + experts)
    return MergePlan(recipe, method, parameters, expert_parameters, base, experts, seed_id)


def write_merged(merge: MergePlan, out_dir: Path) -> None:
    """Merged weights plus everything that makes `out_dir` a loadable, self-describing student."""
    reference = merge.reference
    config = AutoConfig.from_pretrained(reference.path)
    merge_to_dir(
        method=merge.method.mergekit_name,
        experts=[(e.path, p) for e, p in zip(merge.experts, merge.expert_parameters)],
        base=merge.base.path if merge.method.needs_base else None,
        parameters=merge.parameters,
        tensor_names=reference.shapes,
        config=config,
        out_dtype=merge.recipe.dtype,
        random_seed=merge.recipe.random_seed,
        out_dir=out_dir,
    )
    config.dtype = getattr(torch, merge.recipe.dtype)
    config.save_pretrained(out_dir)
    for name in ("generation_config.json", *reference.tokenizer):
        if (reference.path / name).is_file():
            shutil.copy2(reference.path / name, out_dir / name)
    record = merged_record(merge.recipe, merge.method, merge.base, merge.experts, merge.seed_id)
    write_metadata(out_dir, record)
    (out_dir / "README.md").write_text(model_card(record, merge.method, Path(merge.recipe.output).name))


def main(args: argparse.Namespace) -> int:
    recipe = load_merge_recipe(args.recipe, args.overrides)
    merge = plan(recipe, args.recipe)
    with atomic_dir(recipe.output, overwrite=recipe.overwrite) as tmp:
        write_merged(merge, tmp)
    print(f"merged {len(merge.experts)} experts ({recipe.method}) into {recipe.output}")
    return 0
